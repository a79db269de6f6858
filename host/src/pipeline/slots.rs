//! The worker's table of dispatched messages, by slot number.
//!
//! Owns the numbering: [`Slots::insert`] stores a value and returns a [`Slot`] that finds it
//! again until it is removed. A slot is an index into a dense array plus the generation of that
//! index, so a lookup is one array access (no hashing), freed indexes are reused while the
//! numbers stay distinct: a report that arrives for a slot already removed (a message abandoned
//! meanwhile) finds nothing, even when its index holds another message by then. A generation
//! wraps after 2³² reuses of one index, far beyond the life of any report.
//!
//! Knows nothing of what it stores. Owned by one task; no locks.

/// The number of a stored value: its index (low 32 bits) and that index's generation (high).
pub type Slot = u64;

#[derive(Debug)]
struct Entry<T> {
    generation: u32,
    /// The value, or (free) the next free index.
    value: Result<T, u32>,
}

/// Values by [`Slot`], in a dense array whose free entries are reused, most recent first.
#[derive(Debug)]
pub struct Slots<T> {
    entries: Vec<Entry<T>>,
    /// The most recently freed index, or `NONE`.
    free: u32,
    len: usize,
}

const NONE: u32 = u32::MAX;

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            free: NONE,
            len: 0,
        }
    }
}

impl<T> Slots<T> {
    /// Store `value`; its slot finds it until it is removed.
    pub fn insert(&mut self, value: T) -> Slot {
        self.len += 1;
        let index = if self.free == NONE {
            let index = self.entries.len() as u32;
            assert!(index != NONE, "more than 2^32 - 1 slots in use");
            self.entries.push(Entry {
                generation: 0,
                value: Ok(value),
            });
            index
        } else {
            let index = self.free;
            let entry = &mut self.entries[index as usize];
            self.free = match entry.value {
                Err(next) => next,
                Ok(_) => unreachable!("a free index holds a value"),
            };
            entry.value = Ok(value);
            index
        };
        Slot::from(self.entries[index as usize].generation) << 32 | Slot::from(index)
    }

    /// The entry of `slot`, if it still holds that slot's value.
    fn entry(&self, slot: Slot) -> Option<&Entry<T>> {
        self.entries
            .get((slot & 0xffff_ffff) as usize)
            .filter(|e| e.generation == (slot >> 32) as u32 && e.value.is_ok())
    }

    /// The value of `slot`, unless it was removed.
    pub fn get(&self, slot: Slot) -> Option<&T> {
        self.entry(slot).and_then(|e| e.value.as_ref().ok())
    }

    /// The value of `slot`, mutably, unless it was removed.
    pub fn get_mut(&mut self, slot: Slot) -> Option<&mut T> {
        self.entry(slot)?;
        self.entries[(slot & 0xffff_ffff) as usize]
            .value
            .as_mut()
            .ok()
    }

    /// Whether `slot` still holds its value.
    pub fn contains(&self, slot: Slot) -> bool {
        self.entry(slot).is_some()
    }

    /// Take the value of `slot` out; the slot finds nothing from now on.
    pub fn remove(&mut self, slot: Slot) -> Option<T> {
        self.entry(slot)?;
        let index = (slot & 0xffff_ffff) as u32;
        let entry = &mut self.entries[index as usize];
        entry.generation = entry.generation.wrapping_add(1);
        let value = std::mem::replace(&mut entry.value, Err(self.free)).ok();
        self.free = index;
        self.len -= 1;
        value
    }

    /// Values stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn a_removed_slot_finds_nothing_even_when_its_index_is_reused() {
        let mut slots = Slots::default();
        let a = slots.insert("a");
        assert_eq!(slots.remove(a), Some("a"));
        let b = slots.insert("b");
        assert_ne!(a, b);
        assert_eq!(a & 0xffff_ffff, b & 0xffff_ffff, "the index is reused");
        assert_eq!(slots.get(a), None);
        assert!(!slots.contains(a));
        assert_eq!(slots.remove(a), None);
        assert_eq!(slots.get(b), Some(&"b"));
        assert_eq!(slots.len(), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert,
        Remove(usize),
        Mutate(usize),
    }

    proptest! {
        /// Against a map from ever-increasing numbers: every slot issued (live or removed)
        /// answers as the map does, and no two slots issued are equal.
        #[test]
        fn slots_behave_like_a_map_of_unique_numbers(
            ops in proptest::collection::vec(
                prop_oneof![
                    3 => Just(Op::Insert),
                    2 => any::<usize>().prop_map(Op::Remove),
                    1 => any::<usize>().prop_map(Op::Mutate),
                ],
                0..400,
            ),
        ) {
            let mut slots = Slots::default();
            let mut model: HashMap<Slot, u32> = HashMap::new();
            let mut issued: Vec<Slot> = Vec::new();
            for (n, op) in ops.into_iter().enumerate() {
                let n = n as u32;
                match op {
                    Op::Insert => {
                        let slot = slots.insert(n);
                        prop_assert!(!issued.contains(&slot), "slot {} issued twice", slot);
                        issued.push(slot);
                        model.insert(slot, n);
                    }
                    Op::Remove(i) if !issued.is_empty() => {
                        let slot = issued[i % issued.len()];
                        prop_assert_eq!(slots.remove(slot), model.remove(&slot));
                    }
                    Op::Mutate(i) if !issued.is_empty() => {
                        let slot = issued[i % issued.len()];
                        if let Some(value) = slots.get_mut(slot) {
                            *value += 1_000_000;
                        }
                        if let Some(value) = model.get_mut(&slot) {
                            *value += 1_000_000;
                        }
                    }
                    _ => {}
                }
                prop_assert_eq!(slots.len(), model.len());
                for slot in &issued {
                    prop_assert_eq!(slots.get(*slot), model.get(slot));
                    prop_assert_eq!(slots.contains(*slot), model.contains_key(slot));
                }
            }
        }
    }
}
