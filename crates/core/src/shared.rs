//! What a VM shares with the other workers of its process, as edits of shared data over
//! [`Host`]: an attempt's observation and a half-open probe claimed in the health table, the
//! VM's market-report tally merged into the process-wide one and taken for a report. The
//! filter's per-VM state (`crates/filter/src/lib.rs`) runs them with the host's shared data and
//! logs what they give back.

use crate::config::Circuit;
use crate::health::{Admission, HealthTable, Observation};
use crate::host::{cas_update, Host, Update, CAS_TRIES};
use crate::report::Tallies;

/// How an observation changed a provider's record in the health table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The change matters to other workers: worth writing.
    pub material: bool,
    /// It opened the provider's circuit.
    pub opened: bool,
}

/// Applies what an attempt showed about `provider` to the (shared) health table at `now`.
pub fn observe(
    table: &mut HealthTable,
    provider: &str,
    obs: Observation,
    now: u64,
    circuit: &Circuit,
) -> Observed {
    let rec = table.entry(provider);
    let before = rec.opens;
    let material = rec.observe(obs, now, circuit);
    Observed {
        material,
        opened: rec.opens > before,
    }
}

/// Claims the half-open probe of `provider` until `until`: false (nothing to write) unless a
/// probe is due at `now` and nobody holds it.
pub fn claim_probe(table: &mut HealthTable, provider: &str, now: u64, until: u64) -> bool {
    let rec = table.entry(provider);
    if rec.admission(now) != Admission::Probe {
        return false;
    }
    rec.claim_probe(until);
    true
}

/// The stored form of a tally: an empty one is no bytes.
fn encode(t: &Tallies) -> Vec<u8> {
    if t.is_empty() {
        Vec::new()
    } else {
        t.encode()
    }
}

/// Merges a VM's `tally` into the process-wide one at `key` (compare-and-swap, at most
/// [`CAS_TRIES`] times). Unless it is `Written`, the VM keeps its tally for the next time.
pub fn merge_tally(host: &impl Host, key: &str, tally: &Tallies) -> Update<Tallies> {
    cas_update(host, key, CAS_TRIES, Tallies::decode, encode, |shared| {
        shared.merge(tally);
        true
    })
}

/// Takes the process-wide tally at `key`, leaving it empty, for this period's report; `None`
/// when there is nothing to report, the host refused, or every try lost to another writer
/// (then the tally stays for the next period).
pub fn take_tally(host: &impl Host, key: &str) -> Option<Tallies> {
    let mut taken = None;
    let update = cas_update(host, key, CAS_TRIES, Tallies::decode, encode, |shared| {
        if shared.is_empty() {
            return false;
        }
        taken = Some(std::mem::take(shared));
        true
    });
    match update {
        Update::Written(_) => taken,
        _ => None,
    }
}

#[cfg(test)]
#[path = "shared_tests.rs"]
mod tests;
