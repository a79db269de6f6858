//! The handler version a worker runs, swappable while it runs (SEMANTICS §4, hot swap).
//!
//! Owns [`HandlerSlot`]: one binding's active [`HandlerPool`] and its version number, shared by
//! whoever activates versions (`serve`'s reconciliation) and the worker that dispatches
//! messages. [`HandlerSlot::swap`] puts a new version in; every invocation dispatched after it
//! runs the new version, while invocations already running keep the pool they started with (an
//! `Arc`), so they finish on their version and the old pool is dropped with the last of them.
//! Nothing restarts: the consumer, its assignment and its queued messages stay as they are.
//!
//! The hot path reads one atomic: a reader ([`HandlerReader`]) keeps the version it last saw and
//! the slot's generation, and takes the lock (never held across an await, never contended but
//! by a swap) only when the generation moved. Knows nothing of Kafka, the store or how
//! components are compiled.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::runtime::HandlerPool;

/// A handler version, ready to run: `pool` is its instances (an `Arc<HandlerPool>`, or a
/// stand-in in tests).
#[derive(Clone)]
pub struct ActiveHandler<H = Arc<HandlerPool>> {
    /// Its instances.
    pub pool: H,
    /// Its version number, recorded in the DLQ entries of the messages it fails.
    pub version: Option<i32>,
}

impl<H> std::fmt::Debug for ActiveHandler<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveHandler")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The active handler version of one binding, shared between the worker and whoever activates
/// versions. Cheap to clone; every clone sees the same slot.
pub struct HandlerSlot<H = Arc<HandlerPool>>(Arc<Shared<H>>);

impl<H> Clone for HandlerSlot<H> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<H: Clone> std::fmt::Debug for HandlerSlot<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("HandlerSlot").field(&self.current()).finish()
    }
}

struct Shared<H> {
    /// Bumped after every swap, once the new version is in place.
    generation: AtomicU64,
    active: RwLock<ActiveHandler<H>>,
}

impl<H: Clone> HandlerSlot<H> {
    /// A slot holding `pool`, version `version`.
    pub fn new(pool: H, version: Option<i32>) -> Self {
        Self(Arc::new(Shared {
            generation: AtomicU64::new(0),
            active: RwLock::new(ActiveHandler { pool, version }),
        }))
    }

    /// The version in the slot now.
    pub fn current(&self) -> ActiveHandler<H> {
        self.0
            .active
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Put `pool`, version `version`, in the slot; returns the version it replaces. Invocations
    /// dispatched from now on run the new one.
    pub fn swap(&self, pool: H, version: Option<i32>) -> ActiveHandler<H> {
        let previous = {
            let mut active = self
                .0
                .active
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            std::mem::replace(&mut *active, ActiveHandler { pool, version })
        };
        self.0.generation.fetch_add(1, Ordering::Release);
        previous
    }

    /// A reader of the slot, for the one task that dispatches.
    pub fn reader(&self) -> HandlerReader<H> {
        let generation = self.0.generation.load(Ordering::Acquire);
        HandlerReader {
            cached: self.current(),
            generation,
            slot: self.clone(),
        }
    }
}

/// Reads a [`HandlerSlot`] cheaply: one atomic load per read while no swap happened.
pub struct HandlerReader<H = Arc<HandlerPool>> {
    slot: HandlerSlot<H>,
    cached: ActiveHandler<H>,
    generation: u64,
}

impl<H: Clone> HandlerReader<H> {
    /// The version in the slot now.
    pub fn get(&mut self) -> &ActiveHandler<H> {
        // A swap writes the version before it bumps the generation, so a reader that sees the
        // new generation reads the new version (or a later one, whose bump it sees next time).
        let generation = self.slot.0.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.cached = self.slot.current();
            self.generation = generation;
        }
        &self.cached
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_reader_sees_a_swap_at_its_next_read_and_what_was_taken_stays() {
        let first = Arc::new("v1");
        let second = Arc::new("v2");
        let slot = HandlerSlot::new(first.clone(), Some(1));
        let mut reader = slot.reader();
        // An invocation takes the version when it is dispatched...
        let taken = reader.get().clone();
        assert_eq!(taken.version, Some(1));

        let previous = slot.swap(second.clone(), Some(2));
        assert_eq!(previous.version, Some(1));
        assert!(Arc::ptr_eq(&previous.pool, &first));
        // ...the next one gets the new version...
        assert_eq!(reader.get().version, Some(2));
        assert!(Arc::ptr_eq(&reader.get().pool, &second));
        // ...and the one already running keeps the old.
        assert!(Arc::ptr_eq(&taken.pool, &first));
        assert_eq!(slot.current().version, Some(2));
        // A rollback is a swap too; readers made later start from the current version.
        slot.swap(first.clone(), Some(1));
        assert_eq!(reader.get().version, Some(1));
        assert_eq!(slot.reader().get().version, Some(1));
        drop(previous);
        drop(taken);
        // Once nobody runs it any more, the replaced version is freed.
        assert_eq!(Arc::strong_count(&second), 1);
    }

    #[test]
    fn readers_on_other_threads_see_every_swap_eventually() {
        let slot = HandlerSlot::new(Arc::new(0u32), Some(0));
        let reader_slot = slot.clone();
        let reader = std::thread::spawn(move || {
            let mut reader = reader_slot.reader();
            let mut last = 0;
            while last < 1000 {
                let active = reader.get();
                let seen = active.version.unwrap();
                // Versions only go up here: a reader never sees an older one after a newer,
                // nor a version with another version's pool.
                assert!(seen >= last);
                assert_eq!(*active.pool as i32, seen);
                last = seen;
            }
        });
        for v in 1..=1000u32 {
            slot.swap(Arc::new(v), Some(v as i32));
        }
        reader.join().unwrap();
    }
}
