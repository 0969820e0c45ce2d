//! The shared-data edits of a VM, on Envoy's and Kong's CAS rules: a circuit that opens, a
//! probe claimed once, a tally merged past other writers, kept when the host refuses or every
//! try loses, taken once.

use super::*;
use crate::attempt::Outcome;
use crate::host::{HostError, MockHost};

const C: Circuit = Circuit {
    failure_threshold: 2,
    cooldown_ms: 1000,
};
const FAIL: Observation = Observation::Failure {
    retry_after_ms: None,
};

#[test]
fn an_observation_says_when_it_opens_the_circuit() {
    let mut t = HealthTable::default();
    let first = observe(&mut t, "a", FAIL, 10, &C);
    assert_eq!(
        first,
        Observed {
            material: true,
            opened: false
        }
    );
    assert!(
        observe(&mut t, "a", FAIL, 20, &C).opened,
        "the second of two"
    );
    assert!(!observe(&mut t, "a", FAIL, 30, &C).opened, "open already");
    assert!(
        !observe(&mut t, "b", FAIL, 30, &C).opened,
        "each provider its own"
    );
}

#[test]
fn a_probe_is_claimed_once_its_cooldown_is_over_and_by_one_request() {
    let mut t = HealthTable::default();
    assert!(
        !claim_probe(&mut t, "a", 0, 100),
        "a closed circuit has no probe"
    );
    observe(&mut t, "a", FAIL, 10, &C);
    observe(&mut t, "a", FAIL, 20, &C);
    assert!(!claim_probe(&mut t, "a", 500, 600), "cooling down");
    assert!(claim_probe(&mut t, "a", 1020, 4020));
    assert!(!claim_probe(&mut t, "a", 1021, 4021), "taken");
    assert!(
        claim_probe(&mut t, "a", 4020, 7020),
        "the probe's time ran out"
    );
}

fn tally(outcome: Outcome) -> Tallies {
    let mut t = Tallies::default();
    t.record("a", "m", &outcome, None);
    t
}

#[test]
fn a_tally_is_merged_past_other_writers_on_both_hosts() {
    let mine = tally(Outcome::Timeout);
    let theirs = tally(Outcome::Success(200)).encode();
    for host in [MockHost::envoy(), MockHost::kong()] {
        let h = host.with_value("obs", &theirs).with_conflicts(3);
        let mut want = Tallies::decode(&theirs);
        want.merge(&mine);
        assert_eq!(merge_tally(&h, "obs", &mine), Update::Written(want.clone()));
        assert_eq!(Tallies::decode(&h.value("obs").unwrap()), want);
        assert_eq!((h.tries(), h.writes()), (4, 1));
    }
    // A new key.
    let h = MockHost::kong();
    assert!(matches!(merge_tally(&h, "obs", &mine), Update::Written(_)));
    assert_eq!(Tallies::decode(&h.value("obs").unwrap()), mine);
}

#[test]
fn a_tally_the_host_refuses_or_every_try_loses_is_not_written() {
    let mine = tally(Outcome::Reset);
    let h = MockHost::kong().refusing_writes(HostError::InternalFailure);
    assert_eq!(
        merge_tally(&h, "obs", &mine),
        Update::Refused(HostError::InternalFailure)
    );
    let h = MockHost::envoy()
        .with_value("obs", b"")
        .with_conflicts(CAS_TRIES);
    assert_eq!(merge_tally(&h, "obs", &mine), Update::GaveUp);
    assert_eq!(h.writes(), 0);
}

#[test]
fn the_process_tally_is_taken_once_and_left_empty() {
    let stored = tally(Outcome::Success(200));
    for host in [MockHost::envoy(), MockHost::kong()] {
        let h = host.with_value("obs", &stored.encode()).with_conflicts(2);
        assert_eq!(take_tally(&h, "obs"), Some(stored.clone()));
        assert_eq!(h.value("obs").unwrap(), b"", "left as no bytes");
        assert_eq!(take_tally(&h, "obs"), None, "nothing left");
        assert_eq!(h.writes(), 1, "an empty tally is not written");
    }
    // Missing, refused or lost every time: nothing taken, the stored tally stays.
    assert_eq!(take_tally(&MockHost::envoy(), "obs"), None);
    let h = MockHost::envoy()
        .with_value("obs", &stored.encode())
        .refusing_reads(HostError::InternalFailure);
    assert_eq!(take_tally(&h, "obs"), None);
    assert_eq!(h.tries(), 0);
    let h = MockHost::envoy()
        .with_value("obs", &stored.encode())
        .with_conflicts(CAS_TRIES);
    assert_eq!(take_tally(&h, "obs"), None);
    assert_eq!(Tallies::decode(&h.value("obs").unwrap()), stored);
}
