//! Which Kafka offset of a partition may be stored (SEMANTICS §1.5).
//!
//! Owns the bookkeeping between "received" and "safe to commit": messages complete in any order
//! (different keys run in parallel), but a partition's offset may only move to the highest
//! *contiguous* completed offset, so that a crash replays at most the uncommitted tail.
//!
//! Knows nothing of Kafka clients, the store or handlers: the caller says when a message was
//! received ([`OffsetTracker::track`]) and when it is done — committed or dead-lettered
//! ([`OffsetTracker::complete`]) — and asks what to store ([`OffsetTracker::committable`]).
//!
//! Offsets follow the Kafka convention: the value to store is the *next* offset to consume, one
//! past the last completed message. Offsets that were never tracked (compacted away, transaction
//! markers, aborted records) are not waited for.

use std::collections::{BTreeMap, VecDeque};

/// A misuse of an [`OffsetTracker`]; the tracker is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffsetError {
    /// `track` was given an offset not above the last tracked one.
    #[error("offset {offset} tracked after offset {last}; offsets must increase")]
    NotIncreasing {
        /// The refused offset.
        offset: i64,
        /// The last offset tracked.
        last: i64,
    },
    /// `complete` was given an offset that is not tracked (never was, or already released).
    #[error("offset {offset} completed but not tracked")]
    NotTracked {
        /// The refused offset.
        offset: i64,
    },
    /// `complete` was given an offset twice.
    #[error("offset {offset} completed twice")]
    AlreadyCompleted {
        /// The refused offset.
        offset: i64,
    },
}

/// One tracked offset and whether its message is done.
#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: i64,
    done: bool,
}

/// The offsets of one partition between "received" and "stored".
///
/// Holds the tracked offsets that cannot be released yet (the incomplete ones and the completed
/// ones behind them) in increasing order. `track` is amortised O(1), `complete` O(log n) plus the
/// amortised O(1) release of the completed prefix. The buffer is reused: steady-state operation
/// does not allocate.
#[derive(Debug, Clone, Default)]
pub struct OffsetTracker {
    /// Tracked offsets not yet released, increasing; the front is incomplete (or the deque empty).
    pending: VecDeque<Entry>,
    /// The last offset released (completed with everything tracked before it), since `reset`.
    released: Option<i64>,
    /// The last offset tracked since `reset`.
    last_tracked: Option<i64>,
    /// Tracked offsets not yet completed.
    in_flight: usize,
    /// What [`Self::take_committable`] returned last.
    taken: Option<i64>,
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record that the message at `offset` was received. Offsets must increase; gaps are fine.
    pub fn track(&mut self, offset: i64) -> Result<(), OffsetError> {
        if let Some(last) = self.last_tracked
            && offset <= last
        {
            return Err(OffsetError::NotIncreasing { offset, last });
        }
        self.pending.push_back(Entry {
            offset,
            done: false,
        });
        self.last_tracked = Some(offset);
        self.in_flight += 1;
        Ok(())
    }

    /// Record that the message at `offset` is done (its transaction committed, or it was
    /// dead-lettered). Any order is fine.
    pub fn complete(&mut self, offset: i64) -> Result<(), OffsetError> {
        let index = self
            .pending
            .binary_search_by_key(&offset, |entry| entry.offset)
            .map_err(|_| OffsetError::NotTracked { offset })?;
        let entry = &mut self.pending[index];
        if entry.done {
            return Err(OffsetError::AlreadyCompleted { offset });
        }
        entry.done = true;
        self.in_flight -= 1;
        while let Some(front) = self.pending.front()
            && front.done
        {
            self.released = Some(front.offset);
            self.pending.pop_front();
        }
        Ok(())
    }

    /// The offset to store: one past the highest offset `o` such that every tracked offset up to
    /// `o` is complete. Never beyond the lowest incomplete tracked offset; never decreases until
    /// [`Self::reset`]. `None` until the first tracked offset completes (storing it would change
    /// nothing).
    pub fn committable(&self) -> Option<i64> {
        let released = self.released?;
        Some(match self.pending.front() {
            // Everything between the released offset and the first incomplete one was never
            // tracked, so the consumer may skip straight to the incomplete one.
            Some(front) => front.offset,
            None => released.saturating_add(1),
        })
    }

    /// [`Self::committable`], but only when it moved since the last call: what the offset
    /// committer should store now, if anything.
    pub fn take_committable(&mut self) -> Option<i64> {
        let committable = self.committable();
        if committable == self.taken {
            return None;
        }
        self.taken = committable;
        committable
    }

    /// Tracked offsets not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Tracked offsets not yet released: the incomplete ones plus the completed ones waiting
    /// behind the lowest incomplete one. The caller bounds this (a stuck message at the front
    /// holds everything behind it).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The last offset tracked since the last reset.
    pub fn last_tracked(&self) -> Option<i64> {
        self.last_tracked
    }

