//! The engine-independent half of group commit: checking a batch, finding the duplicates
//! within it, splitting its processed keys between rows and offset blocks, and turning the new
//! completions' effects (and the DLQ entries the batch replays) into the rows a constant number
//! of multi-row statements write.
//!
//! A processed key whose message id names a Kafka position — `topic/partition/offset`, the id
//! of a record without a `message-id` header, see [`position`] — is kept as one bit of a
//! *block*: a row per `(binding, topic, partition, offset / 64)` whose `mask` has bit
//! `offset % 64` set for each processed offset. A batch of a few hundred such messages writes a
//! few dozen block rows instead of a row each. Every other id is a row of `processed_keys`.
//! Which form a key takes depends on the id's text alone, so an id always meets its earlier
//! self, whoever wrote it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::{CommitOutcome, Completion, OutboxInsert, StoreError};

/// A processed key: `(binding_id, message_id)`.
pub(crate) type ProcessedKey<'a> = (&'a str, &'a str);

/// A set of processed keys, hashed with foldhash: one lookup per message of every commit.
pub(crate) type KeySet<'a> = HashSet<ProcessedKey<'a>, foldhash::fast::RandomState>;

/// Which of a batch's processed keys the commit's insert created.
#[derive(Debug)]
pub(crate) enum Inserted<'a> {
    /// All of them (the common case: no message of the batch was processed before).
    All,
    /// Only these.
    Only(KeySet<'a>),
}

impl Inserted<'_> {
    fn contains(&self, key: &ProcessedKey<'_>) -> bool {
        match self {
            Inserted::All => true,
            Inserted::Only(keys) => keys.contains(key),
        }
    }
}

/// Offsets per block: the bits of a block's `mask` (a 64-bit integer on both engines).
pub const BLOCK_OFFSETS: i64 = 64;

/// The Kafka position a message id names, if it is one as the pipeline writes it for a record
/// without a `message-id` header: `topic/partition/offset`, the topic a name of Kafka's
/// characters (`[A-Za-z0-9._-]`, at most 249), partition and offset non-negative decimals with
/// no sign and no leading zero, that fit an `i32` and an `i64`. Any other id — including one
/// that looks close (`t/01/5`, `t/-1/5`) — is not a position, and stays a row.
///
/// Migration 0007 moves the rows whose ids pass this test into blocks with the same rule,
/// written in SQL; the two must agree.
pub fn position(message_id: &str) -> Option<(&str, i32, i64)> {
    let (rest, offset) = message_id.rsplit_once('/')?;
    let (topic, partition) = rest.rsplit_once('/')?;
    let topic_ok = !topic.is_empty()
        && topic.len() <= 249
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !topic_ok || !canonical_decimal(partition) || !canonical_decimal(offset) {
        return None;
    }
    Some((topic, partition.parse().ok()?, offset.parse().ok()?))
}

/// Digits only, and no leading zero unless it is `0` itself: the one way to write the number.
fn canonical_decimal(text: &str) -> bool {
    !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'))
}

/// How many processed keys blocks with these masks hold.
pub(crate) fn keys_in_blocks(masks: &[i64]) -> u64 {
    masks.iter().map(|mask| u64::from(mask.count_ones())).sum()
}

/// A stored block as both engines read it back: binding id, topic, partition, block, mask.
pub(crate) type StoredBlock = (String, String, i32, i64, i64);

