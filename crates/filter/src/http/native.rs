//! Envoy mode, downstream role: hand the ranked request to Envoy's router and, when the answer
//! arrives, read back what the attempts (the upstream role, `filter/upstream.rs`) recorded.
//! What each step decides is the core's (`handover`); this file carries it out.

use super::{apply, Http};
use crate::errors::ApiError;
use crate::handover::{self, NotHanded, Note, OnAnswer, OnHeldBody};
use crate::host;
use crate::metrics;
use log::warn;
use proxy_wasm::types::{Action, BufferType};
use std::rc::Rc;

impl Http {
    /// Sets the order, the attempt bound and the per-try timeout, and lets the request go to
    /// Envoy's router.
    pub(super) fn native_first(&mut self, now: u64) -> Action {
        let vm = Rc::clone(&self.vm);
        let handed = handover::hand_over(
            &host::Wasm,
            &vm.config,
            &mut self.walk,
            self.info.as_ref(),
            &self.headers,
            |p| vm.claim_probe(&vm.config.providers[p].name, now),
        );
        match handed {
            Ok(()) => {
                self.ex.phase = crate::exchange::Phase::Native;
                Action::Continue
            }
            Err(NotHanded::Lost) => self.reply_error(&ApiError::internal("lost request state")),
            Err(NotHanded::NoneLeft) => {
                let e = self.final_error();
                self.reply_error(&e)
            }
            Err(NotHanded::Refused) => {
                self.reply_error(&ApiError::internal("the host refused the routing headers"))
            }
        }
    }

    /// The answer Envoy's router settled on: a provider's own (delivered with our headers) or
    /// Envoy's local reply after the last attempt (replaced by our error listing the attempts).
    pub(super) fn native_response_headers(&mut self, end_of_stream: bool) -> Action {
        let back = handover::read_back(&host::Wasm, &mut self.walk);
        if back.usage.is_some() {
            self.usage = back.usage;
        }
        if back.failed {
            self.last_said = back.said;
        }
        let vm = Rc::clone(&self.vm);
        let (id, stream) = (self.id, self.stream());
        let model = self.info.as_ref().map_or("", |i| i.model.as_str());
        let affinity = self.affinity.as_ref();
        let step = handover::on_answer(
            &host::Wasm,
            &vm.config,
            &mut self.ex,
            &self.walk,
            stream,
            self.usage.is_some(),
            end_of_stream,
            host::now_ms,
            |note| {
                match note {
                // Counters and the session's affinity: no time needed.
                Note::Effect(e) => apply(&vm, model, affinity, 0, e),
                Note::Drift(what) => crate::upstream::log_drift(&what),
                Note::AllFailed { tried, status } => warn!(
                    "#{id} market-router: all {tried} attempt(s) failed; the client gets the last provider's answer ({status})"
                ),
            }
            },
        );
        match step {
            OnAnswer::FinalError => {
                let e = self.final_error();
                self.reply_error(&e)
            }
            OnAnswer::Pass => Action::Continue,
            OnAnswer::Hold => Action::Pause,
            OnAnswer::Deliver(status) => {
                self.deliver_routed(status);
                Action::Continue
            }
        }
    }

    /// A held non-streaming answer is complete: its usage prices it, then it goes out.
    pub(super) fn native_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match handover::on_held_body(&mut self.ex, body_size, end_of_stream) {
            OnHeldBody::Pause => Action::Pause,
            // It flows on from here, priced from the usage at its end.
            OnHeldBody::Overflow(status) => {
                self.keep_tail(body_size);
                self.deliver_routed(status);
                Action::Continue
            }
            OnHeldBody::Complete(status) => {
                let body =
                    host::buffer(BufferType::HttpResponseBody, body_size).unwrap_or_default();
                self.usage = metrics::inspect_answer(&body).ok().flatten();
                self.deliver_routed(status);
                Action::Continue
            }
        }
    }
}
