//! Key-ordered dispatch for one binding (SEMANTICS §2).
//!
//! Owns the rule that decides which received message may run *now*: under the default
//! [`Ordering::Key`], two messages with the same key of the same partition never run at the same
//! time and never out of order — retries included — while other keys run in parallel up to the
//! binding's `max_in_flight`. [`Ordering::Partition`] runs one message per partition at a time;
//! [`Ordering::None`] only bounds the number in flight.
//!
//! Knows nothing of Kafka, handlers, retries or time. The caller pushes received messages,
//! takes [`Ticket`]s from [`KeyScheduler::next_ready`] and hands each ticket back with
//! [`KeyScheduler::finish`] once its message is done for good (committed or dead-lettered). A
//! message waiting for its retry backoff is still in flight: the caller keeps its ticket, so its
//! key stays occupied and later messages of that key wait, while other keys flow on.
//!
//! The scheduler bounds what runs, not what waits: the caller bounds the queue by watching
//! [`KeyScheduler::len`] and pausing intake.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::num::NonZeroUsize;

use serde::{Deserialize, Serialize};

/// How a binding orders its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// One message at a time per (partition, key), in offset order; different keys in parallel.
    /// A message without a key has no ordering constraint: it runs as if it had a key of its
    /// own (it gets no keyed state either, SEMANTICS §2).
    #[default]
    Key,
    /// One message at a time per partition, in offset order.
    Partition,
    /// No ordering: any message may run, up to `max_in_flight`.
    None,
}

/// A message the scheduler handed out. It occupies its key (or partition) and one in-flight slot
/// until it is given back to [`KeyScheduler::finish`] on the scheduler that issued it; a ticket
/// that is dropped instead leaves its key blocked for good.
#[derive(Debug)]
#[must_use = "a ticket must be given back to KeyScheduler::finish, or its key stays blocked"]
pub struct Ticket<M, P = i32> {
    message: M,
    partition: P,
    lane: Option<LaneKey<P>>,
    /// Whether the ticket still holds an in-flight slot (see [`KeyScheduler::release_slot`]).
    slot: bool,
}

impl<M, P: Copy> Ticket<M, P> {
    /// A message ready to be handed out: it holds an in-flight slot once it is.
    fn ready(message: M, partition: P, lane: Option<LaneKey<P>>) -> Self {
        Self {
            message,
            partition,
            lane,
            slot: true,
        }
    }

    /// The message to run.
    pub fn message(&self) -> &M {
        &self.message
    }

    /// The message to run, mutably (e.g. to count attempts).
    pub fn message_mut(&mut self) -> &mut M {
        &mut self.message
    }

    /// The partition the message came from.
    pub fn partition(&self) -> P {
        self.partition
    }
}

/// What serialises messages: a (partition, key hash) pair, or the partition alone (key 0) under
/// [`Ordering::Partition`]. Two keys whose hashes collide share a lane: they are serialised
/// together, which costs parallelism but never correctness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct LaneKey<P> {
    partition: P,
    key: u64,
}

/// An occupied lane: one of its messages is ready or out (running or settling), and these wait
/// behind it, as a linked list through the node slab.
#[derive(Debug, Clone, Copy)]
struct Lane {
    head: usize,
    tail: usize,
    len: usize,
}

impl Lane {
    /// A lane with nothing waiting.
    const EMPTY: Self = Self {
        head: NIL,
        tail: NIL,
        len: 0,
    };
}

/// Slab node: a waiting message and the next node of its lane (or of the free list).
#[derive(Debug)]
struct Node<M> {
    message: Option<M>,
    next: usize,
}

const NIL: usize = usize::MAX;

