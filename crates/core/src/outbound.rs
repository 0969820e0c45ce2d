//! What an attempt sends to a provider, and sending it: the routed first attempt (route
//! mode: the cluster header, the model rewrite and the header edits, then the host's route
//! sends it) and dispatched attempts (dispatch mode and fallbacks: the next candidate the walk
//! gives, past the ones the host refuses to call), over [`HttpHost`].

use crate::answer;
use crate::config::{Config, Provider};
use crate::headers;
use crate::host::{self, HostError, HttpHost};
use crate::request::{self, RequestInfo};
use crate::walk::{Effect, Walk};
use std::borrow::Cow;

/// The client's request as the attempts send it on.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// The filter's configuration.
    pub config: &'a Config,
    /// What the body said.
    pub info: &'a RequestInfo,
    /// The body as the client sent it.
    pub body: &'a [u8],
    /// The client's request headers (those the filter owns already removed).
    pub client: &'a [(String, String)],
}

/// Why the routed first attempt did not go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRouted {
    /// The walk has no attempt to make: the final error.
    NoneLeft,
    /// The host refused a step (what it refused): an internal error.
    Refused(&'static str),
}

/// Route mode, first attempt: points the host's route at the walk's next candidate (cluster
/// header, model rewrite, header edits) and starts the attempt; the host sends it on once the
/// callback returns. Gives the provider.
pub fn route_first(
    host: &impl HttpHost,
    walk: &mut Walk,
    req: &Outgoing<'_>,
    now: u64,
    claim_probe: impl FnMut(usize) -> bool,
    out: impl FnMut(Effect),
) -> Result<usize, NotRouted> {
    let config = req.config;
    let a = walk.next(now, claim_probe).ok_or(NotRouted::NoneLeft)?;
    let provider = &config.providers[a.provider];
    let provider_model = walk
        .ranking
        .as_ref()
        .map_or("", |r| r.candidates[a.candidate].provider_model.as_str());
    host.set_request_header(&config.routing.cluster_header, Some(&provider.cluster))
        .map_err(|_| NotRouted::Refused("the host refused the cluster header"))?;
    if let Some(new_body) = request::rewrite_model(req.body, req.info, provider_model) {
        host.set_request_body(req.body.len(), &new_body)
            .map_err(|_| NotRouted::Refused("the host refused the body rewrite"))?;
        if req.client.iter().any(|(k, _)| k == "content-length") {
            let mut num = [0u8; 20];
            let len = headers::decimal(new_body.len() as u64, &mut num);
            let _ = host.set_request_header("content-length", Some(len));
        }
    }
    let stream = (req.info.stream, req.info.include_usage);
    routed_edits(
        config,
        provider,
        req.client,
        stream,
        a.timeout_ms,
        |k, v| {
            let _ = host.set_request_header(k, v);
        },
    );
    walk.started(a.provider, now, out);
    if req.info.stream {
        // Bounded by the route's timeouts, not by the attempt's.
        walk.unbounded();
    }
    Ok(a.provider)
}

/// Starts the walk's next attempt as a dispatched call, going past candidates the host
/// refuses to call (each a connect failure the walk counts, reported to `refused`). Gives the
/// call's token; `None` when no attempt is left.
pub fn dispatch_next(
    host: &impl HttpHost,
    walk: &mut Walk,
    req: &Outgoing<'_>,
    now: u64,
    mut claim_probe: impl FnMut(usize) -> bool,
    mut out: impl FnMut(Effect),
    mut refused: impl FnMut(usize, HostError),
) -> Option<u32> {
    let config = req.config;
    let path = host::header(req.client, ":path").unwrap_or("/v1/chat/completions");
    let forwarded = headers::forwarded(config, req.client);
    while let Some(a) = walk.next(now, &mut claim_probe) {
        let provider = &config.providers[a.provider];
        let provider_model = walk
            .ranking
            .as_ref()
            .map_or("", |r| r.candidates[a.candidate].provider_model.as_str());
        let body: Cow<'_, [u8]> = match request::rewrite_model(req.body, req.info, provider_model) {
            Some(b) => Cow::Owned(b),
            None => Cow::Borrowed(req.body),
        };
        let hs = dispatch_headers(provider, path, &forwarded);
        let result = host.dispatch(&provider.cluster, &hs, &body, a.timeout_ms);
        walk.started(a.provider, now, &mut out);
        match result {
            Ok(token) => return Some(token),
            Err(e) => {
                refused(a.provider, e);
                walk.refused(&mut out);
            }
        }
    }
    None
}

