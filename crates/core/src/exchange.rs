//! The HTTP side of one request's walk as a state machine: which phase the request is in
//! (reading its body, routed, holding a 2xx, streaming, replacing a held answer, dispatched,
//! done), and what the filter does with each response callback in it.
//!
//! The filter's HTTP context (`crates/filter/src/http.rs`) hands each callback here as an
//! event and carries out the step it gets back with host calls; the walk ([`crate::walk`])
//! judges the outcomes. Reads the host makes only when needed (a response header, the
//! reason the host gives for a reply) come through [`ResponseView`], so a callback costs no
//! more host calls than the decision needs.

use crate::answer;
use crate::attempt::{classify_dispatched, classify_routed, Outcome};
use crate::config::Config;

/// Where one request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Not an LLM request: hands off.
    #[default]
    Passthrough,
    /// Holding headers while the body arrives.
    Reading,
    /// First attempt sent through the host's route.
    Routed,
    /// Route mode: holding a 2xx answer until its body is complete (validity, usage, cost).
    Validating,
    /// Route mode: a streaming answer is flowing to the client.
    Streaming,
    /// Route mode: a non-streaming 2xx too big to hold (or compressed) flows to the client;
    /// its end is kept to read the usage.
    Unheld,
    /// Route mode: the last attempt's error answer is read for what the provider said, then
    /// replaced by the final error.
    ReadingError,
    /// Route mode: a fallback's answer (or the final error) is ready and waits for the end of
    /// the held routed answer, whose place it takes.
    Replacing,
    /// An attempt by `dispatch_http_call` is in flight.
    Dispatched,
    /// An attempt ended without a body from the host; a bounce call is in flight, from whose
    /// callback the filter acts on it (see the filter's `HostCaps::bounce`).
    Bouncing,
    /// The answer is decided (delivered, replaced or a local reply).
    Done,
    /// Envoy mode: Envoy's router is making the attempts in the filter's order.
    Native,
    /// Envoy mode: holding a 2xx answer until its body is complete (usage, cost).
    NativeHolding,
}

/// The routed answer's headers and the host's reason for it, read only when asked.
pub trait ResponseView {
    /// A response header (lower-case name).
    fn header(&self, name: &str) -> Option<String>;
    /// Envoy's `response.code_details` (why the host made or passed this reply).
    fn code_details(&self) -> Option<String>;
}

/// An answer to deliver: status, headers, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u32,
    /// Headers besides `:status` and `content-length`.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

/// What the filter does with the routed answer's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnHeaders {
    /// Not this machine's business (or nothing to do): let them through.
    Ignore,
    /// Hold them: the body decides (it comes in `on_body`).
    Hold,
    /// The walk judges this outcome now (then [`Exchange::after_verdict`]).
    Judge {
        /// What the attempt came to.
        outcome: Outcome,
        /// The answer's status.
        status: u32,
    },
}

/// How the walk's verdict on the routed attempt goes on, as [`Exchange::after_verdict`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRouted {
    /// The routed answer goes to the client, our headers added (the phase says whether its
    /// body is still watched: streaming, unheld).
    Deliver,
    /// The routed answer was the last attempt's error: its body is read (`on_body`), then
    /// replaced by the final error. Hold the headers.
    ReadError,
    /// Answer the final error now, as a local reply.
    FinalError,
    /// A fallback is in flight: hold the headers.
    InFlight,
}

/// What the filter does with a response body callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnBody {
    /// Let the chunk through.
    Continue,
    /// Hold it (and what came before).
    Pause,
    /// The pending answer takes the held one's place (its body of `size` bytes), then the
    /// response goes on.
    Replace(Reply, usize),
    /// A held 2xx grew past what may be held: keep the tail of this chunk, then the walk
    /// judges it a success with the held status (it flows on unheld).
    Overflow,
    /// A held 2xx is complete: read it whole, and the walk judges [`Exchange::validated`].
    Inspect,
    /// An unheld answer: keep the tail of this chunk; at the end (`Some(status)`) price it
    /// from the usage in the tail and write the decision record.
    Tail {
        /// The held status, once the answer ended.
        end: Option<u32>,
    },
    /// The routed error answer: read its first `bytes` for what the provider said, then the
    /// final error takes its place (`in_place`, the body ended) or goes as a local reply.
    ReadError {
        /// How much to read.
        bytes: usize,
        /// Whether the body ended (so it can be replaced in place).
        in_place: bool,
    },
    /// A streaming chunk: look for the usage in it (`read_usage`); at its `end` price the
    /// answer and write the decision record.
    Chunk {
        /// Read the chunk for a usage record.
        read_usage: bool,
        /// The stream ended.
        end: bool,
    },
}

