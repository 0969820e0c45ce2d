//! Unit tests pinning `select`'s boundaries: the staleness edge, the market median the `value`
//! strategy targets, the soft target's edge, the context window's arithmetic, reliability of
//! degraded offers and the observed time to first byte (each kills a mutant `make mutants`
//! found surviving the tests in `select.rs`).

use super::*;
use crate::market::{validate, MarketView};

/// Providers a, b, c, d serving `m`; `extra` goes into the document's top level.
fn cfg(strategy: &str, routing_extra: &str, providers_extra: &str) -> Config {
    let doc = format!(
        r#"{{"providers":[
            {{"name":"a","cluster":"a","models":{{"m":"m"}}}},
            {{"name":"b","cluster":"b","models":{{"m":"m"}}}},
            {{"name":"c","cluster":"c","models":{{"m":"m"}}}}{providers_extra}],
          "market":{{"cluster":"x","max_age_ms":60000}},
          "routing":{{"strategy":"{strategy}"{routing_extra}}}}}"#
    );
    Config::parse(doc.as_bytes()).unwrap()
}

/// One offer of `m`: (provider, input price, output price, ttft p50, uptime, availability,
/// extra JSON members).
type O<'a> = (&'a str, f64, f64, f64, f64, &'a str, &'a str);

fn view(c: &Config, generated_at: u64, offers: &[O<'_>]) -> MarketView {
    let offers: Vec<String> = offers
        .iter()
        .map(|(p, i, o, t, u, a, extra)| {
            format!(
                r#"{{"provider":"{p}","model":"m","price":{{"input_per_mtok":{i},"output_per_mtok":{o}}},
                  "latency_ms":{{"ttft_p50":{t}}},"uptime":{u},"availability":"{a}","provider_type":"company"{extra}}}"#
            )
        })
        .collect();
    let doc = format!(
        r#"{{"version":1,"generated_at_ms":{generated_at},"offers":[{}]}}"#,
        offers.join(",")
    );
    MarketView::new(validate(doc.as_bytes(), c, 0, None).unwrap().stored, c)
}

/// A request of `body_len` bytes asking for `max_tokens`.
fn req(body_len: usize, max_tokens: u64) -> RequestInfo {
    RequestInfo {
        model: "m".into(),
        model_span: 0..0,
        stream: false,
        include_usage: false,
        max_tokens: Some(max_tokens),
        body_len,
    }
}

fn rank_with(c: &Config, m: &MarketView, h: &HealthTable, r: &RequestInfo, now: u64) -> Ranking {
    rank(c, Some(m), h, r, &Prefs::default(), now, &mut Rng::new(3)).unwrap()
}

fn names(c: &Config, r: &Ranking) -> Vec<String> {
    r.candidates
        .iter()
        .map(|x| c.providers[x.provider].name.clone())
        .collect()
}

fn cand<'r>(c: &Config, r: &'r Ranking, name: &str) -> &'r Candidate {
    r.candidates
        .iter()
        .find(|x| c.providers[x.provider].name == name)
        .unwrap()
}

const ONLINE: &str = "online";
/// A fourth provider, d, for `cfg`'s `providers_extra`: the market has no figures for it.
const D: &str = r#",{"name":"d","cluster":"d","models":{"m":"m"}}"#;

#[test]
fn source_wire_names() {
    assert_eq!(Source::Market.as_str(), "market");
    assert_eq!(Source::StaleMarket.as_str(), "stale_market");
    assert_eq!(Source::Static.as_str(), "static");
    assert_eq!(Source::Unknown.as_str(), "unknown");
}