/// The routed request's header edits for an attempt on `provider` (after the cluster header
/// and the body rewrite), handed to `set` in order: a value sets the header, `None` removes
/// it. `client` is the request's headers as they came (the cluster and preference headers
/// are gone already); `timeout_ms` bounds a non-streaming attempt.
pub fn routed_edits(
    config: &Config,
    provider: &Provider,
    client: &[(String, String)],
    (stream, include_usage): (bool, bool),
    timeout_ms: u64,
    mut set: impl FnMut(&str, Option<&str>),
) {
    // The client's credentials are for this gateway, not for a provider (unless configured).
    for (k, _) in client {
        if headers::is_client_credential(config, k) {
            set(k, None);
        }
    }
    // An answer the filter reads must come in plain bytes; the host's compressor encodes
    // what reaches the client as the client asked.
    if crate::exchange::reads_answer(config, stream, include_usage) {
        set("accept-encoding", Some(answer::IDENTITY));
    }
    if !stream {
        let mut num = [0u8; 20];
        set(
            "x-envoy-upstream-rq-timeout-ms",
            Some(headers::decimal(timeout_ms, &mut num)),
        );
    }
    for (k, v) in &provider.headers {
        set(k, Some(v));
    }
}

/// The headers of a call dispatched to `provider` for the client's request at `path`:
/// pseudo-headers, identity encoding (the filter reads the answer), the client's headers
/// worth forwarding (`forwarded`, from [`headers::forwarded`]) unless the provider sets them,
/// then the provider's own.
pub fn dispatch_headers<'a>(
    provider: &'a Provider,
    path: &'a str,
    forwarded: &'a [(String, String)],
) -> Vec<(&'a str, &'a str)> {
    let mut hs: Vec<(&str, &str)> = vec![
        (":method", "POST"),
        (":path", path),
        (":authority", provider.authority.as_str()),
        (":scheme", provider.scheme.as_str()),
        ("accept-encoding", answer::IDENTITY),
    ];
    hs.extend(
        forwarded
            .iter()
            .filter(|(k, _)| !provider.headers.iter().any(|(h, _)| h == k))
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    hs.extend(
        provider
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    hs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let doc = format!(
            r#"{{"providers":[{{"name":"a","cluster":"a","authority":"api.a.example","scheme":"https","models":{{"m":"m"}},
                 "headers":{{"authorization":"Bearer sk-a","x-api-version":"2"}}}}]{extra}}}"#
        );
        Config::parse(doc.as_bytes()).unwrap()
    }

    fn client() -> Vec<(String, String)> {
        [
            (":path", "/v1/chat/completions"),
            ("authorization", "Bearer client"),
            ("proxy-authorization", "Basic x"),
            ("x-trace", "t1"),
            ("accept-encoding", "gzip"),
            ("connection", "keep-alive"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn edits(c: &Config, stream: (bool, bool)) -> Vec<(String, Option<String>)> {
        let mut out = Vec::new();
        routed_edits(c, &c.providers[0], &client(), stream, 30_000, |k, v| {
            out.push((k.to_string(), v.map(str::to_string)))
        });
        out
    }

    fn set(k: &str, v: &str) -> (String, Option<String>) {
        (k.to_string(), Some(v.to_string()))
    }

    use crate::attempt::{Attempts, Outcome};
    use crate::config::Strategy;
    use crate::host::MockHost;
    use crate::metrics::PerProvider;
    use crate::select::{Candidate, Ranking};
    use crate::test_support;

    fn two(extra: &str) -> Config {
        let doc = format!(
            r#"{{"providers":[{{"name":"a","cluster":"ca","models":{{"m":"m-a"}}}},{{"name":"b","cluster":"cb","models":{{"m":"m"}}}}]{extra}}}"#
        );
        Config::parse(doc.as_bytes()).unwrap()
    }

    fn cand(provider: usize, provider_model: &str) -> Candidate {
        Candidate {
            provider_model: provider_model.into(),
            ..test_support::cand(provider)
        }
    }

    fn walk(c: &Config) -> Walk {
        let mut w = Walk::default();
        w.begin(
            Ranking {
                strategy: Strategy::Value,
                candidates: vec![cand(0, "m-a"), cand(1, "m")],
                excluded: Vec::new(),
                stale: false,
                last_resort: false,
                ttft_target_ms: None,
                ttft_target_source: None,
            },
            Attempts::new(c, 1_000),
        );
        w
    }

    const BODY: &[u8] = br#"{"model":"m","messages":[]}"#;

    const REQ_HEADERS: [(&str, &str); 4] = [
        (":path", "/v1/chat/completions"),
        ("content-length", "27"),
        ("authorization", "Bearer client"),
        ("x-trace", "t1"),
    ];

    fn send<T>(c: &Config, stream: bool, f: impl FnOnce(&Outgoing<'_>) -> T) -> T {
        send_as(c, stream, &REQ_HEADERS, f)
    }

    /// The client's request (`stream` or not) with `client` as its headers.
    fn send_as<T>(
        c: &Config,
        stream: bool,
        client: &[(&str, &str)],
        f: impl FnOnce(&Outgoing<'_>) -> T,
    ) -> T {
        let info = crate::request::parse(BODY).unwrap();
        let info = RequestInfo { stream, ..info };
        let client: Vec<(String, String)> = client
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        f(&Outgoing {
            config: c,
            info: &info,
            body: BODY,
            client: &client,
        })
    }

    #[test]
    fn the_routed_first_attempt_names_the_cluster_and_rewrites_the_model() {
        let c = two("");
        let (host, mut w, mut effects) = (MockHost::envoy(), walk(&c), Vec::new());
        let routed = send(&c, false, |r| {
            route_first(&host, &mut w, r, 1_000, |_| true, |e| effects.push(e))
        });
        assert_eq!(routed, Ok(0));
        let body = br#"{"model":"m-a","messages":[]}"#;
        assert_eq!(host.request_body().as_deref(), Some(&body[..]));
        let edits = host.request_edits();
        assert_eq!(
            edits[0],
            ("x-market-router-cluster".into(), Some("ca".into()))
        );
        assert_eq!(edits[1], ("content-length".into(), Some("29".into())));
        assert!(edits.contains(&("authorization".into(), None)));
        assert_eq!(w.attempts.as_ref().unwrap().current, Some(0));
        assert_eq!(
            effects,
            [Effect::Count {
                provider: 0,
                counter: PerProvider::Attempts
            }]
        );
    }

    #[test]
    fn a_refused_cluster_header_is_an_internal_error_and_an_empty_walk_the_final_error() {
        let c = two("");
        let host = MockHost::envoy().refusing_request_headers(HostError::BadArgument);
        let mut w = walk(&c);
        let routed = send(&c, false, |r| {
            route_first(&host, &mut w, r, 1_000, |_| true, |_| {})
        });
        assert_eq!(
            routed,
            Err(NotRouted::Refused("the host refused the cluster header"))
        );
        let mut none = Walk::default();
        let routed = send(&c, false, |r| {
            route_first(&MockHost::envoy(), &mut none, r, 1_000, |_| true, |_| {})
        });
        assert_eq!(routed, Err(NotRouted::NoneLeft));
    }

    #[test]
    fn a_dispatch_goes_past_a_refused_cluster_to_the_next_provider() {
        let c = two("");
        let host = MockHost::envoy().refusing_dispatch_to("ca", HostError::BadArgument);
        let (mut w, mut effects, mut refused) = (walk(&c), Vec::new(), Vec::new());
        let token = send(&c, false, |r| {
            dispatch_next(
                &host,
                &mut w,
                r,
                1_000,
                |_| true,
                |e| effects.push(e),
                |p, e| refused.push((p, e)),
            )
        });
        assert_eq!(token, Some(1));
        assert_eq!(refused, [(0, HostError::BadArgument)]);
        let calls = host.dispatched();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].cluster, "cb");
        assert_eq!(calls[0].body, BODY);
        assert_eq!(calls[0].timeout_ms, c.failover.attempt_timeout_ms);
        assert!(calls[0].headers.contains(&("x-trace".into(), "t1".into())));
        let a = w.attempts.as_ref().unwrap();
        assert_eq!(
            (a.tried.clone(), a.current),
            (vec![(0, Outcome::ConnectFailure)], Some(1))
        );
        assert!(effects.contains(&Effect::Count {
            provider: 0,
            counter: PerProvider::Failover
        }));
    }

    #[test]
    fn all_refused_leaves_no_attempt_and_counts_each() {
        let c = two("");
        let host = MockHost::envoy()
            .refusing_dispatch_to("ca", HostError::BadArgument)
            .refusing_dispatch_to("cb", HostError::InternalFailure);
        let (mut w, mut refused) = (walk(&c), Vec::new());
        let token = send(&c, false, |r| {
            dispatch_next(
                &host,
                &mut w,
                r,
                1_000,
                |_| true,
                |_| {},
                |p, e| refused.push((p, e)),
            )
        });
        assert_eq!(token, None);
        assert_eq!(
            refused,
            [(0, HostError::BadArgument), (1, HostError::InternalFailure)]
        );
        assert!(host.dispatched().is_empty());
        assert_eq!(w.attempts.as_ref().unwrap().tried.len(), 2);
    }

    #[test]
    fn a_probe_another_request_holds_is_not_dispatched() {
        let c = two("");
        let mut w = walk(&c);
        if let Some(r) = w.ranking.as_mut() {
            r.candidates[0].probe = true;
        }
        let host = MockHost::envoy();
        let token = send(&c, true, |r| {
            dispatch_next(&host, &mut w, r, 1_000, |_| false, |_| {}, |_, _| {})
        });
        assert_eq!(token, Some(1));
        assert_eq!(host.dispatched()[0].cluster, "cb");
    }

    #[test]
    fn a_routed_attempt_drops_the_clients_credentials_and_carries_the_providers() {
        let c = config("");
        assert_eq!(
            edits(&c, (false, false)),
            [
                ("authorization".to_string(), None),
                ("proxy-authorization".to_string(), None),
                set("accept-encoding", "identity"),
                set("x-envoy-upstream-rq-timeout-ms", "30000"),
                set("authorization", "Bearer sk-a"),
                set("x-api-version", "2"),
            ]
        );
    }

    #[test]
    fn a_routed_stream_has_no_attempt_timeout_and_is_read_only_for_its_usage() {
        let c = config(r#","failover":{"forward_client_authorization":true}"#);
        let e = edits(&c, (true, false));
        assert_eq!(e[0], ("proxy-authorization".to_string(), None));
        assert!(!e.iter().any(|(k, _)| k == "x-envoy-upstream-rq-timeout-ms"));
        assert!(!e.iter().any(|(k, _)| k == "accept-encoding"));
        assert!(edits(&c, (true, true)).contains(&set("accept-encoding", "identity")));
    }

    #[test]
    fn a_dispatched_call_forwards_the_clients_headers_unless_the_provider_sets_them() {
        let c = config("");
        let hs = client();
        let fwd = headers::forwarded(&c, &hs);
        let out = dispatch_headers(&c.providers[0], "/v1/chat/completions", &fwd);
        assert_eq!(
            out,
            [
                (":method", "POST"),
                (":path", "/v1/chat/completions"),
                (":authority", "api.a.example"),
                (":scheme", "https"),
                ("accept-encoding", "identity"),
                // Hop-by-hop (proxy-authorization, connection) and the client's own
                // credentials and encoding stay behind.
                ("x-trace", "t1"),
                ("authorization", "Bearer sk-a"),
                ("x-api-version", "2"),
            ]
        );
    }

    #[test]
    fn a_rewritten_body_gets_a_content_length_only_when_the_client_sent_one() {
        let c = two("");
        let chunked = [
            (":path", "/v1/chat/completions"),
            ("transfer-encoding", "chunked"),
            ("x-trace", "t1"),
        ];
        let (host, mut w) = (MockHost::envoy(), walk(&c));
        let routed = send_as(&c, false, &chunked, |r| {
            route_first(&host, &mut w, r, 1_000, |_| true, |_| {})
        });
        assert_eq!(routed, Ok(0));
        let body = br#"{"model":"m-a","messages":[]}"#;
        assert_eq!(host.request_body().as_deref(), Some(&body[..]));
        assert!(
            !host
                .request_edits()
                .iter()
                .any(|(k, _)| k == "content-length"),
            "{:?}",
            host.request_edits()
        );
    }

    #[test]
    fn a_dispatched_call_keeps_the_clients_path_or_defaults_to_chat_completions() {
        let c = two("");
        for (client, want) in [
            (
                &[
                    ("content-length", "27"),
                    (":path", "/openai/v1/chat/completions"),
                ][..],
                "/openai/v1/chat/completions",
            ),
            (&[("content-length", "27")][..], "/v1/chat/completions"),
        ] {
            let (host, mut w) = (MockHost::envoy(), walk(&c));
            let token = send_as(&c, false, client, |r| {
                dispatch_next(&host, &mut w, r, 1_000, |_| true, |_| {}, |_, _| {})
            });
            assert!(token.is_some());
            let calls = host.dispatched();
            let path: Vec<&(String, String)> = calls[0]
                .headers
                .iter()
                .filter(|(k, _)| k == ":path")
                .collect();
            assert_eq!(
                path,
                [&(":path".to_string(), want.to_string())],
                "{client:?}"
            );
        }
    }
}