/// The bits of each of `blocks` that `stored` (the blocks as they were before the write, in
/// any order; a block missing from it had none) does not have yet.
pub(crate) fn fresh_bits(blocks: &[(BlockKey<'_>, i64)], stored: &[StoredBlock]) -> Vec<i64> {
    let before: HashMap<(&str, &str, i32, i64), i64> = stored
        .iter()
        .map(|(b, t, p, k, mask)| ((b.as_str(), t.as_str(), *p, *k), *mask))
        .collect();
    blocks
        .iter()
        .map(|(b, mask)| {
            let set = before.get(&(b.binding_id, b.topic, b.partition, b.block));
            mask & !set.copied().unwrap_or(0)
        })
        .collect()
}

/// The row a block of offsets is kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct BlockKey<'a> {
    pub binding_id: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    /// `offset / 64`.
    pub block: i64,
}

/// A batch's distinct processed keys, split by how they are kept.
#[derive(Debug, Default)]
pub(crate) struct KeyPlan<'a> {
    /// Keys kept as `processed_keys` rows, sorted.
    pub rows: Vec<ProcessedKey<'a>>,
    /// Blocks the batch sets bits in, sorted (so that concurrent transactions lock them in the
    /// same order), with the bits it sets.
    pub blocks: Vec<(BlockKey<'a>, i64)>,
    /// Each position key: the key, the index of its block in `blocks`, and its bit.
    positions: Vec<(ProcessedKey<'a>, usize, i64)>,
}

impl<'a> KeyPlan<'a> {
    /// Split a batch's processed keys. Rows come out distinct and sorted; a position repeated
    /// in the batch is one bit (the batch's outcomes make the repeats duplicates).
    pub(crate) fn new(batch: &'a [Completion]) -> Self {
        let mut plan = KeyPlan::default();
        // Blocks by key while gathering (a batch mostly repeats a few dozen of them), sorted
        // once at the end.
        let mut index: HashMap<BlockKey<'a>, usize, foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(batch.len() / 8, Default::default());
        for completion in batch {
            let key = (&*completion.binding_id, completion.message_id.as_str());
            let Some((topic, partition, offset)) = position(key.1) else {
                plan.rows.push(key);
                continue;
            };
            let block = BlockKey {
                binding_id: key.0,
                topic,
                partition,
                block: offset / BLOCK_OFFSETS,
            };
            let bit = 1i64 << (offset % BLOCK_OFFSETS);
            let at = *index.entry(block).or_insert_with(|| {
                plan.blocks.push((block, 0));
                plan.blocks.len() - 1
            });
            plan.blocks[at].1 |= bit;
            plan.positions.push((key, at, bit));
        }
        plan.rows.sort_unstable();
        plan.rows.dedup();
        // Sort the blocks (the order concurrent writers lock them in), and follow them.
        let mut order: Vec<usize> = (0..plan.blocks.len()).collect();
        order.sort_unstable_by_key(|&i| plan.blocks[i].0);
        let mut moved_to = vec![0; order.len()];
        for (to, &from) in order.iter().enumerate() {
            moved_to[from] = to;
        }
        plan.blocks = order.iter().map(|&from| plan.blocks[from]).collect();
        for (_, at, _) in &mut plan.positions {
            *at = moved_to[*at];
        }
        plan
    }

    /// The keys the commit created: the rows in `rows` (`None`: every row), and the positions
    /// whose bits `fresh` (one mask per block, as in [`Self::blocks`]) says were not set before.
    pub(crate) fn inserted(&self, rows: Option<KeySet<'a>>, fresh: &[i64]) -> Inserted<'a> {
        debug_assert_eq!(fresh.len(), self.blocks.len());
        let all_fresh = self
            .blocks
            .iter()
            .zip(fresh)
            .all(|((_, mask), fresh)| mask == fresh);
        match rows {
            None if all_fresh => Inserted::All,
            rows => {
                let mut created = rows.unwrap_or_else(|| self.rows.iter().copied().collect());
                created.extend(
                    self.positions
                        .iter()
                        .filter(|(_, block, bit)| fresh.get(*block).is_some_and(|f| f & bit != 0))
                        .map(|(key, _, _)| *key),
                );
                Inserted::Only(created)
            }
        }
    }
}

/// Where a keyed-state value lives: `(tenant, handler, key, name)`.
type StateKey<'a> = (&'a str, &'a str, &'a [u8], &'a str);

/// Refuse a batch the store cannot commit as asked, before anything is written.
pub(crate) fn validate(batch: &[Completion]) -> Result<(), StoreError> {
    for completion in batch {
        if completion.key.is_none() && !completion.state_writes.is_empty() {
            return Err(StoreError::Invalid(format!(
                "completion of message {:?} on binding {:?}: keyed-state writes for a message \
                 without a key",
                completion.message_id, completion.binding_id
            )));
        }
    }
    Ok(())
}

/// Whether committing the batch writes nothing but its processed keys: no keyed state, no
/// outbox rows, no replayed DLQ entries.
pub(crate) fn writes_only_keys(batch: &[Completion]) -> bool {
    batch
        .iter()
        .all(|c| c.state_writes.is_empty() && c.emits.is_empty() && c.replay_of.is_none())
}

/// The DLQ entries the batch replays, as `(entry id, binding_id)`, distinct and sorted: the
/// commit marks them replayed whether each completion commits or is a duplicate (the message's
/// effects are in the store either way).
pub(crate) fn replays(batch: &[Completion]) -> Vec<(i64, &str)> {
    batch
        .iter()
        .filter_map(|c| c.replay_of.map(|id| (id, &*c.binding_id)))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// One keyed-state row to upsert (`value` is `Some`) or delete (`None`).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct StateRow<'a> {
    pub tenant: &'a str,
    pub handler: &'a str,
    pub key: &'a [u8],
    pub name: &'a str,
    pub value: Option<&'a [u8]>,
}

/// One outbox row to insert.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct OutboxRow<'a> {
    pub tenant: &'a str,
    pub binding_id: Option<&'a str>,
    pub insert: &'a OutboxInsert,
}

/// What the new completions of a batch write, once duplicates are dropped.
#[derive(Debug, Default)]
pub(crate) struct Writes<'a> {
    /// Final value of every state row the batch touches, sorted by `(tenant, handler, key,
    /// name)`: applying each completion's writes in batch order and each one's in call order
    /// leaves exactly these values, so one upsert and one delete statement suffice.
    pub state: Vec<StateRow<'a>>,
    /// Outbox rows in batch order, then emit order; a message id repeated in the batch keeps
    /// its first row.
    pub outbox: Vec<OutboxRow<'a>>,
}

/// The outcome of each completion given the processed keys the insert actually created, and
/// the writes of the committed ones. The first completion of a key that was inserted commits;
/// every other one (inserted earlier, or repeated in the batch) is a duplicate.
pub(crate) fn outcomes<'a>(
    batch: &'a [Completion],
    inserted: &Inserted<'_>,
) -> (Vec<CommitOutcome>, Writes<'a>) {
    let mut seen: KeySet<'a> = KeySet::with_capacity_and_hasher(batch.len(), Default::default());
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut state: BTreeMap<StateKey<'a>, Option<&'a [u8]>> = BTreeMap::new();
    let mut outbox_ids: HashSet<&str> = HashSet::new();
    let mut outbox = Vec::new();
    for completion in batch {
        let key = (&*completion.binding_id, completion.message_id.as_str());
        let first = seen.insert(key);
        let new = first && inserted.contains(&key);
        if !new {
            outcomes.push(CommitOutcome::Duplicate);
            continue;
        }
        outcomes.push(CommitOutcome::Committed);
        if let Some(message_key) = completion.key.as_deref() {
            for write in &completion.state_writes {
                state.insert(
                    (
                        &*completion.tenant,
                        &*completion.handler,
                        message_key,
                        write.name.as_str(),
                    ),
                    write.value.as_deref(),
                );
            }
        }
        for emit in &completion.emits {
            if outbox_ids.insert(emit.message_id.as_str()) {
                outbox.push(OutboxRow {
                    tenant: &completion.tenant,
                    binding_id: Some(&completion.binding_id),
                    insert: emit,
                });
            }
        }
    }
    let state = state
        .into_iter()
        .map(|((tenant, handler, key, name), value)| StateRow {
            tenant,
            handler,
            key,
            name,
            value,
        })
        .collect();
    (outcomes, Writes { state, outbox })
}