/// The key-ordered dispatcher of one binding. Owned by one task; no locks.
///
/// Invariants: a lane exists exactly while one of its messages is in the ready queue or out as
/// a ticket — at most one of the two — and its list holds the messages that wait behind that
/// one. A message that may run sits in the ready queue as the ticket it will be handed out as,
/// so handing it out touches nothing else; only a message of an occupied lane waits in the slab.
/// Slab nodes are reused and lanes are removed when they empty, so steady-state operation does
/// not allocate (the lane map, slab and ready queue keep their capacity).
#[derive(Debug)]
pub struct KeyScheduler<M, P = i32> {
    ordering: Ordering,
    max_in_flight: usize,
    in_flight: usize,
    /// Tickets out whose slot was released early: their keys stay occupied.
    settling: usize,
    queued: usize,
    key_hasher: foldhash::fast::RandomState,
    lanes: HashMap<LaneKey<P>, Lane, foldhash::fast::RandomState>,
    nodes: Vec<Node<M>>,
    free: usize,
    /// Messages that may run, in the order they became free to.
    ready: VecDeque<Ticket<M, P>>,
}

impl<M, P: Copy + Eq + Hash> KeyScheduler<M, P> {
    /// An empty scheduler. `P` names a partition: a Kafka partition number, or a
    /// `(topic index, partition)` pair when the binding reads several topics.
    pub fn new(ordering: Ordering, max_in_flight: NonZeroUsize) -> Self {
        Self {
            ordering,
            max_in_flight: max_in_flight.get(),
            in_flight: 0,
            settling: 0,
            queued: 0,
            key_hasher: foldhash::fast::RandomState::default(),
            lanes: HashMap::default(),
            nodes: Vec::new(),
            free: NIL,
            ready: VecDeque::new(),
        }
    }

    /// The ordering this scheduler keeps.
    pub fn ordering(&self) -> Ordering {
        self.ordering
    }

    /// The in-flight bound.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// Change the in-flight bound (e.g. to let only probe messages through a half-open breaker).
    /// Lowering it below the number in flight hands nothing out until enough tickets finish.
    pub fn set_max_in_flight(&mut self, max_in_flight: NonZeroUsize) {
        self.max_in_flight = max_in_flight.get();
    }

    /// Queue a received message. `key` is the Kafka message key; `None` for a keyless message.
    /// Messages of a partition must be pushed in offset order.
    pub fn push(&mut self, partition: P, key: Option<&[u8]>, message: M) {
        self.queued += 1;
        let lane_key = match (self.ordering, key) {
            (Ordering::Key, Some(key)) => LaneKey {
                partition,
                key: self.key_hasher.hash_one(key),
            },
            (Ordering::Partition, _) => LaneKey { partition, key: 0 },
            (Ordering::Key, None) | (Ordering::None, _) => {
                self.ready
                    .push_back(Ticket::ready(message, partition, None));
                return;
            }
        };
        match self.lanes.entry(lane_key) {
            Entry::Vacant(vacant) => {
                vacant.insert(Lane::EMPTY);
                self.ready
                    .push_back(Ticket::ready(message, partition, Some(lane_key)));
            }
            Entry::Occupied(mut occupied) => {
                let lane = occupied.get_mut();
                let node = alloc(&mut self.nodes, &mut self.free, message);
                if lane.len == 0 {
                    lane.head = node;
                } else {
                    self.nodes[lane.tail].next = node;
                }
                lane.tail = node;
                lane.len += 1;
            }
        }
    }

    /// A message that may run now, if any: the in-flight bound leaves room and its key (or
    /// partition) is free. Lanes become ready in the order they were unblocked, so no key starves.
    #[must_use = "a ticket must be given back to KeyScheduler::finish, or its key stays blocked"]
    pub fn next_ready(&mut self) -> Option<Ticket<M, P>> {
        if self.in_flight >= self.max_in_flight {
            return None;
        }
        let ticket = self.ready.pop_front()?;
        self.in_flight += 1;
        self.queued -= 1;
        Some(ticket)
    }

