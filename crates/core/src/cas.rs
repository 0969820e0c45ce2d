//! Bounded compare-and-swap updates of shared data: read, change, write with the CAS of the
//! read, and on a conflict (another worker wrote in between) read again, at most `CAS_TRIES`
//! times. After that the update is skipped: the request never waits or fails for it, and the
//! next observation corrects the table.

/// How many times one update is tried before it is skipped.
pub const CAS_TRIES: usize = 8;

/// What one try of an update came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Try<T> {
    /// Finished with this value: written, nothing to write, or refused for good.
    Done(T),
    /// Another writer came first: read again and try once more.
    Conflict,
}

/// Runs `try_once` until it is done, at most `CAS_TRIES` times; `None` when every try met a
/// conflict (the update is skipped).
pub fn bounded<T>(mut try_once: impl FnMut() -> Try<T>) -> Option<T> {
    for _ in 0..CAS_TRIES {
        if let Try::Done(v) = try_once() {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shared value with a CAS that other writers bump `conflicts` times before ours.
    struct Contended {
        value: u64,
        cas: u32,
        conflicts: usize,
        reads: usize,
        writes: usize,
    }

    impl Contended {
        fn get(&mut self) -> (u64, u32) {
            self.reads += 1;
            (self.value, self.cas)
        }
        fn set(&mut self, v: u64, cas: u32) -> bool {
            self.writes += 1;
            if self.conflicts > 0 {
                // Another worker wrote between our read and our write.
                self.conflicts -= 1;
                self.value += 100;
                self.cas += 1;
            }
            if cas != self.cas {
                return false;
            }
            self.value = v;
            self.cas += 1;
            true
        }
    }

    fn increment(s: &mut Contended) -> Option<u64> {
        bounded(|| {
            let (v, cas) = s.get();
            if s.set(v + 1, cas) {
                Try::Done(v + 1)
            } else {
                Try::Conflict
            }
        })
    }

    #[test]
    fn eight_tries_then_the_update_is_skipped() {
        assert_eq!(CAS_TRIES, 8);
        let mut s = Contended {
            value: 0,
            cas: 1,
            conflicts: usize::MAX,
            reads: 0,
            writes: 0,
        };
        assert_eq!(increment(&mut s), None);
        assert_eq!((s.reads, s.writes), (8, 8));
    }

    #[test]
    fn the_eighth_try_still_writes_on_what_it_read() {
        let mut s = Contended {
            value: 0,
            cas: 1,
            conflicts: 7,
            reads: 0,
            writes: 0,
        };
        // Seven other writers came first (each +100): ours lands on top of theirs.
        assert_eq!(increment(&mut s), Some(701));
        assert_eq!((s.reads, s.writes, s.value), (8, 8, 701));
    }

    #[test]
    fn done_ends_at_once() {
        let mut calls = 0;
        assert_eq!(
            bounded(|| {
                calls += 1;
                Try::Done(calls)
            }),
            Some(1)
        );
        let mut calls = 0;
        let r: Option<()> = bounded(|| {
            calls += 1;
            Try::Conflict
        });
        assert_eq!((r, calls), (None, CAS_TRIES));
    }
}
