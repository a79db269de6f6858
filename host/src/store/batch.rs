//! The engine-independent half of group commit: checking a batch, finding the duplicates
//! within it, and turning the new completions' effects (and the DLQ entries the batch replays)
//! into the rows a constant number of multi-row statements write.

use std::collections::{BTreeMap, BTreeSet, HashSet};

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

/// The distinct processed keys of a batch, sorted (so that concurrent transactions take their
/// locks in the same order).
pub(crate) fn processed_keys(batch: &[Completion]) -> Vec<ProcessedKey<'_>> {
    let mut keys: Vec<ProcessedKey<'_>> = batch
        .iter()
        .map(|c| (&*c.binding_id, c.message_id.as_str()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
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
            processed_keys(&batch),
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