    /// Give a ticket back: its message is done (committed or dead-lettered). Frees its in-flight
    /// slot and lets the next message of its key run. Returns the message.
    pub fn finish(&mut self, ticket: Ticket<M, P>) -> M {
        if ticket.slot {
            debug_assert!(self.in_flight > 0, "finish without a ticket out");
            self.in_flight = self.in_flight.saturating_sub(1);
        } else {
            debug_assert!(
                self.settling > 0,
                "finish of a settling ticket never released"
            );
            self.settling = self.settling.saturating_sub(1);
        }
        if let Some(lane_key) = ticket.lane
            && let Entry::Occupied(mut occupied) = self.lanes.entry(lane_key)
        {
            let lane = occupied.get_mut();
            if lane.len == 0 {
                occupied.remove();
            } else {
                let node = lane.head;
                lane.head = self.nodes[node].next;
                lane.len -= 1;
                match release(&mut self.nodes, &mut self.free, node) {
                    Some(message) => self.ready.push_back(Ticket::ready(
                        message,
                        lane_key.partition,
                        Some(lane_key),
                    )),
                    None => debug_assert!(false, "a waiting node is empty"),
                }
            }
        }
        ticket.message
    }

    /// Free a ticket's in-flight slot while its key (or partition) stays occupied until
    /// [`Self::finish`]: for a message whose work is done but not yet committed, so that other
    /// keys may run meanwhile. Idempotent.
    pub fn release_slot(&mut self, ticket: &mut Ticket<M, P>) {
        if ticket.slot {
            ticket.slot = false;
            self.in_flight = self.in_flight.saturating_sub(1);
            self.settling += 1;
        }
    }

    /// Tickets out, running or settling: what a drain waits for.
    pub fn outstanding(&self) -> usize {
        self.in_flight + self.settling
    }

    /// Drop the queued messages of `partition` (on revoke) and return them, each key's in push
    /// order. Tickets already out stay valid and keep their keys occupied until finished, so a
    /// partition assigned back at once cannot overtake a message still running.
    pub fn revoke(&mut self, partition: P) -> Vec<M> {
        let mut dropped = Vec::new();
        // The partition's ready messages go first (each is ahead of its lane's waiting ones);
        // their lanes have nothing out, so they go with them.
        let mut idle = Vec::new();
        for _ in 0..self.ready.len() {
            match self.ready.pop_front() {
                Some(ticket) if ticket.partition == partition => {
                    idle.extend(ticket.lane);
                    dropped.push(ticket.message);
                }
                Some(other) => self.ready.push_back(other),
                None => break,
            }
        }
        for lane_key in idle {
            if let Some(lane) = self.lanes.remove(&lane_key) {
                drain_lane(&mut self.nodes, &mut self.free, lane, &mut dropped);
            }
        }
        // What is left of the partition's lanes has a ticket out: it keeps its key occupied.
        let nodes = &mut self.nodes;
        let free = &mut self.free;
        for (_, lane) in self
            .lanes
            .iter_mut()
            .filter(|(lane_key, _)| lane_key.partition == partition)
        {
            drain_lane(nodes, free, *lane, &mut dropped);
            *lane = Lane::EMPTY;
        }
        self.queued -= dropped.len();
        dropped
    }

    /// Messages waiting to run.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Tickets out.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Messages held: queued, in flight or settling. The caller pauses intake when this reaches
    /// the binding's queue bound.
    pub fn len(&self) -> usize {
        self.queued + self.in_flight + self.settling
    }