    /// Forget everything, e.g. when the partition is revoked. Keeps the buffer's capacity.
    pub fn reset(&mut self) {
        self.pending.clear();
        self.released = None;
        self.last_tracked = None;
        self.in_flight = 0;
        self.taken = None;
    }
}

/// One [`OffsetTracker`] per assigned partition of a binding. `P` names a partition: a Kafka
/// partition number, or a `(topic index, partition)` pair when a binding reads several topics.
#[derive(Debug, Clone)]
pub struct PartitionOffsets<P = i32> {
    trackers: BTreeMap<P, OffsetTracker>,
}

impl<P> Default for PartitionOffsets<P> {
    fn default() -> Self {
        Self {
            trackers: BTreeMap::new(),
        }
    }
}

impl<P: Ord + Copy> PartitionOffsets<P> {
    /// No partitions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Start tracking `partition` (a no-op when it is already assigned).
    pub fn assign(&mut self, partition: P) {
        self.trackers.entry(partition).or_default();
    }

    /// Forget `partition` (on revoke). Returns whether it was assigned.
    pub fn revoke(&mut self, partition: P) -> bool {
        self.trackers.remove(&partition).is_some()
    }

    /// The tracker of `partition`, if assigned.
    pub fn get(&self, partition: P) -> Option<&OffsetTracker> {
        self.trackers.get(&partition)
    }

    /// [`OffsetTracker::track`] on `partition`, assigning it if needed.
    pub fn track(&mut self, partition: P, offset: i64) -> Result<(), OffsetError> {
        self.trackers.entry(partition).or_default().track(offset)
    }

    /// [`OffsetTracker::complete`] on `partition`. A partition that is not assigned (revoked
    /// while the message ran) is [`OffsetError::NotTracked`]: its offset must not be stored.
    pub fn complete(&mut self, partition: P, offset: i64) -> Result<(), OffsetError> {
        match self.trackers.get_mut(&partition) {
            Some(tracker) => tracker.complete(offset),
            None => Err(OffsetError::NotTracked { offset }),
        }
    }