/// Where a final answer goes when it should take the held routed answer's place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// No held answer with a body: send it as a local reply.
    LocalReply,
    /// The held body (`size` bytes) is complete: replace it now, then resume the response.
    Now(usize),
    /// The held body is still coming: the answer waits (phase [`Phase::Replacing`]).
    Later,
}

/// What broke when the request ended (`on_log`) in a phase that should have seen an end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broke {
    /// Nothing: the request ended where it should.
    Nothing,
    /// A delivered answer (streaming or unheld) broke off: the client has bytes already.
    Delivered,
    /// A held 2xx broke off mid-body; the host answered the client itself.
    Held,
}

/// One request's HTTP phases and what they keep.
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    /// Where the request stands.
    pub phase: Phase,
    /// Route mode: status and time (ms) of the 2xx held while its body arrives.
    pub held: Option<(u32, u64)>,
    /// The delivered answer came compressed: its body is not read.
    pub encoded: bool,
    /// Route mode: the 2xx at hand is delivered unheld (too big to hold, or compressed).
    pub unheld: bool,
    /// Route mode: the routed attempt's error answer has a body still to come.
    pub error_body: bool,
    /// Route mode: the routed answer is held while fallbacks run, and has a body whose place
    /// the final answer can take (so it goes through the host's encoders, its compressor
    /// among them, which a local reply sent while the response is held would skip).
    pub routed_held: bool,
    /// Route mode: size of the held routed answer's body once it is complete.
    pub routed_body: Option<usize>,
    /// Route mode: the answer waiting to take the held one's place.
    pub pending: Option<Reply>,
}

/// Whether the request's answer is read by the filter, so it must come as plain bytes
/// (`accept-encoding: identity` on the routed request): a stream for its usage chunk when
/// asked for, a whole answer to check it or to price it.
pub fn reads_answer(config: &Config, stream: bool, include_usage: bool) -> bool {
    if stream {
        include_usage
    } else {
        config.failover.retry_on.malformed || config.response_headers
    }
}

impl Exchange {
    /// Event: the routed answer's headers (`status`; `end_of_stream`: no body follows) at
    /// `now`, for a request that asked for a stream (`stream`, `include_usage`).
    #[allow(clippy::too_many_arguments)]
    pub fn on_headers(
        &mut self,
        status: u32,
        end_of_stream: bool,
        stream: bool,
        include_usage: bool,
        config: &Config,
        now: u64,
        view: &impl ResponseView,
    ) -> OnHeaders {
        // Validating: the held 2xx broke off mid-body and the host now sends its own reply.
        let abandoned = self.phase == Phase::Validating;
        if self.phase != Phase::Routed && !abandoned {
            return OnHeaders::Ignore;
        }
        if abandoned {
            self.phase = Phase::Routed;
            let details = view.code_details();
            let outcome = match classify_routed(status, details.as_deref(), None) {
                Outcome::Success(_) | Outcome::Status { .. } => Outcome::Reset,
                other => other,
            };
            return OnHeaders::Judge { outcome, status };
        }
        let encoded = || answer::is_encoded(view.header("content-encoding").as_deref());
        if (200..300).contains(&status) {
            // Non-streaming answers are held until complete: to check they are well-formed
            // (retry_on malformed) and to price them from their usage (cost header).
            if reads_answer(config, stream, include_usage) && !stream {
                self.held = Some((status, now));
                // Compressed although asked for identity, or bigger than the host can hold:
                // it flows to the client unheld, priced from its usage if its end shows it.
                self.encoded = encoded();
                if self.encoded
                    || !answer::fits(
                        view.header("content-length").as_deref(),
                        answer::HOLD_LIMIT_BYTES,
                    )
                {
                    self.unheld = true;
                    return OnHeaders::Judge {
                        outcome: Outcome::Success(status),
                        status,
                    };
                }
                if end_of_stream {
                    return OnHeaders::Judge {
                        outcome: Outcome::Malformed,
                        status,
                    };
                }
                self.phase = Phase::Validating;
                return OnHeaders::Hold;
            }
            if stream && include_usage {
                self.encoded = encoded();
            }
            return OnHeaders::Judge {
                outcome: Outcome::Success(status),
                status,
            };
        }
        let details = view.code_details();
        let retry_after = view.header("retry-after");
        let outcome = classify_routed(status, details.as_deref(), retry_after.as_deref());
        self.error_body = !end_of_stream && matches!(outcome, Outcome::Status { .. }) && !encoded();
        self.routed_held = !end_of_stream;
        OnHeaders::Judge { outcome, status }
    }

