//! Header rules: which paths are routed, client preference headers, what a re-dispatched
//! attempt carries, what the answer sent back keeps, and the affinity slot encoding.

use crate::config::{Config, ProviderType, Strategy};
use crate::rng::fnv1a;
use crate::select::Prefs;

/// The default `routing.cluster_header`.
pub const DEFAULT_CLUSTER_HEADER: &str = "x-market-router-cluster";

/// Client preference headers (honoured only with `routing.client_overrides`, always stripped).
pub const PREF_STRATEGY: &str = "x-market-router-strategy";
/// Extra price cap, USD per million tokens.
pub const PREF_MAX_PRICE: &str = "x-market-router-max-price";
/// Allowed provider types, comma-separated.
pub const PREF_PROVIDER_TYPE: &str = "x-market-router-provider-type";
/// Allowed regions, comma-separated.
pub const PREF_REGION: &str = "x-market-router-region";
/// Provider names not to use, comma-separated.
pub const PREF_EXCLUDE: &str = "x-market-router-exclude";
/// All preference headers.
pub const PREF_HEADERS: [&str; 5] = [
    PREF_STRATEGY,
    PREF_MAX_PRICE,
    PREF_PROVIDER_TYPE,
    PREF_REGION,
    PREF_EXCLUDE,
];

/// Hop-by-hop and host-managed headers never copied onto a dispatched attempt or a replaced answer.
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// The request paths market-router routes.
pub fn is_llm_path(method: &str, path: &str) -> bool {
    if method != "POST" {
        return false;
    }
    let path = path.split('?').next().unwrap_or(path);
    matches!(
        path,
        "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings"
    )
}

fn list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Preferences from the client's headers. Unknown values are ignored (the header is advisory).
pub fn prefs_from_headers(headers: &[(String, String)]) -> Prefs {
    let mut p = Prefs::default();
    for (k, v) in headers {
        match k.as_str() {
            PREF_STRATEGY => p.strategy = Strategy::parse(v.trim()),
            PREF_MAX_PRICE => {
                p.max_price_per_mtok = v
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
            }
            PREF_PROVIDER_TYPE => {
                p.provider_types = list(v).filter_map(ProviderType::parse).collect()
            }
            PREF_REGION => p.regions = list(v).map(str::to_string).collect(),
            PREF_EXCLUDE => p.exclude = list(v).map(str::to_string).collect(),
            _ => {}
        }
    }
    p
}

/// Whether `name` is a request header the filter owns: the cluster header the host routes by,
/// and the preference headers. A client never gets to send one on to the host's router or a
/// provider, whatever the path.
pub fn is_owned(config: &Config, name: &str) -> bool {
    name == config.routing.cluster_header || PREF_HEADERS.contains(&name)
}

/// Whether the client's header `name` is its credential for this gateway, never sent to a
/// provider: `proxy-authorization`, and `authorization` unless
/// `failover.forward_client_authorization`.
pub fn is_client_credential(config: &Config, name: &str) -> bool {
    name == "proxy-authorization"
        || (name == "authorization" && !config.failover.forward_client_authorization)
}

/// Headers of a dispatched attempt: the client's end-to-end headers (request id, trace
/// context, content type, custom headers) minus pseudo-headers, hop-by-hop headers, the
/// cluster header, preference headers, `accept-encoding` (the filter reads the answer, so the
/// attempt asks for identity) and — unless configured — `authorization`.
pub fn forwarded(config: &Config, headers: &[(String, String)]) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(k, _)| {
            !k.starts_with(':')
                && k != "host"
                && !HOP_BY_HOP.contains(&k.as_str())
                && !is_owned(config, k)
                && k != "accept-encoding"
                && !k.starts_with("x-envoy-")
                && !is_client_credential(config, k)
        })
        .cloned()
        .collect()
}

/// Headers of a provider's answer worth passing on when the filter replaces the response.
pub fn answer_headers(headers: &[(String, String)]) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(k, _)| {
            !k.starts_with(':')
                && !HOP_BY_HOP.contains(&k.as_str())
                && !k.starts_with("x-market-router-")
        })
        .cloned()
        .collect()
}