    /// `(partition, offset to store)` for every partition whose committable offset moved since
    /// the last call, in partition order.
    pub fn take_committable(&mut self) -> impl Iterator<Item = (P, i64)> + '_ {
        self.trackers
            .iter_mut()
            .filter_map(|(partition, tracker)| Some((*partition, tracker.take_committable()?)))
    }

    /// Messages in flight across all partitions.
    pub fn in_flight(&self) -> usize {
        self.trackers.values().map(OffsetTracker::in_flight).sum()
    }

    /// Assigned partitions, in order.
    pub fn partitions(&self) -> impl Iterator<Item = P> + '_ {
        self.trackers.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nothing_committable_until_the_first_offset_completes() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.committable(), None);
        t.track(10).unwrap();
        t.track(11).unwrap();
        t.complete(11).unwrap();
        assert_eq!(t.committable(), None);
        t.complete(10).unwrap();
        assert_eq!(t.committable(), Some(12));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn gaps_are_not_waited_for() {
        let mut t = OffsetTracker::new();
        t.track(5).unwrap();
        t.track(8).unwrap(); // 6 and 7 compacted away
        t.complete(5).unwrap();
        // 6 and 7 will never arrive: the consumer resumes at 8, the lowest incomplete offset.
        assert_eq!(t.committable(), Some(8));
        t.complete(8).unwrap();
        assert_eq!(t.committable(), Some(9));
        // After release, the next tracked offset (past a gap) becomes the bound.
        t.track(20).unwrap();
        assert_eq!(t.committable(), Some(20));
    }

    #[test]
    fn a_slow_message_holds_the_offset_back() {
        let mut t = OffsetTracker::new();
        for o in 0..5 {
            t.track(o).unwrap();
        }
        t.complete(0).unwrap();
        for o in 2..5 {
            t.complete(o).unwrap();
        }
        assert_eq!(t.committable(), Some(1));
        assert_eq!(t.in_flight(), 1);
        assert_eq!(t.pending(), 4);
        t.complete(1).unwrap();
        assert_eq!(t.committable(), Some(5));
    }

    #[test]
    fn misuse_is_refused_and_changes_nothing() {
        let mut t = OffsetTracker::new();
        t.track(3).unwrap();
        assert_eq!(
            t.track(3),
            Err(OffsetError::NotIncreasing { offset: 3, last: 3 })
        );
        assert_eq!(
            t.track(1),
            Err(OffsetError::NotIncreasing { offset: 1, last: 3 })
        );
        assert_eq!(t.complete(4), Err(OffsetError::NotTracked { offset: 4 }));
        t.track(4).unwrap();
        t.complete(4).unwrap();
        assert_eq!(
            t.complete(4),
            Err(OffsetError::AlreadyCompleted { offset: 4 })
        );
        t.complete(3).unwrap();
        // Released offsets are no longer tracked.
        assert_eq!(t.complete(3), Err(OffsetError::NotTracked { offset: 3 }));
        assert_eq!(t.committable(), Some(5));
        assert_eq!(
            OffsetError::NotIncreasing { offset: 1, last: 3 }.to_string(),
            "offset 1 tracked after offset 3; offsets must increase"
        );
    }

    #[test]
    fn reset_forgets_and_allows_lower_offsets() {
        let mut t = OffsetTracker::new();
        t.track(100).unwrap();
        t.complete(100).unwrap();
        assert_eq!(t.take_committable(), Some(101));
        t.reset();
        assert_eq!(t.committable(), None);
        assert_eq!(t.last_tracked(), None);
        t.track(50).unwrap();
        t.complete(50).unwrap();
        assert_eq!(t.take_committable(), Some(51));
    }

    #[test]
    fn take_committable_reports_only_moves() {
        let mut t = OffsetTracker::new();
        t.track(0).unwrap();
        t.track(1).unwrap();
        assert_eq!(t.take_committable(), None);
        t.complete(0).unwrap();
        assert_eq!(t.take_committable(), Some(1));
        assert_eq!(t.take_committable(), None);
        t.complete(1).unwrap();
        assert_eq!(t.take_committable(), Some(2));
        assert_eq!(t.take_committable(), None);
    }

    #[test]
    fn partition_offsets_keep_partitions_apart() {
        let mut p = PartitionOffsets::<i32>::new();
        p.track(0, 10).unwrap();
        p.track(1, 10).unwrap();
        p.track(1, 11).unwrap();
        p.complete(1, 10).unwrap();
        assert_eq!(p.in_flight(), 2);
        assert_eq!(p.take_committable().collect::<Vec<_>>(), vec![(1, 11)]);
        p.complete(0, 10).unwrap();
        p.complete(1, 11).unwrap();
        assert_eq!(
            p.take_committable().collect::<Vec<_>>(),
            vec![(0, 11), (1, 12)]
        );
        assert_eq!(p.take_committable().count(), 0);
        assert!(p.revoke(1));
        assert!(!p.revoke(1));
        // A message of a revoked partition finishing late must not be stored.
        assert_eq!(
            p.complete(1, 12),
            Err(OffsetError::NotTracked { offset: 12 })
        );
        p.assign(2);
        assert_eq!(p.partitions().collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(p.get(2).map(OffsetTracker::in_flight), Some(0));
    }

    /// What `committable` must be, computed the slow way from the tracked offsets so far.
    fn expected(tracked: &[i64], done: &[bool]) -> Option<i64> {
        let first = *tracked.first()?;
        let value = match done.iter().position(|d| !d) {
            Some(i) => tracked[i],
            None => tracked[tracked.len() - 1] + 1,
        };
        (value != first).then_some(value)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Offsets arrive increasing with random gaps, interleaved with completions in random
        /// order; after every step `committable` equals the model, never decreases, and ends at
        /// last + 1.
        #[test]
        fn committable_is_the_contiguous_completed_prefix(
            start in 0i64..1_000_000,
            gaps in proptest::collection::vec(1i64..5, 1..200),
            steps in proptest::collection::vec((any::<bool>(), any::<usize>()), 0..400),
        ) {
            let offsets: Vec<i64> = gaps
                .iter()
                .scan(start, |next, gap| {
                    let offset = *next;
                    *next += gap;
                    Some(offset)
                })
                .collect();
            let mut tracker = OffsetTracker::new();
            let mut tracked: Vec<i64> = Vec::new();
            let mut done: Vec<bool> = Vec::new();
            let mut previous: Option<i64> = None;
            let mut step = |tracker: &mut OffsetTracker, tracked: &mut Vec<i64>, done: &mut Vec<bool>, track: bool, pick: usize| {
                let incomplete: Vec<usize> = (0..done.len()).filter(|&i| !done[i]).collect();
                if (track || incomplete.is_empty()) && tracked.len() < offsets.len() {
                    let offset = offsets[tracked.len()];
                    tracker.track(offset).unwrap();
                    tracked.push(offset);
                    done.push(false);
                } else if !incomplete.is_empty() {
                    let i = incomplete[pick % incomplete.len()];
                    tracker.complete(tracked[i]).unwrap();
                    done[i] = true;
                }
                let committable = tracker.committable();
                assert_eq!(committable, expected(tracked, done));
                assert!(committable >= previous, "{committable:?} < {previous:?}");
                previous = committable;
                assert_eq!(tracker.in_flight(), done.iter().filter(|d| !**d).count());
            };
            for (track, pick) in steps {
                step(&mut tracker, &mut tracked, &mut done, track, pick);
            }
            // Drain: track the rest and complete everything, still in a scrambled order.
            let mut salt = 0usize;
            while tracked.len() < offsets.len() || done.iter().any(|d| !d) {
                salt = salt.wrapping_mul(31).wrapping_add(7);
                step(&mut tracker, &mut tracked, &mut done, salt.is_multiple_of(3), salt);
            }
            prop_assert_eq!(tracker.committable(), Some(offsets[offsets.len() - 1] + 1));
            prop_assert_eq!(tracker.in_flight(), 0);
            prop_assert_eq!(tracker.pending(), 0);
        }
    }
}
