//! Unit tests pinning wire names and error texts of `market` (each kills mutants
//! `make mutants` found surviving the original tests).

use super::*;

#[test]
fn availability_wire_names() {
    assert_eq!(Availability::Online.as_str(), "online");
    assert_eq!(Availability::Degraded.as_str(), "degraded");
    assert_eq!(Availability::Offline.as_str(), "offline");
}

#[test]
fn snapshot_errors_say_what_is_wrong() {
    let cases = [
        (SnapshotError::NotJson, "snapshot is not valid JSON"),
        (
            SnapshotError::Version("2".into()),
            "snapshot version is 2, expected 1",
        ),
        (
            SnapshotError::Field("offers"),
            "snapshot field `offers` is missing or invalid",
        ),
        (
            SnapshotError::NoValidOffers(3),
            "all 3 offers in the snapshot are invalid",
        ),
    ];
    for (e, text) in cases {
        assert_eq!(e.to_string(), text);
    }
}

/// One offer of `acme` for `llama`, with `extra` members appended (a later member replaces
/// an earlier one of the same name).
fn offer(extra: &str) -> Value {
    let doc = format!(
        r#"{{"provider":"acme","model":"llama","price":{{"input_per_mtok":0.3,"output_per_mtok":0.4}},
           "latency_ms":{{"ttft_p50":300}},"uptime":0.99,"availability":"online","provider_type":"community"{extra}}}"#
    );
    serde_json::from_str(&doc).unwrap()
}

/// The offer rules of market-snapshot.md, one member at a time: what is accepted and how it
/// is read, what is refused and the member the refusal names.
#[test]
fn each_offer_member_is_checked_by_its_rule() {
    type Read = fn(&Offer) -> bool;
    let accepted: [(&str, Read); 14] = [
        ("", |o| o.provider == "acme" && o.model == "llama"),
        (r#","availability":"online""#, |o| {
            o.availability == Availability::Online
        }),
        (r#","availability":"degraded""#, |o| {
            o.availability == Availability::Degraded
        }),
        (r#","availability":"offline""#, |o| {
            o.availability == Availability::Offline
        }),
        (
            r#","price":{"input_per_mtok":0,"output_per_mtok":0}"#,
            |o| o.input_per_mtok == 0.0 && o.output_per_mtok == 0.0,
        ),
        (r#","region":null,"provider_model":null"#, |o| {
            o.region.is_none() && o.provider_model.is_none()
        }),
        (r#","region":"eu""#, |o| o.region.as_deref() == Some("eu")),
        (r#","context_window":null"#, |o| o.context_window.is_none()),
        (r#","context_window":1"#, |o| o.context_window == Some(1)),
        (r#","throughput_tps":0"#, |o| o.throughput_tps == Some(0.0)),
        (r#","throughput_tps":55.5"#, |o| {
            o.throughput_tps == Some(55.5)
        }),
        (r#","latency_ms":{"ttft_p50":300,"ttft_p95":900}"#, |o| {
            o.ttft_p95_ms == Some(900.0)
        }),
        // A p95 that is not a positive figure is dropped, the offer kept.
        (r#","latency_ms":{"ttft_p50":300,"ttft_p95":0}"#, |o| {
            o.ttft_p95_ms.is_none()
        }),
        (r#","uptime":1"#, |o| o.uptime == 1.0),
    ];
    for (extra, read) in accepted {
        let o = check_offer(&offer(extra)).unwrap_or_else(|e| panic!("{extra}: {e}"));
        assert!(read(&o), "{extra}: {o:?}");
    }
    let refused = [
        (r#","provider":"""#, "`provider`"),
        (r#","model":"""#, "`model`"),
        (r#","model":7"#, "`model`"),
        (r#","region":"""#, "`region`"),
        (r#","provider_model":"""#, "`provider_model`"),
        (
            r#","price":{"input_per_mtok":-0.1,"output_per_mtok":0.4}"#,
            "`price.input_per_mtok`",
        ),
        (
            r#","price":{"input_per_mtok":0.3,"output_per_mtok":-1}"#,
            "`price.output_per_mtok`",
        ),
        (r#","latency_ms":{"ttft_p50":0}"#, "`latency_ms.ttft_p50`"),
        (r#","latency_ms":{"ttft_p50":-5}"#, "`latency_ms.ttft_p50`"),
        (r#","uptime":1.01"#, "`uptime`"),
        (r#","availability":"sleeping""#, "`availability`"),
        (r#","provider_type":"guild""#, "`provider_type`"),
        (r#","context_window":0"#, "`context_window`"),
        (r#","context_window":1.5"#, "`context_window`"),
        (r#","throughput_tps":-1"#, "`throughput_tps`"),
    ];
    for (extra, member) in refused {
        let why = check_offer(&offer(extra)).expect_err(extra);
        assert!(why.contains(member), "{extra}: {why}");
    }
    assert!(check_offer(&Value::from(3)).is_err());
}

/// Invalid offers beside offers of providers this gateway does not configure: the snapshot
/// stands (it is not "all offers invalid"), each kind counted.
#[test]
fn invalid_offers_next_to_unknown_providers_keep_the_snapshot() {
    let c = Config::parse(
        br#"{"providers":[{"name":"acme","cluster":"c1","models":{"llama":"llama"}}]}"#,
    )
    .unwrap();
    let bad = offer(r#","uptime":2"#).to_string();
    let ghost = offer(r#","provider":"ghost""#).to_string();
    // Leading white space before the document is fine.
    let doc = format!(" \n{{\"version\":1,\"generated_at_ms\":5,\"offers\":[{bad},{ghost}]}}");
    let v = validate(doc.as_bytes(), &c, 0, None).unwrap();
    assert_eq!(v.stored.offers, vec![]);
    assert_eq!(v.invalid.len(), 1);
    assert_eq!(v.unknown_providers, 1);
    assert_eq!(v.stored.generated_at_ms, 5);
}