/// The outcome of each row of a direct outbox insert: `Committed` for the first row of each
/// message id that the insert created, `Duplicate` for the rest.
pub(crate) fn insert_outcomes(
    rows: &[OutboxInsert],
    inserted: &HashSet<String>,
) -> Vec<CommitOutcome> {
    let mut seen = HashSet::with_capacity(rows.len());
    rows.iter()
        .map(|row| {
            if seen.insert(row.message_id.as_str()) && inserted.contains(&row.message_id) {
                CommitOutcome::Committed
            } else {
                CommitOutcome::Duplicate
            }
        })
        .collect()
}

/// Distinct rows of a direct outbox insert, first occurrence of each message id.
pub(crate) fn distinct_outbox<'a>(
    tenant: &'a str,
    binding_id: Option<&'a str>,
    rows: &'a [OutboxInsert],
) -> Vec<OutboxRow<'a>> {
    let mut seen = HashSet::with_capacity(rows.len());
    rows.iter()
        .filter(|row| seen.insert(row.message_id.as_str()))
        .map(|insert| OutboxRow {
            tenant,
            binding_id,
            insert,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::StateWrite;

    fn completion(message_id: &str, writes: &[(&str, Option<&str>)], emits: &[&str]) -> Completion {
        Completion {
            binding_id: "b".into(),
            tenant: "t".into(),
            handler: "h".into(),
            message_id: message_id.into(),
            key: Some(b"k".to_vec()),
            state_writes: writes
                .iter()
                .map(|(name, value)| StateWrite {
                    name: (*name).into(),
                    value: value.map(|v| v.as_bytes().to_vec()),
                })
                .collect(),
            emits: emits
                .iter()
                .map(|id| OutboxInsert {
                    message_id: (*id).into(),
                    topic: "out".into(),
                    key: None,
                    payload: Vec::new(),
                    headers: Vec::new(),
                    causation_id: message_id.into(),
                    traceparent: None,
                })
                .collect(),
            replay_of: None,
        }
    }

    fn inserted<'a>(ids: &[&'a str]) -> Inserted<'a> {
        Inserted::Only(ids.iter().map(|id| ("b", *id)).collect())
    }

    #[test]
    fn only_a_batch_without_state_outbox_or_replays_writes_keys_alone() {
        let bare = completion("m1", &[], &[]);
        assert!(writes_only_keys(&[]));
        assert!(writes_only_keys(&[
            bare.clone(),
            completion("m2", &[], &[])
        ]));
        assert!(!writes_only_keys(&[
            bare.clone(),
            completion("m2", &[("a", Some("1"))], &[])
        ]));
        assert!(!writes_only_keys(&[
            bare.clone(),
            completion("m2", &[("a", None)], &[])
        ]));
        assert!(!writes_only_keys(&[
            bare.clone(),
            completion("m2", &[], &["e"])
        ]));
        let replay = Completion {
            replay_of: Some(7),
            ..completion("m2", &[], &[])
        };
        assert!(!writes_only_keys(&[bare, replay]));
    }

    #[test]
    fn first_occurrence_wins_and_later_writes_override_earlier_ones() {
        let batch = vec![
            completion("m1", &[("a", Some("1")), ("b", Some("x"))], &["e1"]),
            completion("m1", &[("a", Some("dup"))], &["e-dup"]),
            completion("m2", &[("b", None), ("a", Some("2"))], &["e2", "e1"]),
            completion("m3", &[("a", Some("old"))], &["e3"]),
        ];
        validate(&batch).unwrap();
        assert_eq!(
            KeyPlan::new(&batch).rows,
            vec![("b", "m1"), ("b", "m2"), ("b", "m3")]
        );
        // m3 was processed before: the insert did not create it.
        let (outcomes, writes) = outcomes(&batch, &inserted(&["m1", "m2"]));
        assert_eq!(
            outcomes,
            vec![
                CommitOutcome::Committed,
                CommitOutcome::Duplicate,
                CommitOutcome::Committed,
                CommitOutcome::Duplicate,
            ]
        );
        let state: Vec<_> = writes
            .state
            .iter()
            .map(|row| (row.name, row.value))
            .collect();
        assert_eq!(state, vec![("a", Some(&b"2"[..])), ("b", None)]);
        let outbox: Vec<_> = writes
            .outbox
            .iter()
            .map(|row| row.insert.message_id.as_str())
            .collect();
        assert_eq!(outbox, vec!["e1", "e2"]);
    }

    #[test]
    fn only_ids_written_as_the_pipeline_writes_positions_are_positions() {
        assert_eq!(position("orders/3/17"), Some(("orders", 3, 17)));
        assert_eq!(position("a.b_c-D9/0/0"), Some(("a.b_c-D9", 0, 0)));
        assert_eq!(
            position("t/2147483647/9223372036854775807"),
            Some(("t", i32::MAX, i64::MAX))
        );
        for id in [
            "t/2147483648/1",
            "t/1/9223372036854775808",
            "t/01/5",
            "t/1/05",
            "t/-1/5",
            "t/+1/5",
            "t/1/",
            "/1/5",
            "t/1",
            "t//5",
            "a/b/1/5",
            "t p/1/5",
            "tö/1/5",
            "order-42",
            "",
        ] {
            assert_eq!(position(id), None, "{id}");
        }
        let long = format!("{}/1/2", "t".repeat(249));
        assert!(position(&long).is_some());
        assert_eq!(position(&format!("{}/1/2", "t".repeat(250))), None);
    }

    #[test]
    fn a_position_round_trips_through_the_pipelines_message_id() {
        for (topic, partition, offset) in [("t", 0, 0), ("orders.v2", 11, 63), ("x", 7, 1 << 40)] {
            let id = crate::pipeline::worker::message_id(topic, partition, offset, &[]);
            assert_eq!(position(&id), Some((topic, partition, offset)));
        }
    }

    #[test]
    fn positions_gather_into_blocks_and_others_stay_rows() {
        let mut batch: Vec<Completion> = [
            "t/0/64", "t/0/1", "t/1/1", "t/0/63", "m-1", "t/01/1", "t/0/1", "t/0/2",
        ]
        .iter()
        .map(|id| completion(id, &[], &[]))
        .collect();
        batch[7].binding_id = "c".into();
        let plan = KeyPlan::new(&batch);
        assert_eq!(plan.rows, vec![("b", "m-1"), ("b", "t/01/1")]);
        let block = |binding_id, partition, block| BlockKey {
            binding_id,
            topic: "t",
            partition,
            block,
        };
        assert_eq!(
            plan.blocks,
            vec![
                (block("b", 0, 0), (1 << 1) | (1 << 63)),
                (block("b", 0, 1), 1),
                (block("b", 1, 0), 1 << 1),
                (block("c", 0, 0), 1 << 2),
            ]
        );
        let masks: Vec<i64> = plan.blocks.iter().map(|(_, mask)| *mask).collect();
        assert!(matches!(plan.inserted(None, &masks), Inserted::All));
        // Offset 63 of partition 0 and all of binding c were processed before; so was row m-1.
        let fresh = [1 << 1, 1, 1 << 1, 0];
        let rows: KeySet<'_> = [("b", "t/01/1")].into_iter().collect();
        let Inserted::Only(created) = plan.inserted(Some(rows), &fresh) else {
            panic!("some keys existed");
        };
        let mut created: Vec<_> = created.into_iter().collect();
        created.sort_unstable();
        assert_eq!(
            created,
            vec![
                ("b", "t/0/1"),
                ("b", "t/0/64"),
                ("b", "t/01/1"),
                ("b", "t/1/1")
            ]
        );
        // Rows all new, one bit not: not `All`.
        let Inserted::Only(created) = plan.inserted(None, &[1 << 1, 1, 1 << 1, 1 << 2]) else {
            panic!("a bit existed");
        };
        assert_eq!(created.len(), 6);
        assert!(!created.contains(&("b", "t/0/63")));
    }

    #[test]
    fn replays_are_distinct_and_sorted() {
        let mut first = completion("m1", &[], &[]);
        first.replay_of = Some(9);
        let mut again = completion("m1", &[], &[]);
        again.replay_of = Some(9);
        let mut other = completion("m2", &[], &[]);
        other.replay_of = Some(4);
        let plain = completion("m3", &[], &[]);
        assert_eq!(
            replays(&[first, plain, again, other]),
            vec![(4, "b"), (9, "b")]
        );
    }

    #[test]
    fn state_writes_without_a_key_are_refused() {
        let mut keyless = completion("m1", &[("a", Some("1"))], &[]);
        keyless.key = None;
        assert!(matches!(
            validate(&[keyless.clone()]),
            Err(StoreError::Invalid(_))
        ));
        keyless.state_writes.clear();
        validate(&[keyless]).unwrap();
    }
}