    /// Event: the walk's verdict on the routed attempt (`delivered`: `Some(true)` the answer
    /// at hand goes to the client, `Some(false)` the walk failed, `None` a fallback is in
    /// flight), for an answer of `status` to a request that asked for a stream or not.
    pub fn after_verdict(
        &mut self,
        delivered: Option<bool>,
        status: u32,
        stream: bool,
    ) -> AfterRouted {
        match delivered {
            Some(true) => {
                let ok = (200..300).contains(&status);
                self.phase = if ok && stream {
                    Phase::Streaming
                } else if ok && self.unheld {
                    Phase::Unheld
                } else {
                    Phase::Done
                };
                AfterRouted::Deliver
            }
            Some(false) if self.error_body => {
                self.phase = Phase::ReadingError;
                AfterRouted::ReadError
            }
            Some(false) => {
                self.phase = Phase::Done;
                AfterRouted::FinalError
            }
            None => AfterRouted::InFlight,
        }
    }

    /// Whether the routed answer's decision record waits for its end (a streamed or unheld
    /// 2xx is priced from the usage its body shows).
    pub fn record_at_end(&self, status: u32, stream: bool) -> bool {
        (stream || self.unheld) && (200..300).contains(&status)
    }

    /// Event: a response body chunk (`size`: all of the body at hand, `end_of_stream`: the
    /// last) for a request that asked for a usage chunk (`include_usage`) or not.
    pub fn on_body(&mut self, size: usize, end_of_stream: bool, include_usage: bool) -> OnBody {
        match self.phase {
            // The routed answer, held while a fallback runs: note where its body ends.
            Phase::Dispatched | Phase::Bouncing => {
                if end_of_stream {
                    self.routed_body = Some(size);
                }
                OnBody::Pause
            }
            Phase::Replacing => {
                if !end_of_stream {
                    return OnBody::Pause;
                }
                self.phase = Phase::Done;
                match self.pending.take() {
                    Some(reply) => OnBody::Replace(reply, size),
                    None => OnBody::Continue,
                }
            }
            Phase::Validating => {
                if !end_of_stream {
                    if size <= answer::HOLD_LIMIT_BYTES {
                        return OnBody::Pause;
                    }
                    // A chunked answer grew past what may be held: it flows on from here,
                    // what is held so far first.
                    self.unheld = true;
                    return OnBody::Overflow;
                }
                self.routed_held = true;
                self.routed_body = Some(size);
                OnBody::Inspect
            }
            Phase::Unheld => {
                let end = end_of_stream.then(|| {
                    self.phase = Phase::Done;
                    self.held.map_or(200, |h| h.0)
                });
                OnBody::Tail { end }
            }
            Phase::ReadingError => {
                if !end_of_stream && size <= answer::HOLD_LIMIT_BYTES {
                    return OnBody::Pause;
                }
                self.phase = Phase::Done;
                OnBody::ReadError {
                    bytes: size.min(answer::ERROR_READ_BYTES),
                    in_place: end_of_stream,
                }
            }
            Phase::Streaming => {
                // Only a stream that asked for its usage chunk is read (one host read per
                // chunk adds up over a long stream); otherwise the cost stays the estimate.
                let read_usage = !self.encoded && include_usage && size > 0;
                if end_of_stream {
                    self.phase = Phase::Done;
                }
                OnBody::Chunk {
                    read_usage,
                    end: end_of_stream,
                }
            }
            _ => OnBody::Continue,
        }
    }

