//! The host as the core sees it: narrow traits whose calls each return a typed `Result`
//! ([`Host`]: shared data; [`HttpHost`]: one request's headers, body, local reply and
//! dispatched calls), the shared-data rules built on them (the bounded overwrite loop, the
//! bounded compare-and-swap update), and [`MockHost`], an in-memory host with Envoy's or
//! Kong's CAS rules, scripted conflicts and refusals, that records what a request did, for
//! native tests.
//!
//! The filter implements both over `proxy_wasm::hostcalls`, mapping each `Status` to a
//! [`HostError`].

use crate::exchange::Reply;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;

/// Why the host refused a call: proxy-wasm's error statuses, one by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostError {
    /// The key, property or call does not exist.
    NotFound,
    /// The host took an argument as invalid.
    BadArgument,
    /// A value could not be serialized.
    SerializationFailure,
    /// A value could not be parsed.
    ParseFailure,
    /// Nothing there.
    Empty,
    /// A compare-and-swap write lost: the value changed since it was read.
    CasMismatch,
    /// The host failed (e.g. a full shm_kv zone on Kong).
    InternalFailure,
    /// A status this list does not know, by number.
    Other(u32),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Shared data, as every host offers it: a value and its CAS per key.
pub trait Host {
    /// The value of `key` and its CAS; `(None, None)` when the key does not exist.
    fn get_shared(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), HostError>;
    /// Writes `value`; with `Some(cas)` only if the value still has that CAS.
    fn set_shared(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError>;
}

/// One request's side of the host: its headers and body, a local reply, calls dispatched for
/// it.
pub trait HttpHost {
    /// Sets (with `None` removes) a request header.
    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError>;
    /// Replaces the request body's first `size` bytes with `body`.
    fn set_request_body(&self, size: usize, body: &[u8]) -> Result<(), HostError>;
    /// A response header (`None`: not there).
    fn response_header(&self, name: &str) -> Result<Option<String>, HostError>;
    /// Sets a response header.
    fn set_response_header(&self, name: &str, value: &str) -> Result<(), HostError>;
    /// Answers the request from here (a local reply).
    fn send_reply(
        &self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HostError>;
    /// Starts a call to `cluster`; its token names the callback that answers it.
    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, HostError>;
}

/// Properties of the request at hand (Envoy: its stream info, e.g. `xds.cluster_name`, and
/// filter state, which a request's downstream and upstream filters share; envoy mode only).
pub trait Properties {
    /// The property at `path` (`None`: not there).
    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError>;
    /// Writes the filter-state property `name`.
    fn set_property(&self, name: &str, value: &[u8]) -> Result<(), HostError>;
}

/// A property as UTF-8 (lossy); `None` when absent or refused.
pub fn property_text(host: &impl Properties, path: &[&str]) -> Option<String> {
    host.property(path)
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// A call a [`MockHost`] was asked to dispatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatched {
    /// Target cluster.
    pub cluster: String,
    /// Headers, in order.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Timeout, ms.
    pub timeout_ms: u64,
}

/// Why a shared-data write did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    /// Someone wrote first.
    CasMismatch,
    /// The host refused (e.g. a full zone on Kong).
    Refused(HostError),
}

/// The value of header `name` in a header list (the first with that name): names compare
/// ignoring ASCII case, as the hosts' own header lookups do (the filter lowercases the lists it
/// reads, see `lowercase_names` in the filter's host module). One lookup for the filter's lists
/// and [`MockHost`]'s.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// How many times an unconditional write re-reads the CAS after losing a race.
pub const OVERWRITE_TRIES: usize = 8;

/// How many times the filter tries one read-modify-write of shared data (health, report
/// tallies) before it skips the update: the request never waits or fails for it.
pub const CAS_TRIES: usize = 8;

/// A shared-data value and its CAS (an absent key is empty, CAS 0); `None` when the host
/// refused.
pub fn shared_get(host: &impl Host, key: &str) -> Option<(Vec<u8>, u32)> {
    match host.get_shared(key) {
        Ok((v, cas)) => Some((v.unwrap_or_default(), cas.unwrap_or(0))),
        Err(_) => None,
    }
}

/// Writes shared data: with `Some(nonzero)` only if the value still has that CAS; with `None`
/// (or 0) whatever is there. Hosts differ on a CAS of 0: Envoy overwrites, Kong writes only if
/// the key is absent. So an unconditional write first tries CAS 0 (done at once on Envoy, and
/// on Kong for a new key), and on a mismatch reads the current CAS and writes with it, at
/// most [`OVERWRITE_TRIES`] times.
pub fn shared_set(
    host: &impl Host,
    key: &str,
    value: &[u8],
    cas: Option<u32>,
) -> Result<(), SetError> {
    if let Some(cas) = cas.filter(|c| *c != 0) {
        return set_once(host, key, value, Some(cas));
    }
    let mut cas = None;
    for _ in 0..OVERWRITE_TRIES {
        match set_once(host, key, value, cas) {
            Err(SetError::CasMismatch) => {
                cas = match host.get_shared(key) {
                    Ok((_, c)) => c.filter(|c| *c != 0),
                    Err(e) => return Err(SetError::Refused(e)),
                }
            }
            done => return done,
        }
    }
    Err(SetError::CasMismatch)
}

fn set_once(host: &impl Host, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
    match host.set_shared(key, value, cas) {
        Ok(()) => Ok(()),
        Err(HostError::CasMismatch) => Err(SetError::CasMismatch),
        Err(e) => Err(SetError::Refused(e)),
    }
}

/// How a compare-and-swap update ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Update<T> {
    /// Written: the value as stored.
    Written(T),
    /// The edit changed nothing worth writing; nothing was written.
    Declined,
    /// The host refused the write; nothing was written (the caller skips the update).
    Refused(HostError),
    /// Every try lost to another writer; nothing was written (the caller skips the update).
    GaveUp,
}