#[test]
fn market_data_exactly_max_age_old_is_still_fresh() {
    let c = cfg("cheapest", "", "");
    let m = view(&c, 1000, &[("a", 1.0, 1.0, 100.0, 0.99, ONLINE, "")]);
    let h = HealthTable::default();
    let r = rank_with(&c, &m, &h, &req(80, 10), 61_000);
    assert!(!r.stale);
    assert_eq!(cand(&c, &r, "a").source, Source::Market);
    let r = rank_with(&c, &m, &h, &req(80, 10), 61_001);
    assert!(r.stale);
    assert_eq!(cand(&c, &r, "a").source, Source::StaleMarket);
}

#[test]
fn value_targets_the_median_of_the_known_offers_that_are_not_offline() {
    let c = cfg("value", "", "");
    // a 100 ms and b 300 ms online; c offline at 10 s does not count.
    let m = view(
        &c,
        1000,
        &[
            ("a", 1.0, 1.0, 100.0, 0.99, ONLINE, ""),
            ("b", 1.0, 1.0, 300.0, 0.99, ONLINE, ""),
            ("c", 1.0, 1.0, 10_000.0, 0.99, "offline", ""),
        ],
    );
    let r = rank_with(&c, &m, &HealthTable::default(), &req(80, 10), 1000);
    assert_eq!(r.ttft_target_ms, Some(200.0));
    assert_eq!(r.ttft_target_source, Some("market_median"));
    // A fourth provider with no figures at all does not count either.
    let c = cfg("value", "", D);
    let m = view(
        &c,
        1000,
        &[
            ("a", 1.0, 1.0, 100.0, 0.99, ONLINE, ""),
            ("b", 1.0, 1.0, 300.0, 0.99, ONLINE, ""),
        ],
    );
    let r = rank_with(&c, &m, &HealthTable::default(), &req(80, 10), 1000);
    assert_eq!(r.ttft_target_ms, Some(200.0));
    assert_eq!(cand(&c, &r, "d").source, Source::Unknown);
}