    /// The outcome of a held 2xx of `status` once read whole: `well_formed` says whether it
    /// parsed as an answer; a broken one fails over only where `retry_on.malformed` says so.
    pub fn validated(well_formed: bool, retry_malformed: bool, status: u32) -> Outcome {
        if retry_malformed && !well_formed {
            Outcome::Malformed
        } else {
            Outcome::Success(status)
        }
    }

    /// Where a final answer goes in route mode: in the held routed answer's place, now or once
    /// its body is complete, or (no such answer) as a local reply. A `Later` answer waits in
    /// `pending`.
    pub fn place(&mut self, reply: Reply) -> (Place, Option<Reply>) {
        if !self.routed_held {
            return (Place::LocalReply, Some(reply));
        }
        match self.routed_body {
            Some(size) => (Place::Now(size), Some(reply)),
            None => {
                self.pending = Some(reply);
                self.phase = Phase::Replacing;
                (Place::Later, None)
            }
        }
    }

    /// Event: the request ended (`on_log`). Says what broke, if the phase should have seen
    /// an end first.
    pub fn on_log(&self) -> Broke {
        match self.phase {
            // Ended without its end-of-stream body callback (reset mid-response).
            Phase::Streaming | Phase::Unheld => Broke::Delivered,
            // Envoy answers the client itself (502) without passing the reply back through
            // the filter, so it can only be counted.
            Phase::Validating => Broke::Held,
            _ => Broke::Nothing,
        }
    }
}

/// What a dispatched call came to, as its callback shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call<'a> {
    /// The answer's status; `None` when it brought no headers.
    pub status: Option<u32>,
    /// Why the call broke off, when the host says (Kong: `timeout`, `broken connection`, ...;
    /// the filter's `body cut short` when the host refused the announced body).
    pub failure: Option<&'a str>,
    /// The answer's body (empty when there is none).
    pub body: &'a [u8],
    /// Its `retry-after` header.
    pub retry_after: Option<&'a str>,
    /// It came compressed although asked for identity: it is delivered as it came, unread.
    pub encoded: bool,
    /// The request asked for a stream.
    pub stream: bool,
}

impl Call<'_> {
    /// The attempt's outcome. `well_formed` parses a non-streaming answer (asked only for a
    /// plain 2xx that did not break off).
    pub fn outcome(&self, well_formed: impl FnOnce(&[u8]) -> bool) -> Outcome {
        let outcome = match self.failure {
            Some("timeout") => Outcome::Timeout,
            // No answer at all: the connection failed (Kong says `broken connection`).
            Some(_) if self.status.is_none() => Outcome::ConnectFailure,
            Some(_) => Outcome::Reset,
            None => classify_dispatched(self.status, self.body, self.retry_after),
        };
        match outcome {
            // Not read, so not judged malformed (and priced from the estimate).
            Outcome::Success(_) if !self.stream && !self.encoded && !well_formed(self.body) => {
                Outcome::Malformed
            }
            // A stream with nothing in it is no answer either (Kong reports a chunked answer
            // cut before its first complete chunk as a finished call with an empty body).
            Outcome::Success(_) if self.body.is_empty() => Outcome::Malformed,
            other => other,
        }
    }

    /// Whether the error answer is read for what the provider said (for the final error).
    pub fn says_why(&self, outcome: Outcome) -> bool {
        matches!(outcome, Outcome::Status { .. }) && !self.encoded
    }
}

#[cfg(test)]
#[path = "exchange_tests.rs"]
mod tests;