/// Read, edit, write back only if nobody wrote meanwhile; at most `tries` times. A missing
/// key (or a refused read) is edited from `decode(b"")` and written unconditionally.
/// `edit` says whether its change is worth writing.
pub fn cas_update<T>(
    host: &impl Host,
    key: &str,
    tries: usize,
    decode: impl Fn(&[u8]) -> T,
    encode: impl Fn(&T) -> Vec<u8>,
    mut edit: impl FnMut(&mut T) -> bool,
) -> Update<T> {
    for _ in 0..tries {
        let (bytes, cas) = shared_get(host, key).unwrap_or_default();
        let mut value = decode(&bytes);
        if !edit(&mut value) {
            return Update::Declined;
        }
        match shared_set(host, key, &encode(&value), Some(cas)) {
            Ok(()) => return Update::Written(value),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Refused(e)) => return Update::Refused(e),
        }
    }
    Update::GaveUp
}

/// An in-memory host for native tests, built step by step:
/// `MockHost::envoy().with_value("k", b"v").with_conflicts(2)`.
#[derive(Debug, Default)]
pub struct MockHost {
    data: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    /// Kong's rule: a write with CAS 0 (or none) only creates.
    cas_zero_creates_only: bool,
    /// Conditional writes still to lose to another writer (who bumps the CAS).
    conflicts: Cell<usize>,
    /// Every write is refused so.
    refuse_writes: Cell<Option<HostError>>,
    /// Every read is refused so.
    refuse_reads: Cell<Option<HostError>>,
    writes: Cell<usize>,
    tries: Cell<usize>,
    /// The response's headers.
    response: RefCell<Vec<(String, String)>>,
    /// Request header edits, in order (`None`: removed).
    edits: RefCell<Vec<(String, Option<String>)>>,
    /// The request body as last replaced.
    body: RefCell<Option<Vec<u8>>>,
    /// Clusters a dispatch to is refused so (Envoy: an unknown cluster is `BadArgument`).
    refuse_dispatch: RefCell<Vec<(String, HostError)>>,
    /// Every request header edit is refused so.
    refuse_headers: Cell<Option<HostError>>,
    /// Calls dispatched.
    calls: RefCell<Vec<Dispatched>>,
    /// Local replies sent: status, headers, body.
    replies: RefCell<Vec<Reply>>,
    /// Properties by path (parts joined with NUL).
    properties: RefCell<HashMap<String, Vec<u8>>>,
    /// Every property write is refused so.
    refuse_properties: Cell<Option<HostError>>,
}