    /// Nothing queued and nothing in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Store `message` in a slab node, reusing a free one when there is one.
fn alloc<M>(nodes: &mut Vec<Node<M>>, free: &mut usize, message: M) -> usize {
    let node = Node {
        message: Some(message),
        next: NIL,
    };
    if *free == NIL {
        nodes.push(node);
        nodes.len() - 1
    } else {
        let at = *free;
        *free = nodes[at].next;
        nodes[at] = node;
        at
    }
}

/// Take the message out of `node` and put the node on the free list.
fn release<M>(nodes: &mut [Node<M>], free: &mut usize, node: usize) -> Option<M> {
    let message = nodes[node].message.take();
    nodes[node].next = *free;
    *free = node;
    message
}

/// Move the waiting messages of `lane` to `dropped`, in order, freeing their nodes.
fn drain_lane<M>(nodes: &mut [Node<M>], free: &mut usize, lane: Lane, dropped: &mut Vec<M>) {
    let mut node = lane.head;
    for _ in 0..lane.len {
        let next = nodes[node].next;
        dropped.extend(release(nodes, free, node));
        node = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn n(value: usize) -> NonZeroUsize {
        NonZeroUsize::new(value).unwrap()
    }

    fn drain<M, P: Copy + Eq + Hash>(s: &mut KeyScheduler<M, P>) -> Vec<Ticket<M, P>> {
        std::iter::from_fn(|| s.next_ready()).collect()
    }

    #[test]
    fn same_key_waits_other_keys_flow() {
        let mut s = KeyScheduler::new(Ordering::Key, n(10));
        s.push(0, Some(b"a"), "a1");
        s.push(0, Some(b"a"), "a2");
        s.push(0, Some(b"b"), "b1");
        s.push(1, Some(b"a"), "other partition a1");
        let out = drain(&mut s);
        let names: Vec<_> = out.iter().map(|t| *t.message()).collect();
        assert_eq!(names, ["a1", "b1", "other partition a1"]);
        assert_eq!((s.queued(), s.in_flight(), s.len()), (1, 3, 4));
        // a1 is retrying: the caller holds its ticket; b's later messages still flow.
        s.push(0, Some(b"b"), "b2");
        let mut out = out.into_iter();
        let a1 = out.next().unwrap();
        for t in out {
            s.finish(t);
        }
        assert_eq!(
            drain(&mut s)
                .iter()
                .map(|t| *t.message())
                .collect::<Vec<_>>(),
            ["b2"]
        );
        assert_eq!(s.finish(a1), "a1");
        let a2 = drain(&mut s);
        assert_eq!(a2.iter().map(|t| *t.message()).collect::<Vec<_>>(), ["a2"]);
    }

    #[test]
    fn keyless_messages_run_in_parallel_under_key_ordering() {
        let mut s = KeyScheduler::new(Ordering::Key, n(10));
        for i in 0..3 {
            s.push(0, None, i);
        }
        assert_eq!(drain(&mut s).len(), 3);
    }

    #[test]
    fn partition_ordering_serialises_a_partition() {
        let mut s = KeyScheduler::new(Ordering::Partition, n(10));
        s.push(0, Some(b"a"), 1);
        s.push(0, Some(b"b"), 2);
        s.push(0, None, 3);
        s.push(1, Some(b"a"), 4);
        let out = drain(&mut s);
        assert_eq!(out.iter().map(|t| *t.message()).collect::<Vec<_>>(), [1, 4]);
        assert_eq!(out[0].partition(), 0);
    }

    #[test]
    fn no_ordering_only_bounds_in_flight() {
        let mut s = KeyScheduler::new(Ordering::None, n(2));
        for i in 0..5 {
            s.push(0, Some(b"same"), i);
        }
        let out = drain(&mut s);
        assert_eq!(out.iter().map(|t| *t.message()).collect::<Vec<_>>(), [0, 1]);
        s.set_max_in_flight(n(1));
        for t in out {
            s.finish(t);
        }
        assert_eq!(drain(&mut s).len(), 1);
    }

    #[test]
    fn revoke_drops_queued_but_keeps_running_keys_occupied() {
        let mut s = KeyScheduler::new(Ordering::Key, n(10));
        s.push(0, Some(b"a"), 1);
        s.push(0, Some(b"a"), 2);
        s.push(0, None, 3);
        s.push(1, Some(b"a"), 4);
        let a1 = s.next_ready().unwrap();
        assert_eq!(*a1.message(), 1);
        let mut dropped = s.revoke(0);
        dropped.sort();
        assert_eq!(dropped, [2, 3]);
        assert_eq!(s.queued(), 1);
        // Partition 0 assigned back while message 1 still runs: key a waits for it.
        s.push(0, Some(b"a"), 5);
        let out = drain(&mut s);
        assert_eq!(out.iter().map(|t| *t.message()).collect::<Vec<_>>(), [4]);
        s.finish(a1);
        assert_eq!(
            drain(&mut s)
                .iter()
                .map(|t| *t.message())
                .collect::<Vec<_>>(),
            [5]
        );
    }

    #[test]
    fn ordering_parses_from_configuration() {
        let o: Ordering = serde_json::from_str("\"partition\"").unwrap();
        assert_eq!(o, Ordering::Partition);
        assert_eq!(Ordering::default(), Ordering::Key);
        assert!(serde_json::from_str::<Ordering>("\"offset\"").is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push { partition: u8, key: Option<u8> },
        Next,
        Finish(usize),
        Settle(usize),
        Revoke(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..3, proptest::option::weighted(0.8, 0u8..4))
                .prop_map(|(partition, key)| Op::Push { partition, key }),
            3 => Just(Op::Next),
            2 => any::<usize>().prop_map(Op::Finish),
            1 => any::<usize>().prop_map(Op::Settle),
            1 => (0u8..3).prop_map(Op::Revoke),
        ]
    }

    fn ordering() -> impl Strategy<Value = Ordering> {
        prop_oneof![
            Just(Ordering::Key),
            Just(Ordering::Partition),
            Just(Ordering::None)
        ]
    }

    /// The model of the driver: what was pushed, what is held, what came out.
    struct Model {
        ordering: Ordering,
        /// id → (partition, key), in push order (ids increase).
        pushed: BTreeMap<u32, (u8, Option<u8>)>,
        queued: BTreeSet<u32>,
        held: Vec<Ticket<u32, u8>>,
        handed_out: Vec<u32>,
        revoked: BTreeSet<u32>,
    }

    impl Model {
        /// What serialises a message under the model's ordering, if anything.
        fn lane(&self, id: u32) -> Option<(u8, Option<u8>)> {
            let (partition, key) = self.pushed[&id];
            match (self.ordering, key) {
                (Ordering::Key, Some(key)) => Some((partition, Some(key))),
                (Ordering::Partition, _) => Some((partition, None)),
                _ => None,
            }
        }

        fn check_exclusion(&self) {
            let mut busy = BTreeSet::new();
            for t in &self.held {
                if let Some(lane) = self.lane(*t.message()) {
                    assert!(busy.insert(lane), "two in flight for {lane:?}");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Random interleavings of push / next_ready / release_slot / finish / revoke, then a
        /// full drain. A settling ticket (slot released) frees room but keeps its key.
        #[test]
        fn scheduler_keeps_order_exclusion_and_bounds(
            ordering in ordering(),
            max in 1usize..5,
            ops in proptest::collection::vec(op(), 0..300),
        ) {
            let mut s: KeyScheduler<u32, u8> = KeyScheduler::new(ordering, n(max));
            let mut m = Model {
                ordering,
                pushed: BTreeMap::new(),
                queued: BTreeSet::new(),
                held: Vec::new(),
                handed_out: Vec::new(),
                revoked: BTreeSet::new(),
            };
            let mut next_id = 0u32;
            let mut settling: BTreeSet<u32> = BTreeSet::new();
            let keys: [&[u8]; 4] = [b"k0", b"k1", b"k2", b"k3"];
            let next = |s: &mut KeyScheduler<u32, u8>, m: &mut Model| {
                match s.next_ready() {
                    Some(t) => {
                        let id = *t.message();
                        assert!(m.queued.remove(&id), "message {id} handed out but not queued");
                        assert_eq!(t.partition(), m.pushed[&id].0);
                        m.handed_out.push(id);
                        m.held.push(t);
                        true
                    }
                    None => {
                        // Work-conserving: refusing with room left means every queued
                        // message's key (or partition) is occupied.
                        if s.in_flight() < max {
                            let busy: BTreeSet<_> =
                                m.held.iter().filter_map(|t| m.lane(*t.message())).collect();
                            for id in &m.queued {
                                let lane = m.lane(*id);
                                assert!(
                                    lane.is_some_and(|l| busy.contains(&l)),
                                    "message {id} could run but was not handed out"
                                );
                            }
                        }
                        false
                    }
                }
            };
            for op in ops {
                match op {
                    Op::Push { partition, key } => {
                        let id = next_id;
                        next_id += 1;
                        s.push(partition, key.map(|k| keys[k as usize]), id);
                        m.pushed.insert(id, (partition, key));
                        m.queued.insert(id);
                    }
                    Op::Next => {
                        next(&mut s, &mut m);
                    }
                    Op::Finish(i) => {
                        if !m.held.is_empty() {
                            let t = m.held.swap_remove(i % m.held.len());
                            let id = *t.message();
                            settling.remove(&id);
                            prop_assert_eq!(s.finish(t), id);
                        }
                    }
                    Op::Settle(i) => {
                        if !m.held.is_empty() {
                            let at = i % m.held.len();
                            settling.insert(*m.held[at].message());
                            s.release_slot(&mut m.held[at]);
                        }
                    }
                    Op::Revoke(partition) => {
                        let dropped = s.revoke(partition);
                        let expected: BTreeSet<u32> = m
                            .queued
                            .iter()
                            .copied()
                            .filter(|id| m.pushed[id].0 == partition)
                            .collect();
                        let got: BTreeSet<u32> = dropped.iter().copied().collect();
                        prop_assert_eq!(got.len(), dropped.len());
                        prop_assert_eq!(&got, &expected);
                        // Each key's messages come back in push order.
                        let mut last: BTreeMap<(u8, Option<u8>), u32> = BTreeMap::new();
                        for id in &dropped {
                            if let Some(lane) = m.lane(*id)
                                && let Some(previous) = last.insert(lane, *id)
                            {
                                prop_assert!(previous < *id, "{:?}: {} dropped after {}", lane, id, previous);
                            }
                        }
                        for id in got {
                            m.queued.remove(&id);
                            m.revoked.insert(id);
                        }
                    }
                }
                prop_assert!(s.in_flight() <= max);
                prop_assert_eq!(s.in_flight(), m.held.len() - settling.len());
                prop_assert_eq!(s.outstanding(), m.held.len());
                prop_assert_eq!(s.len(), m.held.len() + m.queued.len());
                prop_assert_eq!(s.queued(), m.queued.len());
                m.check_exclusion();
            }
            // Drain: the driver finishes everything it holds until nothing is left.
            loop {
                while next(&mut s, &mut m) {}
                m.check_exclusion();
                if m.held.is_empty() {
                    break;
                }
                // Finish in a scrambled order.
                let t = m.held.swap_remove(m.held.len() / 2);
                s.finish(t);
            }
            prop_assert!(s.is_empty());
            prop_assert!(m.queued.is_empty());
            // Exactly once: every pushed message was handed out or revoked, never both, once.
            let out: BTreeSet<u32> = m.handed_out.iter().copied().collect();
            prop_assert_eq!(out.len(), m.handed_out.len());
            prop_assert!(out.is_disjoint(&m.revoked));
            prop_assert_eq!(out.len() + m.revoked.len(), m.pushed.len());
            // Per-lane hand-out order equals push order (ids increase in push order).
            let mut last: BTreeMap<(u8, Option<u8>), u32> = BTreeMap::new();
            for id in &m.handed_out {
                if let Some(lane) = m.lane(*id)
                    && let Some(previous) = last.insert(lane, *id)
                {
                    prop_assert!(previous < *id, "{lane:?}: {id} after {previous}");
                }
            }
        }
    }
}