#[test]
fn a_median_exactly_at_the_soft_target_is_within_it() {
    // Target 500 ms: a (cheapest, 900 ms) is beyond it, b (500 ms) and c (150 ms) within.
    let c = cfg("cheapest", r#","ttft_target_ms":500"#, "");
    let m = view(
        &c,
        1000,
        &[
            ("a", 0.1, 0.1, 900.0, 0.99, ONLINE, ""),
            ("b", 0.5, 0.5, 500.0, 0.99, ONLINE, ""),
            ("c", 0.9, 0.9, 150.0, 0.99, ONLINE, ""),
        ],
    );
    let r = rank_with(&c, &m, &HealthTable::default(), &req(80, 10), 1000);
    assert_eq!(names(&c, &r), ["b", "c", "a"]);
    assert!(!cand(&c, &r, "b").beyond_ttft_target);
    assert!(cand(&c, &r, "a").beyond_ttft_target);
}

#[test]
fn the_context_window_must_hold_the_prompt_plus_max_tokens() {
    let c = cfg("cheapest", "", "");
    // 400 bytes ≈ 100 prompt tokens, plus 50 asked for: 150 needed.
    let window = |w: u64| {
        let m = view(
            &c,
            1000,
            &[(
                "a",
                1.0,
                1.0,
                100.0,
                0.99,
                ONLINE,
                &format!(r#","context_window":{w}"#),
            )],
        );
        rank(
            &c,
            Some(&m),
            &HealthTable::default(),
            &req(400, 50),
            &Prefs::default(),
            1000,
            &mut Rng::new(1),
        )
    };
    let r = window(150).unwrap();
    assert!(r.excluded.iter().all(|(i, _)| *i != 0), "{r:?}");
    let r = window(149).unwrap();
    assert_eq!(
        r.excluded.iter().find(|(i, _)| *i == 0).map(|(_, why)| why),
        Some(&Reason::ContextWindow {
            need: 150,
            have: 149
        })
    );
}

#[test]
fn a_degraded_offer_counts_nine_tenths_of_its_uptime() {
    let c = cfg("most_reliable", "", "");
    let m = view(
        &c,
        1000,
        &[
            ("a", 1.0, 1.0, 100.0, 0.5, "degraded", ""),
            ("b", 1.0, 1.0, 100.0, 0.5, ONLINE, ""),
        ],
    );
    let r = rank_with(&c, &m, &HealthTable::default(), &req(80, 10), 1000);
    assert_eq!(cand(&c, &r, "a").reliability, 0.5 * 0.9);
    assert_eq!(cand(&c, &r, "b").reliability, 0.5);
    assert_eq!(names(&c, &r)[0], "b");
}

#[test]
fn observed_time_to_first_byte_raises_the_median_after_three_samples() {
    let c = cfg("fastest", "", "");
    let m = view(
        &c,
        1000,
        &[
            ("a", 1.0, 1.0, 100.0, 0.99, ONLINE, ""),
            ("b", 1.0, 1.0, 200.0, 0.99, ONLINE, ""),
        ],
    );
    let with = |samples: u32, ttfb: f64| {
        let mut h = HealthTable::default();
        let e = h.entry("a");
        e.samples = samples;
        e.ttfb_ms = ttfb;
        let r = rank_with(&c, &m, &h, &req(80, 10), 1000);
        (names(&c, &r)[0].clone(), cand(&c, &r, "a").ttft_ms)
    };
    // Two samples are not enough to judge.
    assert_eq!(with(2, 900.0), ("a".into(), 100.0));
    // Three are: a is ranked on its observed 900 ms and b goes first.
    assert_eq!(with(3, 900.0), ("b".into(), 900.0));
    // Faster than the market says: the market's median stands (never lowered).
    assert_eq!(with(5, 50.0), ("a".into(), 100.0));
    // The median kept as the market gives it.
    let mut h = HealthTable::default();
    h.entry("a").samples = 3;
    h.entry("a").ttfb_ms = 900.0;
    let r = rank_with(&c, &m, &h, &req(80, 10), 1000);
    assert_eq!(cand(&c, &r, "a").ttft_p50_ms, 100.0);
}

#[test]
fn value_marks_who_is_beyond_the_market_median() {
    let c = cfg("value", "", D);
    let m = view(
        &c,
        1000,
        &[
            ("a", 1.0, 1.0, 100.0, 0.99, ONLINE, ""),
            ("b", 1.0, 1.0, 200.0, 0.99, ONLINE, ""),
            ("c", 1.0, 1.0, 300.0, 0.99, ONLINE, ""),
        ],
    );
    let r = rank_with(&c, &m, &HealthTable::default(), &req(80, 10), 1000);
    assert_eq!(r.ttft_target_ms, Some(200.0));
    let beyond = |n: &str| cand(&c, &r, n).beyond_ttft_target;
    assert!(!beyond("a"));
    assert!(!beyond("b"), "exactly at the median is within it");
    assert!(beyond("c"));
    assert!(beyond("d"), "nothing known: beyond");
}

/// Constraints are inclusive at their bound, and any numeric one excludes a provider with no
/// figures at all.
#[test]
fn constraints_accept_their_bound_and_need_figures() {
    let excluded = |constraints: &str| {
        let c = cfg("cheapest", &format!(r#","constraints":{constraints}"#), D);
        let m = view(
            &c,
            1000,
            &[
                ("a", 0.5, 2.0, 400.0, 0.99, ONLINE, ""),
                ("b", 0.5, 2.5, 400.0, 0.98, ONLINE, ""),
                ("c", 0.5, 2.0, 401.0, 0.99, ONLINE, ""),
            ],
        );
        let r = rank_with(&c, &m, &HealthTable::default(), &req(80, 10), 1000);
        r.excluded
            .iter()
            .map(|(i, why)| (c.providers[*i].name.clone(), why.code()))
            .collect::<Vec<_>>()
    };
    let x = |items: &[(&str, &'static str)]| {
        items
            .iter()
            .map(|(n, w)| (n.to_string(), *w))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        excluded(r#"{"max_price_per_mtok":2.0}"#),
        x(&[("b", "max_price_per_mtok"), ("d", "no_data")])
    );
    assert_eq!(
        excluded(r#"{"min_uptime":0.99}"#),
        x(&[("b", "min_uptime"), ("d", "no_data")])
    );
    assert_eq!(
        excluded(r#"{"max_ttft_ms":400}"#),
        x(&[("c", "max_ttft_ms"), ("d", "no_data")])
    );
    // No numeric constraint: a provider without figures stays (ranked last).
    assert_eq!(excluded(r#"{"regions":[]}"#), x(&[]));
}

#[test]
fn median_of_odd_and_even_counts() {
    assert_eq!(median(&mut []), None);
    assert_eq!(median(&mut [7.0]), Some(7.0));
    assert_eq!(median(&mut [5.0, 1.0, 3.0]), Some(3.0));
    assert_eq!(median(&mut [9.0, 1.0, 5.0, 3.0, 7.0]), Some(5.0));
    assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
    assert_eq!(median(&mut [10.0, 2.0]), Some(6.0));
}

/// A known candidate for `value_usd`: expected cost 1 USD, uptime 1, median `ttft` ms.
fn valued(ttft: f64) -> Candidate {
    let c = cfg("value", "", "");
    let m = view(&c, 1000, &[("a", 1.0, 1.0, ttft, 1.0, ONLINE, "")]);
    let r = rank_with(&c, &m, &HealthTable::default(), &req(80, 10), 1000);
    let mut a = cand(&c, &r, "a").clone();
    a.expected_cost_usd = 1.0;
    a
}

#[test]
fn value_charges_latency_only_beyond_1_3_times_the_target() {
    // Within 1.3× the target: no charge, faster or slower than the target itself.
    assert_eq!(value_usd(&valued(100.0), Some(1000.0)), 1.0);
    assert_eq!(value_usd(&valued(1200.0), Some(1000.0)), 1.0);
    assert_eq!(value_usd(&valued(1300.0), Some(1000.0)), 1.0);
    // Twice the bar: twice the figure.
    assert_eq!(value_usd(&valued(2600.0), Some(1000.0)), 2.0);
    assert_eq!(value_usd(&valued(3900.0), Some(1000.0)), 3.0);
    // No target, or a zero one: no charge.
    assert_eq!(value_usd(&valued(3900.0), None), 1.0);
    assert_eq!(value_usd(&valued(3900.0), Some(0.0)), 1.0);
}

#[test]
fn value_charges_the_expected_failures() {
    let mut a = valued(100.0);
    a.uptime = 0.75;
    // 1 USD × (1 + 0.25 failed share).
    assert_eq!(value_usd(&a, Some(1000.0)), 1.25);
    a.availability = Availability::Degraded;
    // Degraded: 0.9 × 0.75 = 0.675 up, 0.325 failed.
    assert!((value_usd(&a, Some(1000.0)) - 1.325).abs() < 1e-12);
}

/// A provider with no figures at all (d) goes after every known one, whatever the strategy
/// and however the draw falls; it scores −1, below any known score.
#[test]
fn a_provider_with_no_figures_ranks_after_every_known_one() {
    // b is the worst known offer on every count: d must still trail it.
    let offers = [
        ("a", 1.0, 1.0, 100.0, 0.99, ONLINE, ""),
        ("b", 9.0, 9.0, 900.0, 0.5, ONLINE, ""),
        ("c", 1.0, 1.0, 100.0, 0.99, ONLINE, ""),
    ];
    for strategy in [
        "cheapest",
        "fastest",
        "most_reliable",
        "value",
        "balanced",
        "weighted",
    ] {
        let c = cfg(strategy, "", D);
        let m = view(&c, 1000, &offers);
        let (h, mut rng) = (HealthTable::default(), Rng::new(5));
        for draw in 0..50 {
            let r = rank(
                &c,
                Some(&m),
                &h,
                &req(80, 10),
                &Prefs::default(),
                1000,
                &mut rng,
            )
            .unwrap();
            assert_eq!(names(&c, &r)[3], "d", "{strategy}, draw {draw}");
            assert_eq!(cand(&c, &r, "d").score, -1.0, "{strategy}");
            assert!(cand(&c, &r, "b").score > 0.0, "{strategy}");
        }
    }
}

#[test]
fn rollout_by_session_takes_the_configured_share_of_sessions() {
    let mut rng = Rng::new(1);
    let share = |percent: u8, rng: &mut Rng| {
        (0..2000)
            .filter(|i| in_rollout(percent, Some(&format!("session-{i}")), rng))
            .count()
    };
    assert_eq!(share(0, &mut rng), 0);
    assert!((500..700).contains(&share(30, &mut rng)));
    assert!((1900..2000).contains(&share(99, &mut rng)));
    assert_eq!(share(100, &mut rng), 2000);
    // Percent 1: about one session in a hundred, not two.
    assert!((5..35).contains(&share(1, &mut rng)));
    // Without a session: 0 % is never.
    assert!((0..1000).all(|_| !in_rollout(0, None, &mut rng)));
}

#[test]
fn the_exclusions_message_lists_each_provider_once() {
    let c = cfg("cheapest", r#","constraints":{"max_ttft_ms":100}"#, "");
    let m = view(
        &c,
        1000,
        &[
            ("a", 1.0, 1.0, 200.0, 0.99, ONLINE, ""),
            ("b", 1.0, 1.0, 300.0, 0.99, "offline", ""),
        ],
    );
    let Err(NoRoute::AllExcluded(ex)) = rank(
        &c,
        Some(&m),
        &HealthTable::default(),
        &req(80, 10),
        &Prefs::default(),
        1000,
        &mut Rng::new(1),
    ) else {
        panic!("everyone is excluded")
    };
    assert_eq!(
        explain_exclusions(&c, "m", &ex),
        "no provider for model `m` meets the routing constraints: \
         a: ttft 200 ms over max_ttft_ms 100 [max_ttft_ms]; \
         b: offline in the market [offline]; \
         c: no market data or static_offer to check constraints against [no_data]"
    );
}

#[test]
fn balanced_adds_the_three_weighted_sub_scores() {
    let c = cfg(
        "balanced",
        r#","weights":{"price":1,"latency":1,"reliability":1}"#,
        "",
    );
    // a: the cheapest and fastest, 2 nines; b: half as cheap and fast, 3 nines.
    let m = view(
        &c,
        1000,
        &[
            ("a", 1.0, 1.0, 100.0, 0.99, ONLINE, ""),
            ("b", 2.0, 2.0, 200.0, 0.999, ONLINE, ""),
        ],
    );
    let r = rank_with(&c, &m, &HealthTable::default(), &req(80, 10), 1000);
    let score = |n: &str| cand(&c, &r, n).score;
    assert!(
        (score("a") - (1.0 + 1.0 + 2.0 / 3.0) / 3.0).abs() < 1e-9,
        "{}",
        score("a")
    );
    assert!(
        (score("b") - (0.5 + 0.5 + 1.0) / 3.0).abs() < 1e-9,
        "{}",
        score("b")
    );
}

#[test]
fn sort_stable_by_matches_the_standard_stable_sort() {
    let mut rng = Rng::new(7);
    for len in 0..40 {
        for _ in 0..20 {
            // Few distinct keys, so ties are common; the second field records input order.
            let mut v: Vec<(u64, usize)> = (0..len).map(|i| (rng.next_u64() % 5, i)).collect();
            let mut want = v.clone();
            want.sort_by_key(|a| a.0);
            sort_stable_by(&mut v, |a, b| a.0.cmp(&b.0));
            assert_eq!(v, want);
        }
    }
}