impl MockHost {
    /// Envoy's CAS rules: a write with CAS 0 (or none) overwrites.
    pub fn envoy() -> Self {
        Self::default()
    }

    /// Kong's CAS rules: a write with CAS 0 (or none) only creates a missing key.
    pub fn kong() -> Self {
        Self {
            cas_zero_creates_only: true,
            ..Self::default()
        }
    }

    /// `key` holds `value` (CAS 1).
    pub fn with_value(self, key: &str, value: &[u8]) -> Self {
        self.data
            .borrow_mut()
            .insert(key.to_string(), (value.to_vec(), 1));
        self
    }

    /// The next `n` conditional writes find that another writer came first.
    pub fn with_conflicts(self, n: usize) -> Self {
        self.conflicts.set(n);
        self
    }

    /// Every write is refused with `e` (e.g. `InternalFailure`: a full Kong zone).
    pub fn refusing_writes(self, e: HostError) -> Self {
        self.refuse_writes.set(Some(e));
        self
    }

    /// Every read is refused with `e`.
    pub fn refusing_reads(self, e: HostError) -> Self {
        self.refuse_reads.set(Some(e));
        self
    }

    /// The response carries header `name: value`.
    pub fn with_response_header(self, name: &str, value: &str) -> Self {
        self.response
            .borrow_mut()
            .push((name.to_string(), value.to_string()));
        self
    }

    /// A dispatch to `cluster` is refused with `e`.
    pub fn refusing_dispatch_to(self, cluster: &str, e: HostError) -> Self {
        self.refuse_dispatch
            .borrow_mut()
            .push((cluster.to_string(), e));
        self
    }

    /// Every request header edit is refused with `e`.
    pub fn refusing_request_headers(self, e: HostError) -> Self {
        self.refuse_headers.set(Some(e));
        self
    }

    /// Property `path` holds `value`.
    pub fn with_property(self, path: &[&str], value: &[u8]) -> Self {
        self.properties
            .borrow_mut()
            .insert(path.join("\0"), value.to_vec());
        self
    }

    /// Every property write is refused with `e`.
    pub fn refusing_properties(self, e: HostError) -> Self {
        self.refuse_properties.set(Some(e));
        self
    }

    /// What property `path` holds.
    pub fn property_value(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.properties.borrow().get(&path.join("\0")).cloned()
    }

    /// A response header as it stands now.
    pub fn response_value(&self, name: &str) -> Option<String> {
        header(&self.response.borrow(), name).map(str::to_string)
    }

    /// The request header edits made, in order (`None`: removed).
    pub fn request_edits(&self) -> Vec<(String, Option<String>)> {
        self.edits.borrow().clone()
    }

    /// The request body, if it was replaced.
    pub fn request_body(&self) -> Option<Vec<u8>> {
        self.body.borrow().clone()
    }

    /// The calls dispatched (refused ones not among them).
    pub fn dispatched(&self) -> Vec<Dispatched> {
        self.calls.borrow().clone()
    }

    /// The local replies sent: status, headers, body.
    pub fn replies(&self) -> Vec<Reply> {
        self.replies.borrow().clone()
    }

    /// What `key` holds.
    pub fn value(&self, key: &str) -> Option<Vec<u8>> {
        self.data.borrow().get(key).map(|(v, _)| v.clone())
    }

    /// Writes that took effect.
    pub fn writes(&self) -> usize {
        self.writes.get()
    }

    /// Writes tried, whether they took effect or not.
    pub fn tries(&self) -> usize {
        self.tries.get()
    }
}

