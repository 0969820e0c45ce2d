//! What an attempt sends to a provider: the header edits on the routed request (route mode:
//! the host's route sends it), and the headers of a dispatched call (dispatch mode and
//! fallbacks). The body's model rewrite is `request::rewrite_model`.

use crate::answer;
use crate::config::{Config, Provider};
use crate::headers;

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
        if k == "proxy-authorization"
            || (k == "authorization" && !config.failover.forward_client_authorization)
        {
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
}