/// Decimal digits of `n`, written into `buf` (no allocation: response headers are set on every
/// request).
pub fn decimal(n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

/// `usd` with eight decimals (`0.00001230`), written into `buf`; `None` unless it is a finite
/// amount from 0 to 10^10.
pub fn usd8(usd: f64, buf: &mut [u8; 32]) -> Option<&str> {
    if !(0.0..=1e10).contains(&usd) {
        return None;
    }
    let units = (usd * 1e8).round() as u64;
    let mut int = [0u8; 20];
    let whole = decimal(units / 100_000_000, &mut int);
    let mut frac = units % 100_000_000;
    let len = whole.len() + 9;
    buf[..whole.len()].copy_from_slice(whole.as_bytes());
    buf[whole.len()] = b'.';
    for slot in buf[whole.len() + 1..len].iter_mut().rev() {
        *slot = b'0' + (frac % 10) as u8;
        frac /= 10;
    }
    std::str::from_utf8(&buf[..len]).ok()
}

/// Number of affinity slots in shared data (bounded memory; a collision only costs stickiness).
pub const AFFINITY_SLOTS: u64 = 4096;

/// Slot key suffix and the value identifying `session` in it.
pub fn affinity_slot(session: &str) -> (u64, String) {
    let h = fnv1a(session.as_bytes());
    (h % AFFINITY_SLOTS, format!("{h:016x}"))
}

/// Encodes a slot value: session hash and provider name.
pub fn affinity_encode(tag: &str, provider: &str) -> Vec<u8> {
    format!("{tag}:{provider}").into_bytes()
}

/// The provider stored for `tag`, if the slot holds this session.
pub fn affinity_decode<'a>(value: &'a [u8], tag: &str) -> Option<&'a str> {
    let s = std::str::from_utf8(value).ok()?;
    let (t, p) = s.split_once(':')?;
    (t == tag).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn llm_paths() {
        assert!(is_llm_path("POST", "/v1/chat/completions"));
        assert!(is_llm_path("POST", "/v1/embeddings?x=1"));
        assert!(!is_llm_path("GET", "/v1/chat/completions"));
        assert!(!is_llm_path("POST", "/v1/models"));
    }

    #[test]
    fn prefs_parse_leniently() {
        let p = prefs_from_headers(&h(&[
            (PREF_STRATEGY, "fastest"),
            (PREF_MAX_PRICE, "2.5"),
            (PREF_PROVIDER_TYPE, "company, guild"),
            (PREF_REGION, "eu-west,"),
            (PREF_EXCLUDE, "a,b"),
        ]));
        assert_eq!(p.strategy, Some(Strategy::Fastest));
        assert_eq!(p.max_price_per_mtok, Some(2.5));
        assert_eq!(p.provider_types, vec![ProviderType::Company]);
        assert_eq!(p.regions, vec!["eu-west"]);
        assert_eq!(p.exclude, vec!["a", "b"]);
        assert_eq!(
            prefs_from_headers(&h(&[(PREF_MAX_PRICE, "-1")])).max_price_per_mtok,
            None
        );
    }

    #[test]
    fn forwarded_keeps_end_to_end_headers_only() {
        let c = Config::parse(br#"{"providers":[{"name":"a","cluster":"a","models":{"m":"m"}}]}"#)
            .unwrap();
        let got = forwarded(
            &c,
            &h(&[
                (":path", "/v1/chat/completions"),
                ("content-type", "application/json"),
                ("x-request-id", "r1"),
                ("traceparent", "00-abc-def-01"),
                ("authorization", "Bearer client"),
                ("connection", "keep-alive"),
                ("content-length", "10"),
                ("x-market-router-cluster", "a"),
                (PREF_EXCLUDE, "a"),
                ("x-team", "blue"),
                ("accept-encoding", "gzip, deflate"),
                ("x-envoy-expected-rq-timeout-ms", "5"),
            ]),
        );
        let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            ["content-type", "x-request-id", "traceparent", "x-team"]
        );
        let c2 = Config::parse(
            br#"{"providers":[{"name":"a","cluster":"a","models":{"m":"m"}}],"failover":{"forward_client_authorization":true}}"#,
        )
        .unwrap();
        assert!(forwarded(&c2, &h(&[("authorization", "x")])).len() == 1);
        assert!(is_owned(&c, "x-market-router-cluster"));
        assert!(is_owned(&c, PREF_STRATEGY));
        assert!(!is_owned(&c, "x-market-router-provider"));
        assert!(!is_owned(&c, "x-team"));
    }

    #[test]
    fn answer_headers_pass_a_providers_end_to_end_headers_only() {
        let got = answer_headers(&h(&[
            (":status", "200"),
            ("content-type", "application/json"),
            ("connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("x-request-id", "r1"),
            ("x-market-router-provider", "spoofed"),
            ("openai-processing-ms", "12"),
        ]));
        let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            ["content-type", "x-request-id", "openai-processing-ms"]
        );
        assert_eq!(got[1].1, "r1");
        // Each rule on its own: a pseudo-header, a hop-by-hop one, one of ours.
        assert!(answer_headers(&h(&[(":status", "200")])).is_empty());
        assert!(answer_headers(&h(&[("keep-alive", "timeout=5")])).is_empty());
        assert!(answer_headers(&h(&[("x-market-router-cost-usd", "1")])).is_empty());
    }

    #[test]
    fn affinity_slots_round_trip() {
        let (slot, tag) = affinity_slot("conversation-1");
        assert!(slot < AFFINITY_SLOTS);
        let v = affinity_encode(&tag, "acme");
        assert_eq!(affinity_decode(&v, &tag), Some("acme"));
        let (_, other) = affinity_slot("conversation-2");
        assert_eq!(affinity_decode(&v, &other), None);
    }

    #[test]
    fn numbers_are_written_without_allocating() {
        let mut b = [0u8; 20];
        assert_eq!(decimal(0, &mut b), "0");
        assert_eq!(decimal(1234, &mut b), "1234");
        assert_eq!(decimal(u64::MAX, &mut b), u64::MAX.to_string());
        let mut b = [0u8; 32];
        assert_eq!(usd8(0.0000123, &mut b), Some("0.00001230"));
        assert_eq!(usd8(0.0, &mut b), Some("0.00000000"));
        assert_eq!(usd8(12.5, &mut b), Some("12.50000000"));
        assert_eq!(usd8(0.123456789, &mut b), Some("0.12345679"));
        for usd in [0.000_000_015, 0.3, 1.0 / 3.0, 999.999_999_99] {
            assert_eq!(
                usd8(usd, &mut b),
                Some(format!("{usd:.8}").as_str()),
                "{usd}"
            );
        }
        assert_eq!(usd8(-1.0, &mut b), None);
        assert_eq!(usd8(f64::NAN, &mut b), None);
        assert_eq!(usd8(f64::INFINITY, &mut b), None);
    }
}