impl Host for MockHost {
    fn get_shared(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), HostError> {
        if let Some(e) = self.refuse_reads.get() {
            return Err(e);
        }
        Ok(match self.data.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        })
    }

    fn set_shared(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
        self.tries.set(self.tries.get() + 1);
        if let Some(e) = self.refuse_writes.get() {
            return Err(e);
        }
        let mut data = self.data.borrow_mut();
        let current = data.get(key).map(|(_, c)| *c);
        match (cas.filter(|c| *c != 0), current) {
            (Some(want), Some(have)) => {
                if self.conflicts.get() > 0 {
                    self.conflicts.set(self.conflicts.get() - 1);
                    if let Some(entry) = data.get_mut(key) {
                        entry.1 += 1;
                    }
                    return Err(HostError::CasMismatch);
                }
                if want != have {
                    return Err(HostError::CasMismatch);
                }
            }
            (None, Some(_)) if self.cas_zero_creates_only => return Err(HostError::CasMismatch),
            _ => {}
        }
        let next = current.map_or(1, |c| c + 1);
        data.insert(key.to_string(), (value.to_vec(), next));
        self.writes.set(self.writes.get() + 1);
        Ok(())
    }
}

impl Properties for MockHost {
    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        Ok(self.property_value(path))
    }

    fn set_property(&self, name: &str, value: &[u8]) -> Result<(), HostError> {
        if let Some(e) = self.refuse_properties.get() {
            return Err(e);
        }
        self.properties
            .borrow_mut()
            .insert(name.to_string(), value.to_vec());
        Ok(())
    }
}

fn owned(headers: &[(&str, &str)]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl HttpHost for MockHost {
    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError> {
        if let Some(e) = self.refuse_headers.get() {
            return Err(e);
        }
        self.edits
            .borrow_mut()
            .push((name.to_string(), value.map(str::to_string)));
        Ok(())
    }

    fn set_request_body(&self, _size: usize, body: &[u8]) -> Result<(), HostError> {
        *self.body.borrow_mut() = Some(body.to_vec());
        Ok(())
    }

    fn response_header(&self, name: &str) -> Result<Option<String>, HostError> {
        Ok(header(&self.response.borrow(), name).map(str::to_string))
    }

    fn set_response_header(&self, name: &str, value: &str) -> Result<(), HostError> {
        let mut response = self.response.borrow_mut();
        response.retain(|(k, _)| k != name);
        response.push((name.to_string(), value.to_string()));
        Ok(())
    }

    fn send_reply(
        &self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HostError> {
        self.replies.borrow_mut().push(Reply {
            status,
            headers: owned(headers),
            body: body.to_vec(),
        });
        Ok(())
    }

    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, HostError> {
        if let Some((_, e)) = self
            .refuse_dispatch
            .borrow()
            .iter()
            .find(|(c, _)| c == cluster)
        {
            return Err(*e);
        }
        let mut calls = self.calls.borrow_mut();
        calls.push(Dispatched {
            cluster: cluster.to_string(),
            headers: owned(headers),
            body: body.to_vec(),
            timeout_ms,
        });
        Ok(calls.len() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(bytes: &[u8]) -> u32 {
        std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    fn bump(host: &MockHost, tries: usize) -> Update<u32> {
        cas_update(
            host,
            "n",
            tries,
            count,
            |n| n.to_string().into_bytes(),
            |n| {
                *n += 1;
                true
            },
        )
    }

    #[test]
    fn a_header_is_the_first_of_its_name_in_any_case() {
        let list = |v: &[(&str, &str)]| owned(v);
        let hs = list(&[(":status", "200"), ("ETag", "\"a\""), ("etag", "\"b\"")]);
        assert_eq!(header(&hs, ":status"), Some("200"));
        assert_eq!(header(&hs, "etag"), Some("\"a\""));
        assert_eq!(header(&hs, "ETAG"), Some("\"a\""));
        assert_eq!(header(&hs, "content-type"), None);
        assert_eq!(header(&[], ":status"), None);
    }

    #[test]
    fn an_overwrite_is_one_write_on_envoy() {
        let h = MockHost::envoy().with_value("k", b"old");
        assert_eq!(shared_set(&h, "k", b"new", None), Ok(()));
        assert_eq!((h.value("k").unwrap(), h.tries()), (b"new".to_vec(), 1));
    }

    #[test]
    fn an_overwrite_on_kong_reads_the_cas_and_writes_with_it() {
        let h = MockHost::kong().with_value("k", b"old");
        assert_eq!(shared_set(&h, "k", b"new", None), Ok(()));
        assert_eq!((h.value("k").unwrap(), h.tries()), (b"new".to_vec(), 2));
        // A new key is created at once.
        assert_eq!(shared_set(&h, "fresh", b"v", Some(0)), Ok(()));
        assert_eq!(h.tries(), 3);
    }

    #[test]
    fn an_overwrite_is_bounded_and_a_refused_read_stops_it() {
        let h = MockHost::kong().with_value("k", b"old").with_conflicts(100);
        assert_eq!(
            shared_set(&h, "k", b"new", None),
            Err(SetError::CasMismatch)
        );
        assert_eq!(h.tries(), OVERWRITE_TRIES);
        let h = MockHost::kong()
            .with_value("k", b"old")
            .refusing_reads(HostError::InternalFailure);
        assert_eq!(
            shared_set(&h, "k", b"new", None),
            Err(SetError::Refused(HostError::InternalFailure))
        );
        assert_eq!(h.value("k").unwrap(), b"old");
    }

    #[test]
    fn a_conditional_write_with_a_stale_cas_loses() {
        let h = MockHost::envoy().with_value("k", b"v");
        assert_eq!(
            shared_set(&h, "k", b"w", Some(7)),
            Err(SetError::CasMismatch)
        );
        assert_eq!((h.value("k").unwrap(), h.writes()), (b"v".to_vec(), 0));
    }

    #[test]
    fn a_missing_key_reads_as_empty() {
        let h = MockHost::envoy();
        assert_eq!(shared_get(&h, "none"), Some((Vec::new(), 0)));
        let h = h.refusing_reads(HostError::BadArgument);
        assert_eq!(shared_get(&h, "none"), None);
    }

    #[test]
    fn an_update_retries_past_conflicts_and_edits_the_latest_value() {
        for host in [MockHost::envoy(), MockHost::kong()] {
            let h = host.with_value("n", b"5").with_conflicts(3);
            assert_eq!(bump(&h, 8), Update::Written(6));
            assert_eq!(h.value("n").unwrap(), b"6");
            assert_eq!((h.tries(), h.writes()), (4, 1));
        }
    }

    #[test]
    fn an_update_gives_up_after_its_tries_and_writes_nothing() {
        let h = MockHost::envoy().with_value("n", b"5").with_conflicts(8);
        assert_eq!(bump(&h, 8), Update::GaveUp);
        assert_eq!((h.value("n").unwrap(), h.writes()), (b"5".to_vec(), 0));
    }

    /// The filter's bound: eight conflicts and the update is skipped after exactly eight
    /// reads; seven and the eighth try writes on top of the others' value.
    #[test]
    fn shared_updates_get_exactly_eight_tries() {
        assert_eq!(CAS_TRIES, 8);
        let h = MockHost::envoy().with_value("n", b"5").with_conflicts(8);
        assert_eq!(bump(&h, CAS_TRIES), Update::GaveUp);
        assert_eq!((h.tries(), h.writes()), (8, 0));
        let h = MockHost::envoy().with_value("n", b"5").with_conflicts(7);
        assert_eq!(bump(&h, CAS_TRIES), Update::Written(6));
        assert_eq!((h.tries(), h.writes()), (8, 1));
    }

    #[test]
    fn an_update_stops_at_a_refusal() {
        let h = MockHost::kong()
            .with_value("n", b"5")
            .refusing_writes(HostError::InternalFailure);
        assert_eq!(bump(&h, 8), Update::Refused(HostError::InternalFailure));
        assert_eq!(h.tries(), 1);
    }

    #[test]
    fn an_update_of_a_missing_key_starts_from_empty() {
        for host in [MockHost::envoy(), MockHost::kong()] {
            assert_eq!(bump(&host, 8), Update::Written(1));
            assert_eq!(host.value("n").unwrap(), b"1");
        }
    }

    #[test]
    fn a_declined_edit_writes_nothing() {
        let h = MockHost::envoy().with_value("n", b"5");
        let u = cas_update(&h, "n", 8, count, |n| n.to_string().into_bytes(), |_| false);
        assert_eq!((u, h.tries()), (Update::Declined, 0));
    }
}
