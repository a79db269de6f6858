//! The store contract: every test below is one async function over `&dyn Store`, run once
//! against the real PostgreSQL server (`tests/services up`), each test in a fresh schema of its
//! own, and once against an SQLite file in a temporary directory. What one engine does, the
//! other must do too.
//!
//! Without PostgreSQL the `postgres::` half fails; it never skips.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::json;
use weir::runtime::{Header, StateWrite};
use weir::store::{
    BreakerWrite, CommitOutcome, Completion, DlqEntryInsert, DlqErrorKind, DlqFilter, DlqState,
    NewTenant, NewToken, OutboxInsert, OutboxState, Quota, RateLimit, ReplayScope, Resolution,
    Store, StoreError, TenantUsage, TokenRecord,
};

/// Bound on waits for a notification; generous, the two cores are shared with the compiler.
const TIMEOUT: Duration = Duration::from_secs(30);

const TENANT: &str = "acme";
const HANDLER: &str = "orders";
const BINDING: &str = "acme-orders";

use CommitOutcome::{Committed, Duplicate};

// ---- fixtures ---------------------------------------------------------------------------------

fn set(name: &str, value: &str) -> StateWrite {
    StateWrite {
        name: name.to_owned(),
        value: Some(value.as_bytes().to_vec()),
    }
}

fn delete(name: &str) -> StateWrite {
    StateWrite {
        name: name.to_owned(),
        value: None,
    }
}

fn emit(message_id: &str, causation_id: &str) -> OutboxInsert {
    OutboxInsert {
        message_id: message_id.to_owned(),
        topic: "orders.accepted".to_owned(),
        key: Some(b"customer-7".to_vec()),
        payload: format!("payload of {message_id}").into_bytes(),
        headers: vec![
            Header {
                key: "content-type".to_owned(),
                value: b"text/plain".to_vec(),
            },
            Header {
                key: "raw".to_owned(),
                value: vec![0x00, 0xff, 0xfe],
            },
        ],
        causation_id: causation_id.to_owned(),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned()),
    }
}

/// A completion of `message_id` on the default binding, for message key `key`.
fn completion(message_id: &str, key: &str, writes: Vec<StateWrite>, emits: &[&str]) -> Completion {
    Completion {
        binding_id: BINDING.into(),
        tenant: TENANT.into(),
        handler: HANDLER.into(),
        message_id: message_id.to_owned(),
        key: Some(key.as_bytes().to_vec()),
        state_writes: writes,
        emits: emits.iter().map(|id| emit(id, message_id)).collect(),
        replay_of: None,
    }
}

async fn state(store: &dyn Store, key: &str, name: &str) -> Option<String> {
    store
        .state_get(TENANT, HANDLER, key.as_bytes(), name)
        .await
        .unwrap()
        .map(|value| String::from_utf8(value).unwrap())
}

fn at(seconds: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_750_000_000 + seconds, 0).unwrap()
}

/// Now, at the microsecond precision both engines store.
fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap()
}

fn dlq_entry(
    binding_id: &str,
    message_id: &str,
    kind: DlqErrorKind,
    failed_at: i64,
) -> DlqEntryInsert {
    DlqEntryInsert {
        tenant: TENANT.to_owned(),
        binding_id: binding_id.to_owned(),
        handler: HANDLER.to_owned(),
        handler_version: Some(3),
        topic: "orders".to_owned(),
        partition: 2,
        offset: 41 + failed_at,
        message_id: message_id.to_owned(),
        key: Some(vec![0xca, 0xfe]),
        payload: vec![0x00, 0x01, 0xff],
        headers: vec![Header {
            key: "message-id".to_owned(),
            value: message_id.as_bytes().to_vec(),
        }],
        timestamp_ms: Some(1_750_000_000_000),
        error_kind: kind,
        error_message: format!("{kind} failure of {message_id}"),
        attempts: 3,
        first_failure_at: at(failed_at - 5),
        last_failure_at: at(failed_at),
    }
}

// ---- the contract -----------------------------------------------------------------------------

async fn handler_versions_are_idempotent_and_activation_swaps(store: &dyn Store) {
    let first = store
        .put_handler_version(TENANT, HANDLER, b"component one", &Quota::default())
        .await
        .unwrap();
    assert_eq!(first.version, 1);
    assert_eq!(first.size, 13);
    // `printf 'component one' | sha256sum`
    assert_eq!(
        first.sha256,
        "cd09be78fe9747426189500a773832cfaadb60b9c9ad849a7051394c6a282e38"
    );

    // The same bytes again: the same version, nothing new stored.
    let again = store
        .put_handler_version(TENANT, HANDLER, b"component one", &Quota::default())
        .await
        .unwrap();
    assert_eq!(again, first);
    let second = store
        .put_handler_version(TENANT, HANDLER, b"component two", &Quota::default())
        .await
        .unwrap();
    assert_eq!(second.version, 2);
    assert_ne!(second.sha256, first.sha256);
    let versions = store.list_handler_versions(TENANT, HANDLER).await.unwrap();
    assert_eq!(versions, vec![first.clone(), second.clone()]);

    // Versions number per handler, and tenants do not share handlers.
    let other_handler = store
        .put_handler_version(TENANT, "refunds", b"component two", &Quota::default())
        .await
        .unwrap();
    assert_eq!(other_handler.version, 1);
    let other_tenant = store
        .put_handler_version("globex", HANDLER, b"component three", &Quota::default())
        .await
        .unwrap();
    assert_eq!(other_tenant.version, 1);
    assert_eq!(
        store
            .list_handler_versions(TENANT, HANDLER)
            .await
            .unwrap()
            .len(),
        2
    );

    assert_eq!(
        store
            .component_bytes(TENANT, HANDLER, 2)
            .await
            .unwrap()
            .as_deref(),
        Some(&b"component two"[..])
    );
    assert_eq!(
        store.component_bytes(TENANT, HANDLER, 3).await.unwrap(),
        None
    );
    assert_eq!(
        store.component_bytes("globex", HANDLER, 2).await.unwrap(),
        None
    );
    assert_eq!(
        store.handler_version(TENANT, HANDLER, 1).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        store.handler_version(TENANT, HANDLER, 9).await.unwrap(),
        None
    );

    // Activation: none at first, then a hot swap, then a rollback.
    assert_eq!(store.active_version(TENANT, HANDLER).await.unwrap(), None);
    assert_eq!(store.activate(TENANT, HANDLER, 2).await.unwrap(), second);
    assert_eq!(
        store.active_version(TENANT, HANDLER).await.unwrap(),
        Some(second.clone())
    );
    assert_eq!(store.activate(TENANT, HANDLER, 1).await.unwrap(), first);
    assert_eq!(
        store.active_version(TENANT, HANDLER).await.unwrap(),
        Some(first.clone())
    );

    // A version that does not exist is not activated, and the active one stays.
    let missing = store.activate(TENANT, HANDLER, 3).await.unwrap_err();
    assert!(matches!(missing, StoreError::NotFound(_)), "{missing}");
    assert!(!missing.is_unavailable());
    let missing = store.activate(TENANT, "nope", 1).await.unwrap_err();
    assert!(matches!(missing, StoreError::NotFound(_)), "{missing}");
    assert_eq!(
        store.active_version(TENANT, HANDLER).await.unwrap(),
        Some(first)
    );
    assert_eq!(store.active_version("globex", HANDLER).await.unwrap(), None);
}

async fn bindings_upsert_bumps_revision_and_deletion_is_visible(store: &dyn Store) {
    let start = store.bindings_revision().await.unwrap();
    assert!(store.list_bindings().await.unwrap().is_empty());
    assert_eq!(store.binding(BINDING).await.unwrap(), None);

    let spec = json!({"topics": ["orders"], "group": "g1", "retry": {"backoff_ms": [1000, 2000]}});
    let created = store
        .put_binding(BINDING, TENANT, HANDLER, &spec)
        .await
        .unwrap();
    assert_eq!(created.revision, 1);
    assert_eq!(created.spec, spec);
    assert_eq!(
        (created.tenant.as_str(), created.handler.as_str()),
        (TENANT, HANDLER)
    );
    let after_create = store.bindings_revision().await.unwrap();
    assert_ne!(after_create, start);

    let spec2 = json!({"topics": ["orders", "returns"], "group": "g1", "note": "naïve ✓"});
    let updated = store
        .put_binding(BINDING, TENANT, HANDLER, &spec2)
        .await
        .unwrap();
    assert_eq!(updated.revision, 2);
    assert_eq!(updated.spec, spec2);
    assert_eq!(updated.created_at, created.created_at);
    assert!(updated.updated_at >= created.updated_at);
    let after_update = store.bindings_revision().await.unwrap();
    assert_ne!(after_update, after_create);
    assert_eq!(store.binding(BINDING).await.unwrap(), Some(updated.clone()));

    // Another tenant cannot take the binding id over.
    let stolen = store
        .put_binding(BINDING, "globex", HANDLER, &spec)
        .await
        .unwrap_err();
    assert!(matches!(stolen, StoreError::Conflict(_)), "{stolen}");
    assert_eq!(store.binding(BINDING).await.unwrap(), Some(updated.clone()));
    assert_eq!(store.bindings_revision().await.unwrap(), after_update);

    let other = store
        .put_binding("acme-refunds", TENANT, "refunds", &json!({}))
        .await
        .unwrap();
    let listed = store.list_bindings().await.unwrap();
    assert_eq!(listed, vec![updated, other.clone()]);

    // Deletion: gone from the list, and the revision says something changed.
    let before_delete = store.bindings_revision().await.unwrap();
    assert!(store.delete_binding(BINDING).await.unwrap());
    assert_ne!(store.bindings_revision().await.unwrap(), before_delete);
    assert_eq!(store.list_bindings().await.unwrap(), vec![other]);
    assert_eq!(store.binding(BINDING).await.unwrap(), None);
    // Deleting what is not there changes nothing.
    let after_delete = store.bindings_revision().await.unwrap();
    assert!(!store.delete_binding(BINDING).await.unwrap());
    assert_eq!(store.bindings_revision().await.unwrap(), after_delete);

    // Re-created, it starts over at revision 1.
    let recreated = store
        .put_binding(BINDING, TENANT, HANDLER, &spec)
        .await
        .unwrap();
    assert_eq!(recreated.revision, 1);
}

async fn commit_writes_state_and_outbox_rows(store: &dyn Store) {
    let batch = vec![
        completion(
            "m1",
            "customer-7",
            vec![set("total", "10"), set("count", "1")],
            &["m1-out-0", "m1-out-1"],
        ),
        completion("m2", "customer-8", vec![set("total", "5")], &[]),
        completion("m3", "customer-7", vec![], &["m3-out-0"]),
    ];
    assert_eq!(
        store.commit(&batch).await.unwrap(),
        vec![Committed, Committed, Committed]
    );

    assert_eq!(
        state(store, "customer-7", "total").await.as_deref(),
        Some("10")
    );
    assert_eq!(
        state(store, "customer-7", "count").await.as_deref(),
        Some("1")
    );
    assert_eq!(
        state(store, "customer-8", "total").await.as_deref(),
        Some("5")
    );
    assert_eq!(state(store, "customer-8", "count").await, None);
    // State is scoped to tenant and handler.
    assert_eq!(
        store
            .state_get("globex", HANDLER, b"customer-7", "total")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .state_get(TENANT, "refunds", b"customer-7", "total")
            .await
            .unwrap(),
        None
    );

    assert_eq!(store.outbox_pending().await.unwrap(), 3);
    let row = store
        .outbox_status("m1-out-1")
        .await
        .unwrap()
        .expect("outbox row");
    let expected = emit("m1-out-1", "m1");
    assert_eq!(row.message_id, expected.message_id);
    assert_eq!(row.tenant, TENANT);
    assert_eq!(row.binding_id.as_deref(), Some(BINDING));
    assert_eq!(row.topic, expected.topic);
    assert_eq!(row.key, expected.key);
    assert_eq!(row.payload, expected.payload);
    assert_eq!(row.headers, expected.headers);
    assert_eq!(row.causation_id, "m1");
    assert_eq!(row.traceparent, expected.traceparent);
    assert_eq!(row.state, OutboxState::Pending);
    assert_eq!(row.attempts, 0);
    assert_eq!(row.last_error, None);
    assert_eq!(row.sent_at, None);
    let first = store.outbox_status("m1-out-0").await.unwrap().unwrap();
    let last = store.outbox_status("m3-out-0").await.unwrap().unwrap();
    assert!(
        first.id < row.id && row.id < last.id,
        "outbox ids follow batch and emit order"
    );
    assert_eq!(store.outbox_status("never-emitted").await.unwrap(), None);

    // An empty batch commits nothing and is not an error.
    assert_eq!(store.commit(&[]).await.unwrap(), Vec::new());
}

async fn a_message_committed_twice_takes_effect_once(store: &dyn Store) {
    let first = completion("m1", "customer-7", vec![set("total", "10")], &["m1-out-0"]);
    assert_eq!(store.commit(&[first]).await.unwrap(), vec![Committed]);

    // Redelivered (say after a crash before the offset commit), and this time the handler
    // produced different effects: none of them may land.
    let again = completion(
        "m1",
        "customer-7",
        vec![set("total", "20"), set("extra", "x")],
        &["m1-out-9"],
    );
    assert_eq!(
        store.commit(std::slice::from_ref(&again)).await.unwrap(),
        vec![Duplicate]
    );
    assert_eq!(
        state(store, "customer-7", "total").await.as_deref(),
        Some("10")
    );
    assert_eq!(state(store, "customer-7", "extra").await, None);
    assert_eq!(store.outbox_status("m1-out-9").await.unwrap(), None);
    assert_eq!(store.outbox_pending().await.unwrap(), 1);

    // In a batch with new messages, only the duplicate is dropped.
    let batch = vec![
        completion("m2", "customer-7", vec![set("total", "30")], &["m2-out-0"]),
        again,
        completion("m3", "customer-8", vec![set("total", "1")], &[]),
    ];
    assert_eq!(
        store.commit(&batch).await.unwrap(),
        vec![Committed, Duplicate, Committed]
    );
    assert_eq!(
        state(store, "customer-7", "total").await.as_deref(),
        Some("30")
    );
    assert_eq!(state(store, "customer-7", "extra").await, None);
    assert_eq!(store.outbox_pending().await.unwrap(), 2);

    // Processed keys are per binding: the same message id on another binding is new.
    let mut elsewhere = completion(
        "m1",
        "customer-9",
        vec![set("total", "99")],
        &["other-out-0"],
    );
    elsewhere.binding_id = "acme-orders-replica".into();
    assert_eq!(store.commit(&[elsewhere]).await.unwrap(), vec![Committed]);
    assert_eq!(
        state(store, "customer-9", "total").await.as_deref(),
        Some("99")
    );

    // An emit whose message id is already in the outbox is not inserted twice.
    let reemit = completion("m4", "customer-7", vec![], &["m2-out-0", "m4-out-0"]);
    assert_eq!(store.commit(&[reemit]).await.unwrap(), vec![Committed]);
    assert_eq!(
        store
            .outbox_status("m2-out-0")
            .await
            .unwrap()
            .unwrap()
            .causation_id,
        "m2"
    );
    assert_eq!(store.outbox_pending().await.unwrap(), 4);
}

async fn duplicates_within_one_batch_keep_the_first(store: &dyn Store) {
    let batch = vec![
        completion(
            "m1",
            "customer-7",
            vec![set("total", "first")],
            &["m1-out-a"],
        ),
        completion("m2", "customer-8", vec![set("total", "m2")], &["m2-out-0"]),
        completion(
            "m1",
            "customer-7",
            vec![set("total", "second"), set("other", "x")],
            &["m1-out-b"],
        ),
        completion("m1", "customer-7", vec![delete("total")], &[]),
    ];
    assert_eq!(
        store.commit(&batch).await.unwrap(),
        vec![Committed, Committed, Duplicate, Duplicate]
    );
    assert_eq!(
        state(store, "customer-7", "total").await.as_deref(),
        Some("first")
    );
    assert_eq!(state(store, "customer-7", "other").await, None);
    assert!(store.outbox_status("m1-out-a").await.unwrap().is_some());
    assert_eq!(store.outbox_status("m1-out-b").await.unwrap(), None);
    assert_eq!(store.outbox_pending().await.unwrap(), 2);
}

async fn batches_of_processed_keys_alone_commit_each_message_once(store: &dyn Store) {
    // Messages whose handler did nothing but succeed: the batch writes processed keys only.
    let bare = |id: &str| completion(id, "customer-7", vec![], &[]);
    assert_eq!(
        store.commit(&[bare("k1"), bare("k2")]).await.unwrap(),
        vec![Committed, Committed]
    );
    // Redelivered beside new ones, one of them twice in the batch.
    assert_eq!(
        store
            .commit(&[bare("k2"), bare("k3"), bare("k3"), bare("k1"), bare("k4")])
            .await
            .unwrap(),
        vec![Duplicate, Committed, Duplicate, Duplicate, Committed]
    );
    assert_eq!(
        store.commit(&[bare("k3"), bare("k4")]).await.unwrap(),
        vec![Duplicate, Duplicate]
    );
    // A message committed bare, delivered again with effects: the effects do not land.
    let with_effects = completion("k1", "customer-7", vec![set("total", "1")], &["k1-out-0"]);
    assert_eq!(
        store.commit(&[with_effects, bare("k5")]).await.unwrap(),
        vec![Duplicate, Committed]
    );
    assert_eq!(state(store, "customer-7", "total").await, None);
    assert_eq!(store.outbox_status("k1-out-0").await.unwrap(), None);
    // And the other way round: committed with effects, delivered again bare.
    let first = completion("k6", "customer-7", vec![set("total", "6")], &[]);
    assert_eq!(store.commit(&[first]).await.unwrap(), vec![Committed]);
    assert_eq!(
        store.commit(&[bare("k6"), bare("k7")]).await.unwrap(),
        vec![Duplicate, Committed]
    );
    assert_eq!(
        state(store, "customer-7", "total").await.as_deref(),
        Some("6")
    );
}

/// Ids of the form `topic/partition/offset` (records without a `message-id` header) are kept as
/// bits of offset blocks rather than rows: duplicates are found the same way, across blocks,
/// across the sign bit, within a batch and beside effects, and an id that only looks like a
/// position is an id of its own.
async fn position_ids_commit_once_as_bits_of_their_blocks(store: &dyn Store) {
    let bare = |id: &str| completion(id, "k", vec![], &[]);
    assert_eq!(
        store
            .commit(&[
                bare("orders/0/1"),
                bare("orders/0/63"),
                bare("orders/0/64"),
                bare("orders/1/1"),
            ])
            .await
            .unwrap(),
        vec![Committed; 4]
    );
    // Redelivered beside new offsets of the same blocks, one of them twice in the batch.
    assert_eq!(
        store
            .commit(&[
                bare("orders/0/2"),
                bare("orders/0/63"),
                bare("orders/0/2"),
                bare("orders/0/65"),
                bare("orders/1/1"),
            ])
            .await
            .unwrap(),
        vec![Committed, Duplicate, Duplicate, Committed, Duplicate]
    );
    // Every bit of a block, then the block again.
    let block: Vec<Completion> = (128..192).map(|o| bare(&format!("orders/0/{o}"))).collect();
    assert_eq!(store.commit(&block).await.unwrap(), vec![Committed; 64]);
    assert_eq!(store.commit(&block).await.unwrap(), vec![Duplicate; 64]);
    // Near misses are rows, distinct from the positions they resemble.
    let near = [
        bare("orders/00/1"),
        bare("orders/0/01"),
        bare("orders/+0/1"),
        bare("order s/0/1"),
        bare("orders/0/1/"),
    ];
    assert_eq!(store.commit(&near).await.unwrap(), vec![Committed; 5]);
    assert_eq!(store.commit(&near).await.unwrap(), vec![Duplicate; 5]);
    // Another binding's positions are its own.
    let mut other = bare("orders/0/1");
    other.binding_id = "other-binding".into();
    assert_eq!(
        store.commit(std::slice::from_ref(&other)).await.unwrap(),
        vec![Committed]
    );
    assert_eq!(store.commit(&[other]).await.unwrap(), vec![Duplicate]);
    // With effects: a position committed bare and delivered again with effects drops them; a
    // new offset of the same block commits its own, beside a row.
    assert_eq!(store.commit(&[bare("m-1")]).await.unwrap(), vec![Committed]);
    let batch = [
        completion("orders/0/64", "k", vec![set("total", "64")], &["o-64-out"]),
        completion("orders/0/66", "k", vec![set("total", "66")], &["o-66-out"]),
        bare("m-2"),
    ];
    assert_eq!(
        store.commit(&batch).await.unwrap(),
        vec![Duplicate, Committed, Committed]
    );
    assert_eq!(state(store, "k", "total").await.as_deref(), Some("66"));
    assert_eq!(store.outbox_status("o-64-out").await.unwrap(), None);
    assert!(store.outbox_status("o-66-out").await.unwrap().is_some());
    // A row and a block both seen before, beside a new offset.
    let batch = [
        completion("orders/0/66", "k", vec![set("total", "again")], &["again"]),
        bare("m-1"),
        completion("orders/0/67", "k", vec![], &["o-67-out"]),
    ];
    assert_eq!(
        store.commit(&batch).await.unwrap(),
        vec![Duplicate, Duplicate, Committed]
    );
    assert_eq!(state(store, "k", "total").await.as_deref(), Some("66"));
    assert_eq!(store.outbox_status("again").await.unwrap(), None);
    assert!(store.outbox_status("o-67-out").await.unwrap().is_some());
    // The block written after the rows' retry is kept: all three are duplicates now.
    assert_eq!(store.commit(&batch).await.unwrap(), vec![Duplicate; 3]);
}

async fn state_writes_apply_in_order(store: &dyn Store) {
    let seed = completion(
        "m0",
        "k",
        vec![set("a", "0"), set("b", "0"), set("c", "0")],
        &[],
    );
    assert_eq!(store.commit(&[seed]).await.unwrap(), vec![Committed]);

    // Within one invocation: set a=1, delete b, set a=2 → a=2, b gone.
    let one = completion(
        "m1",
        "k",
        vec![set("a", "1"), delete("b"), set("a", "2")],
        &[],
    );
    assert_eq!(store.commit(&[one]).await.unwrap(), vec![Committed]);
    assert_eq!(state(store, "k", "a").await.as_deref(), Some("2"));
    assert_eq!(state(store, "k", "b").await, None);
    assert_eq!(state(store, "k", "c").await.as_deref(), Some("0"));

    // Across the messages of one batch, in batch order; delete then set, and set then delete.
    let batch = vec![
        completion("m2", "k", vec![set("x", "1")], &[]),
        completion("m3", "k", vec![delete("x"), delete("c")], &[]),
        completion("m4", "k", vec![delete("y")], &[]),
        completion("m5", "k", vec![set("y", "5"), set("b", "back")], &[]),
        completion("m6", "other-key", vec![set("a", "elsewhere")], &[]),
    ];
    assert_eq!(store.commit(&batch).await.unwrap(), vec![Committed; 5]);
    assert_eq!(state(store, "k", "x").await, None);
    assert_eq!(state(store, "k", "c").await, None);
    assert_eq!(state(store, "k", "y").await.as_deref(), Some("5"));
    assert_eq!(state(store, "k", "b").await.as_deref(), Some("back"));
    assert_eq!(state(store, "k", "a").await.as_deref(), Some("2"));
    assert_eq!(
        state(store, "other-key", "a").await.as_deref(),
        Some("elsewhere")
    );

    // Keys are bytes, not text.
    let mut binary = completion("m7", "", vec![set("a", "binary")], &[]);
    binary.key = Some(vec![0x00, 0xff]);
    assert_eq!(store.commit(&[binary]).await.unwrap(), vec![Committed]);
    assert_eq!(
        store
            .state_get(TENANT, HANDLER, &[0x00, 0xff], "a")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"binary"[..])
    );

    // State writes without a message key are refused, and nothing of the batch is written.
    let mut keyless = completion("m9", "k", vec![set("a", "keyless")], &[]);
    keyless.key = None;
    let batch = vec![
        completion("m8", "k", vec![set("a", "8")], &["m8-out"]),
        keyless,
    ];
    let refused = store.commit(&batch).await.unwrap_err();
    assert!(matches!(refused, StoreError::Invalid(_)), "{refused}");
    assert!(!refused.is_unavailable());
    assert_eq!(state(store, "k", "a").await.as_deref(), Some("2"));
    assert_eq!(store.outbox_status("m8-out").await.unwrap(), None);
    // A keyless message without state writes is fine, and m8 was not recorded as processed.
    let mut keyless = completion("m9", "k", vec![], &[]);
    keyless.key = None;
    let batch = vec![completion("m8", "k", vec![set("a", "8")], &[]), keyless];
    assert_eq!(
        store.commit(&batch).await.unwrap(),
        vec![Committed, Committed]
    );
    assert_eq!(state(store, "k", "a").await.as_deref(), Some("8"));
}

async fn a_batch_of_a_thousand_commits_in_one_call(store: &dyn Store) {
    let batch: Vec<Completion> = (0..1000)
        .map(|i| {
            completion(
                &format!("m{i}"),
                &format!("key-{}", i % 100),
                vec![set("last", &i.to_string()), set(&format!("seen-{i}"), "1")],
                &[&format!("m{i}-out")],
            )
        })
        .collect();
    assert_eq!(store.commit(&batch).await.unwrap(), vec![Committed; 1000]);
    assert_eq!(store.outbox_pending().await.unwrap(), 1000);
    // Batch order: for each key, the last message of the batch wrote `last`.
    for k in [0, 42, 99] {
        assert_eq!(
            state(store, &format!("key-{k}"), "last").await,
            Some((900 + k).to_string())
        );
    }
    assert_eq!(
        state(store, "key-7", "seen-507").await.as_deref(),
        Some("1")
    );

    // All of it again, plus one new message: only the new one commits.
    let mut again = batch;
    again.push(completion(
        "m1000",
        "key-0",
        vec![set("last", "1000")],
        &["m1000-out"],
    ));
    let outcomes = store.commit(&again).await.unwrap();
    assert_eq!(outcomes[..1000], vec![Duplicate; 1000][..]);
    assert_eq!(outcomes[1000], Committed);
    assert_eq!(store.outbox_pending().await.unwrap(), 1001);
    assert_eq!(state(store, "key-0", "last").await.as_deref(), Some("1000"));
    // Claims are bounded by their limit and come oldest first.
    let claimed = store
        .outbox_claim(600, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 600);
    assert_eq!(claimed[0].message_id, "m0-out");
    assert_eq!(claimed[599].message_id, "m599-out");
    assert!(claimed.windows(2).all(|pair| pair[0].id < pair[1].id));
    let ids: Vec<i64> = claimed.iter().map(|row| row.id).collect();
    assert_eq!(store.outbox_mark_sent(&ids).await.unwrap(), 600);
    assert_eq!(store.outbox_pending().await.unwrap(), 401);
}

async fn outbox_claim_mark_sent_and_mark_error(store: &dyn Store) {
    let rows = vec![
        emit("o1", "c1"),
        emit("o2", "c2"),
        emit("o1", "c1-again"),
        emit("o3", "c3"),
    ];
    assert_eq!(
        store.outbox_insert(TENANT, None, &rows).await.unwrap(),
        vec![Committed, Committed, Duplicate, Committed]
    );
    // Inserting an id that is already there is a no-op.
    assert_eq!(
        store
            .outbox_insert(TENANT, Some(BINDING), &[emit("o2", "other")])
            .await
            .unwrap(),
        vec![Duplicate]
    );
    assert_eq!(
        store.outbox_insert(TENANT, None, &[]).await.unwrap(),
        Vec::new()
    );
    let o1 = store.outbox_status("o1").await.unwrap().unwrap();
    assert_eq!(
        (o1.causation_id.as_str(), o1.binding_id.as_deref()),
        ("c1", None)
    );
    assert_eq!(
        store
            .outbox_status("o2")
            .await
            .unwrap()
            .unwrap()
            .causation_id,
        "c2"
    );
    assert_eq!(store.outbox_pending().await.unwrap(), 3);

    // Oldest first, bounded by the limit; claimed rows are not claimed again while leased.
    let lease = Duration::from_secs(60);
    let claimed = store.outbox_claim(2, lease).await.unwrap();
    let names: Vec<&str> = claimed.iter().map(|row| row.message_id.as_str()).collect();
    assert_eq!(names, vec!["o1", "o2"]);
    assert_eq!(claimed[0].headers, emit("o1", "c1").headers);
    let rest = store.outbox_claim(10, lease).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].message_id, "o3");
    assert!(store.outbox_claim(10, lease).await.unwrap().is_empty());

    // Sent rows leave the pending count, once.
    assert_eq!(store.outbox_mark_sent(&[claimed[0].id]).await.unwrap(), 1);
    assert_eq!(store.outbox_mark_sent(&[claimed[0].id]).await.unwrap(), 0);
    assert_eq!(store.outbox_mark_sent(&[]).await.unwrap(), 0);
    let sent = store.outbox_status("o1").await.unwrap().unwrap();
    assert_eq!(sent.state, OutboxState::Sent);
    assert!(sent.sent_at.is_some());
    assert_eq!(store.outbox_pending().await.unwrap(), 2);

    // A failed publish counts an attempt, keeps the error, and stays pending.
    assert!(
        store
            .outbox_mark_error(claimed[1].id, "broker unavailable")
            .await
            .unwrap()
    );
    assert!(
        store
            .outbox_mark_error(claimed[1].id, "broker still unavailable")
            .await
            .unwrap()
    );
    let failed = store.outbox_status("o2").await.unwrap().unwrap();
    assert_eq!(failed.state, OutboxState::Error);
    assert_eq!(failed.attempts, 2);
    assert_eq!(
        failed.last_error.as_deref(),
        Some("broker still unavailable")
    );
    assert_eq!(store.outbox_pending().await.unwrap(), 2);
    // A sent row cannot fail any more, and an unknown one is reported.
    assert!(
        !store
            .outbox_mark_error(claimed[0].id, "late")
            .await
            .unwrap()
    );
    assert_eq!(
        store.outbox_status("o1").await.unwrap().unwrap().state,
        OutboxState::Sent
    );
    assert!(!store.outbox_mark_error(i64::MAX, "nope").await.unwrap());
    // Still leased: not retried yet.
    assert!(store.outbox_claim(10, lease).await.unwrap().is_empty());

    // When the lease runs out the row is claimable again (a relay that died loses nothing).
    assert_eq!(
        store
            .outbox_insert(TENANT, None, &[emit("o4", "c4")])
            .await
            .unwrap(),
        vec![Committed]
    );
    let short = store
        .outbox_claim(10, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(short.len(), 1);
    assert_eq!(short[0].message_id, "o4");
    assert!(store.outbox_claim(10, lease).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let reclaimed = store.outbox_claim(10, lease).await.unwrap();
    assert_eq!(reclaimed.len(), 1);
    assert_eq!(reclaimed[0].message_id, "o4");
    assert_eq!(reclaimed[0].state, OutboxState::Pending);
    let ids: Vec<i64> = [reclaimed[0].id, failed.id, rest[0].id].into();
    assert_eq!(store.outbox_mark_sent(&ids).await.unwrap(), 3);
    assert_eq!(store.outbox_pending().await.unwrap(), 0);
    assert!(
        store
            .outbox_claim(10, Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn outbox_notifications_wake_the_relay(store: &dyn Store) {
    let mut wakeups = store
        .outbox_notifications()
        .await
        .unwrap()
        .expect("both engines notify");
    // A commit without emits may or may not wake; one with emits must.
    let batch = [completion("m1", "k", vec![], &["m1-out"])];
    assert_eq!(store.commit(&batch).await.unwrap(), vec![Committed]);
    tokio::time::timeout(TIMEOUT, wakeups.recv())
        .await
        .expect("woken after a commit with outbox rows")
        .expect("listener alive");
    // So must a direct insert.
    while wakeups.try_recv().is_ok() {}
    store
        .outbox_insert(TENANT, None, &[emit("o1", "c1")])
        .await
        .unwrap();
    tokio::time::timeout(TIMEOUT, wakeups.recv())
        .await
        .expect("woken after an outbox insert")
        .expect("listener alive");
}

async fn dlq_insert_list_filter_paginate_and_resolve(store: &dyn Store) {
    let entries = [
        dlq_entry("b1", "m1", DlqErrorKind::Permanent, 10),
        dlq_entry("b1", "m2", DlqErrorKind::Retryable, 20),
        dlq_entry("b2", "m3", DlqErrorKind::Trap, 30),
        dlq_entry("b1", "m4", DlqErrorKind::Permanent, 40),
        dlq_entry("b2", "m5", DlqErrorKind::Permanent, 50),
    ];
    let mut ids = Vec::new();
    for entry in &entries {
        ids.push(store.dlq_insert(entry).await.unwrap());
    }
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
    let mut other_tenant = dlq_entry("g1", "m1", DlqErrorKind::Permanent, 10);
    other_tenant.tenant = "globex".to_owned();
    other_tenant.handler = "billing".to_owned();
    let other_id = store.dlq_insert(&other_tenant).await.unwrap();

    // The whole record comes back.
    let got = store.dlq_get(TENANT, ids[2]).await.unwrap().expect("entry");
    assert_eq!(got.id, ids[2]);
    assert_eq!(got.entry, entries[2]);
    assert_eq!(got.state, DlqState::Pending);
    assert_eq!(
        (got.resolved_at, got.resolution_note.as_deref()),
        (None, None)
    );
    // Never another tenant's.
    assert_eq!(store.dlq_get("globex", ids[2]).await.unwrap(), None);
    assert_eq!(store.dlq_get(TENANT, other_id).await.unwrap(), None);

    let list = |filter: DlqFilter| async move {
        store
            .dlq_list(&filter)
            .await
            .unwrap()
            .into_iter()
            .map(|entry| entry.entry.message_id)
            .collect::<Vec<_>>()
    };
    let mine = || DlqFilter {
        tenant: Some(TENANT.to_owned()),
        ..DlqFilter::default()
    };
    assert_eq!(list(mine()).await, ["m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(list(DlqFilter::default()).await.len(), 6);
    assert_eq!(
        list(DlqFilter {
            binding_id: Some("b2".into()),
            ..mine()
        })
        .await,
        ["m3", "m5"]
    );
    assert_eq!(
        list(DlqFilter {
            error_kind: Some(DlqErrorKind::Permanent),
            ..mine()
        })
        .await,
        ["m1", "m4", "m5"]
    );
    assert_eq!(
        list(DlqFilter {
            handler: Some("billing".into()),
            ..mine()
        })
        .await,
        Vec::<String>::new()
    );
    assert_eq!(
        list(DlqFilter {
            handler: Some("billing".into()),
            ..DlqFilter::default()
        })
        .await,
        ["m1"]
    );
    // since is inclusive, until exclusive, both on the last failure.
    assert_eq!(
        list(DlqFilter {
            since: Some(at(20)),
            until: Some(at(40)),
            ..mine()
        })
        .await,
        ["m2", "m3"]
    );
    assert_eq!(
        list(DlqFilter {
            binding_id: Some("b1".into()),
            error_kind: Some(DlqErrorKind::Permanent),
            since: Some(at(11)),
            ..mine()
        })
        .await,
        ["m4"]
    );

    // Keyset pagination: pages of two, each after the last id of the previous one.
    let mut pages = Vec::new();
    let mut after_id = None;
    loop {
        let page = store
            .dlq_list(&DlqFilter {
                after_id,
                limit: 2,
                ..mine()
            })
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        after_id = page.last().map(|entry| entry.id);
        pages.push(
            page.into_iter()
                .map(|e| e.entry.message_id)
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(pages, vec![vec!["m1", "m2"], vec!["m3", "m4"], vec!["m5"]]);

    // Dead-lettering a message that already has a pending entry refreshes that entry.
    let mut again = entries[1].clone();
    again.error_kind = DlqErrorKind::Permanent;
    again.error_message = "still failing".to_owned();
    again.attempts = 2;
    again.first_failure_at = at(100);
    again.last_failure_at = at(110);
    assert_eq!(store.dlq_insert(&again).await.unwrap(), ids[1]);
    let refreshed = store.dlq_get(TENANT, ids[1]).await.unwrap().unwrap();
    assert_eq!(refreshed.entry.error_message, "still failing");
    assert_eq!(refreshed.entry.error_kind, DlqErrorKind::Permanent);
    assert_eq!(refreshed.entry.attempts, 5);
    assert_eq!(
        refreshed.entry.first_failure_at,
        entries[1].first_failure_at
    );
    assert_eq!(refreshed.entry.last_failure_at, at(110));
    assert_eq!(list(mine()).await.len(), 5);

    // Resolution: recorded with its note, once; other tenants' entries are not found.
    let replayed = store
        .dlq_resolve(
            TENANT,
            ids[0],
            Resolution::Replayed,
            Some("replayed by ops"),
        )
        .await
        .unwrap();
    assert_eq!(replayed.state, DlqState::Replayed);
    assert!(replayed.resolved_at.is_some());
    assert_eq!(replayed.resolution_note.as_deref(), Some("replayed by ops"));
    assert_eq!(replayed.entry, entries[0]);
    let discarded = store
        .dlq_resolve(TENANT, ids[2], Resolution::Discarded, None)
        .await
        .unwrap();
    assert_eq!(discarded.state, DlqState::Discarded);
    let twice = store
        .dlq_resolve(TENANT, ids[0], Resolution::Discarded, None)
        .await
        .unwrap_err();
    assert!(matches!(twice, StoreError::Conflict(_)), "{twice}");
    let foreign = store
        .dlq_resolve("globex", ids[3], Resolution::Discarded, None)
        .await
        .unwrap_err();
    assert!(matches!(foreign, StoreError::NotFound(_)), "{foreign}");
    assert_eq!(
        store.dlq_get(TENANT, ids[3]).await.unwrap().unwrap().state,
        DlqState::Pending
    );

    assert_eq!(
        list(DlqFilter {
            state: Some(DlqState::Pending),
            ..mine()
        })
        .await,
        ["m2", "m4", "m5"]
    );
    assert_eq!(
        list(DlqFilter {
            state: Some(DlqState::Replayed),
            ..mine()
        })
        .await,
        ["m1"]
    );

    // A replayed message that fails again gets a new entry.
    let new_id = store.dlq_insert(&entries[0]).await.unwrap();
    assert!(new_id > other_id);
    assert_eq!(
        list(DlqFilter {
            binding_id: Some("b1".into()),
            ..mine()
        })
        .await,
        ["m1", "m2", "m4", "m1"]
    );
}

fn quota(max_handlers: i64, max_total_bytes: i64) -> Quota {
    Quota {
        max_handlers: Some(max_handlers),
        max_total_bytes: Some(max_total_bytes),
    }
}

/// A SHA-256 as stored: 64 lower-case hex digits.
fn token_hash(seed: u8) -> String {
    format!("{seed:02x}").repeat(32)
}

fn new_token(id: &str, tenant: &str, seed: u8) -> NewToken {
    NewToken {
        id: id.to_owned(),
        tenant: tenant.to_owned(),
        sha256: token_hash(seed),
        label: Some(format!("label of {id}")),
        expires_at: None,
    }
}

fn new_tenant(id: &str) -> NewTenant {
    NewTenant {
        id: id.to_owned(),
        quota: Quota::default(),
    }
}

async fn quotas_count_handlers_and_bytes_in_the_upload(store: &dyn Store) {
    let limits = quota(2, 30);
    assert_eq!(
        store.tenant_usage(TENANT).await.unwrap(),
        TenantUsage::default()
    );
    let orders = store
        .put_handler_version(TENANT, HANDLER, b"0123456789", &limits)
        .await
        .unwrap();
    store
        .put_handler_version(TENANT, "refunds", b"abcdefghij", &limits)
        .await
        .unwrap();
    let usage = TenantUsage {
        handlers: 2,
        total_bytes: 20,
    };
    assert_eq!(store.tenant_usage(TENANT).await.unwrap(), usage);

    // A third handler passes the count: refused, and nothing of it is stored.
    let third = store
        .put_handler_version(TENANT, "payouts", b"x", &limits)
        .await
        .unwrap_err();
    assert!(matches!(third, StoreError::QuotaExceeded(_)), "{third}");
    assert!(!third.is_unavailable());
    assert_eq!(store.tenant_usage(TENANT).await.unwrap(), usage);
    assert!(
        store
            .list_handler_versions(TENANT, "payouts")
            .await
            .unwrap()
            .is_empty()
    );
    let names: Vec<String> = store
        .list_handlers(TENANT)
        .await
        .unwrap()
        .into_iter()
        .map(|summary| summary.handler)
        .collect();
    assert_eq!(names, [HANDLER, "refunds"]);

    // A new version of a handler it has is no new handler, but its bytes count.
    let too_big = store
        .put_handler_version(TENANT, HANDLER, b"0123456789a", &limits)
        .await
        .unwrap_err();
    assert!(matches!(too_big, StoreError::QuotaExceeded(_)), "{too_big}");
    assert_eq!(
        store
            .list_handler_versions(TENANT, HANDLER)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(store.tenant_usage(TENANT).await.unwrap(), usage);
    // Reaching a limit exactly is allowed.
    let second = store
        .put_handler_version(TENANT, HANDLER, b"9876543210", &limits)
        .await
        .unwrap();
    assert_eq!(second.version, 2);
    let full = TenantUsage {
        handlers: 2,
        total_bytes: 30,
    };
    assert_eq!(store.tenant_usage(TENANT).await.unwrap(), full);

    // At the limit (and even under a quota of nothing), re-uploading stored bytes returns the
    // stored version and counts nothing.
    for limits in [limits, quota(0, 0)] {
        let again = store
            .put_handler_version(TENANT, HANDLER, b"0123456789", &limits)
            .await
            .unwrap();
        assert_eq!(again, orders);
    }
    assert_eq!(store.tenant_usage(TENANT).await.unwrap(), full);

    // Each limit alone; another tenant's usage is its own; no quota, no limit.
    let bytes_only = Quota {
        max_handlers: None,
        max_total_bytes: Some(30),
    };
    let error = store
        .put_handler_version(TENANT, "payouts", b"x", &bytes_only)
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::QuotaExceeded(_)), "{error}");
    let count_only = Quota {
        max_handlers: Some(2),
        max_total_bytes: None,
    };
    store
        .put_handler_version(TENANT, HANDLER, b"a third version", &count_only)
        .await
        .unwrap();
    store
        .put_handler_version("globex", "payouts", b"0123456789", &limits)
        .await
        .unwrap();
    store
        .put_handler_version(TENANT, "payouts", b"x", &Quota::default())
        .await
        .unwrap();
    assert_eq!(
        store.tenant_usage(TENANT).await.unwrap(),
        TenantUsage {
            handlers: 3,
            total_bytes: 30 + 15 + 1,
        }
    );
    assert_eq!(
        store.tenant_usage("globex").await.unwrap(),
        TenantUsage {
            handlers: 1,
            total_bytes: 10,
        }
    );
}

async fn handlers_are_listed_and_deleted_unless_a_binding_runs_them(store: &dyn Store) {
    let none = Quota::default();
    store
        .put_handler_version(TENANT, "refunds", b"refunds one", &none)
        .await
        .unwrap();
    let first = store
        .put_handler_version(TENANT, HANDLER, b"orders one", &none)
        .await
        .unwrap();
    store
        .put_handler_version(TENANT, HANDLER, b"orders two!", &none)
        .await
        .unwrap();
    store.activate(TENANT, HANDLER, 2).await.unwrap();
    store
        .put_handler_version("globex", "billing", b"billing", &none)
        .await
        .unwrap();

    let listed = store.list_handlers(TENANT).await.unwrap();
    let summary: Vec<_> = listed
        .iter()
        .map(|h| {
            (
                h.tenant.as_str(),
                h.handler.as_str(),
                h.active_version,
                h.latest_version,
                h.versions,
                h.total_bytes,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (TENANT, HANDLER, Some(2), 2, 2, 10 + 11),
            (TENANT, "refunds", None, 1, 1, 11),
        ]
    );
    assert!(listed[0].created_at <= first.created_at);
    assert!(store.list_handlers("initech").await.unwrap().is_empty());

    // A binding of the tenant runs it: not deleted. Another tenant's binding of a handler by
    // the same name does not count.
    store
        .put_binding(BINDING, TENANT, HANDLER, &json!({}))
        .await
        .unwrap();
    store
        .put_binding("globex-refunds", "globex", "refunds", &json!({}))
        .await
        .unwrap();
    let bound = store.delete_handler(TENANT, HANDLER).await.unwrap_err();
    assert!(matches!(bound, StoreError::Conflict(_)), "{bound}");
    assert!(bound.to_string().contains(BINDING), "{bound}");
    assert_eq!(store.list_handlers(TENANT).await.unwrap(), listed);
    assert!(store.delete_handler(TENANT, "refunds").await.unwrap());

    // Unbound, it goes with all its versions.
    assert!(store.delete_binding(BINDING).await.unwrap());
    assert!(store.delete_handler(TENANT, HANDLER).await.unwrap());
    assert!(store.list_handlers(TENANT).await.unwrap().is_empty());
    assert!(
        store
            .list_handler_versions(TENANT, HANDLER)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.active_version(TENANT, HANDLER).await.unwrap(), None);
    assert_eq!(
        store.component_bytes(TENANT, HANDLER, 1).await.unwrap(),
        None
    );
    assert_eq!(
        store.tenant_usage(TENANT).await.unwrap(),
        TenantUsage::default()
    );
    assert!(!store.delete_handler(TENANT, HANDLER).await.unwrap());
    assert_eq!(store.list_handlers("globex").await.unwrap().len(), 1);

    // Uploaded again, it starts over.
    let again = store
        .put_handler_version(TENANT, HANDLER, b"orders two!", &none)
        .await
        .unwrap();
    assert_eq!(again.version, 1);
}

async fn tenants_are_created_listed_and_deleted_when_empty(store: &dyn Store) {
    assert!(store.list_tenants().await.unwrap().is_empty());
    let acme = store
        .create_tenant(&NewTenant {
            id: TENANT.to_owned(),
            quota: quota(5, 1_000_000),
        })
        .await
        .unwrap();
    assert_eq!(acme.id, TENANT);
    assert_eq!(acme.quota, quota(5, 1_000_000));
    let globex = store.create_tenant(&new_tenant("globex")).await.unwrap();
    assert_eq!(globex.quota, Quota::default());
    assert_eq!(store.tenant(TENANT).await.unwrap(), Some(acme.clone()));
    assert_eq!(store.tenant("initech").await.unwrap(), None);
    assert_eq!(
        store.list_tenants().await.unwrap(),
        vec![acme.clone(), globex.clone()]
    );

    let taken = store.create_tenant(&new_tenant(TENANT)).await.unwrap_err();
    assert!(matches!(taken, StoreError::Conflict(_)), "{taken}");
    assert_eq!(store.tenant(TENANT).await.unwrap(), Some(acme.clone()));
    let negative = store
        .create_tenant(&NewTenant {
            id: "initech".to_owned(),
            quota: quota(-1, 10),
        })
        .await
        .unwrap_err();
    assert!(matches!(negative, StoreError::Invalid(_)), "{negative}");
    assert_eq!(store.tenant("initech").await.unwrap(), None);

    // Not deleted while it has a handler, nor while it has a binding; its tokens stay.
    store
        .create_token(&new_token("tok-1", TENANT, 1))
        .await
        .unwrap();
    store
        .put_handler_version(TENANT, HANDLER, b"component", &Quota::default())
        .await
        .unwrap();
    let with_handler = store.delete_tenant(TENANT).await.unwrap_err();
    assert!(
        matches!(with_handler, StoreError::Conflict(_)),
        "{with_handler}"
    );
    assert!(store.delete_handler(TENANT, HANDLER).await.unwrap());
    store
        .put_binding(BINDING, TENANT, HANDLER, &json!({}))
        .await
        .unwrap();
    let with_binding = store.delete_tenant(TENANT).await.unwrap_err();
    assert!(
        matches!(with_binding, StoreError::Conflict(_)),
        "{with_binding}"
    );
    assert_eq!(store.tenant(TENANT).await.unwrap(), Some(acme));
    assert_eq!(store.list_tokens(TENANT).await.unwrap().len(), 1);

    // Empty: deleted, with its tokens.
    assert!(store.delete_binding(BINDING).await.unwrap());
    assert!(store.delete_tenant(TENANT).await.unwrap());
    assert_eq!(store.tenant(TENANT).await.unwrap(), None);
    assert!(store.list_tokens(TENANT).await.unwrap().is_empty());
    assert_eq!(store.token_by_hash(&token_hash(1)).await.unwrap(), None);
    assert_eq!(store.list_tenants().await.unwrap(), vec![globex]);
    assert!(!store.delete_tenant(TENANT).await.unwrap());
    // Its id is free again, and a token of the old tenant does not come back.
    store.create_tenant(&new_tenant(TENANT)).await.unwrap();
    assert!(store.list_tokens(TENANT).await.unwrap().is_empty());
}

async fn tenant_rate_limits_are_set_read_and_removed(store: &dyn Store) {
    let acme = store.create_tenant(&new_tenant(TENANT)).await.unwrap();
    assert_eq!(acme.rate_limit, None);
    store.create_tenant(&new_tenant("globex")).await.unwrap();
    let limit = RateLimit {
        messages_per_second: 200,
        burst: 20,
    };
    let set = store
        .set_tenant_rate_limit(TENANT, Some(limit))
        .await
        .unwrap();
    assert_eq!(set.rate_limit, Some(limit));
    assert_eq!(set.quota, acme.quota);
    assert_eq!(store.tenant(TENANT).await.unwrap(), Some(set.clone()));
    let listed = store.list_tenants().await.unwrap();
    let limits: Vec<_> = listed
        .iter()
        .map(|t| (t.id.as_str(), t.rate_limit))
        .collect();
    assert_eq!(limits, vec![(TENANT, Some(limit)), ("globex", None)]);

    // Changed in place.
    let faster = RateLimit {
        messages_per_second: 1000,
        burst: 1,
    };
    store
        .set_tenant_rate_limit(TENANT, Some(faster))
        .await
        .unwrap();
    assert_eq!(
        store.tenant(TENANT).await.unwrap().unwrap().rate_limit,
        Some(faster)
    );

    // Zero is refused and changes nothing.
    for bad in [
        RateLimit {
            messages_per_second: 0,
            burst: 1,
        },
        RateLimit {
            messages_per_second: 1,
            burst: 0,
        },
    ] {
        let error = store
            .set_tenant_rate_limit(TENANT, Some(bad))
            .await
            .unwrap_err();
        assert!(matches!(error, StoreError::Invalid(_)), "{error}");
    }
    assert_eq!(
        store.tenant(TENANT).await.unwrap().unwrap().rate_limit,
        Some(faster)
    );

    // Removed; a tenant without a row has no limit to set.
    let removed = store.set_tenant_rate_limit(TENANT, None).await.unwrap();
    assert_eq!(removed.rate_limit, None);
    assert_eq!(store.tenant(TENANT).await.unwrap(), Some(acme));
    let missing = store
        .set_tenant_rate_limit("initech", Some(limit))
        .await
        .unwrap_err();
    assert!(matches!(missing, StoreError::NotFound(_)), "{missing}");
    assert_eq!(store.tenant("initech").await.unwrap(), None);
}

async fn tokens_are_found_by_hash_and_revoked_by_their_tenant(store: &dyn Store) {
    store.create_tenant(&new_tenant(TENANT)).await.unwrap();
    store.create_tenant(&new_tenant("globex")).await.unwrap();

    let unknown = store
        .create_token(&new_token("tok-0", "initech", 9))
        .await
        .unwrap_err();
    assert!(matches!(unknown, StoreError::NotFound(_)), "{unknown}");

    let first = store
        .create_token(&new_token("tok-1", TENANT, 1))
        .await
        .unwrap();
    assert_eq!(
        (first.id.as_str(), first.tenant.as_str()),
        ("tok-1", TENANT)
    );
    assert_eq!(first.label.as_deref(), Some("label of tok-1"));
    assert_eq!((first.expires_at, first.revoked_at), (None, None));
    let expiry = now() + chrono::Duration::hours(1);
    let second = store
        .create_token(&NewToken {
            label: None,
            expires_at: Some(expiry),
            ..new_token("tok-2", TENANT, 2)
        })
        .await
        .unwrap();
    assert_eq!(second.expires_at, Some(expiry));
    assert!(second.created_at >= first.created_at);
    let foreign = store
        .create_token(&new_token("tok-3", "globex", 3))
        .await
        .unwrap();
    assert_eq!(foreign.tenant, "globex");

    // Ids and hashes are unique; a hash is 64 lower-case hex digits.
    for taken in [
        new_token("tok-1", TENANT, 4),
        new_token("tok-4", "globex", 1),
    ] {
        let error = store.create_token(&taken).await.unwrap_err();
        assert!(matches!(error, StoreError::Conflict(_)), "{error}");
    }
    let bad_hash = store
        .create_token(&NewToken {
            sha256: token_hash(0xab).to_uppercase(),
            ..new_token("tok-5", TENANT, 5)
        })
        .await
        .unwrap_err();
    assert!(matches!(bad_hash, StoreError::Invalid(_)), "{bad_hash}");

    // Found by hash only; listed per tenant, by creation.
    assert_eq!(
        store.token_by_hash(&token_hash(1)).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        store.token_by_hash(&token_hash(2)).await.unwrap(),
        Some(second.clone())
    );
    assert_eq!(store.token_by_hash(&token_hash(7)).await.unwrap(), None);
    assert_eq!(
        store.list_tokens(TENANT).await.unwrap(),
        vec![first.clone(), second.clone()]
    );
    assert_eq!(
        store.list_tokens("globex").await.unwrap(),
        vec![foreign.clone()]
    );

    // Expiry: valid until the moment it expires.
    assert!(first.is_valid_at(now()));
    assert!(second.is_valid_at(now()));
    assert!(!second.is_valid_at(expiry));
    assert!(!second.is_valid_at(expiry + chrono::Duration::seconds(1)));

    // Revocation: only by the token's tenant, idempotent, and the hash still finds it.
    let not_yours = store.revoke_token("globex", "tok-1").await.unwrap_err();
    assert!(matches!(not_yours, StoreError::NotFound(_)), "{not_yours}");
    assert_eq!(
        store.token_by_hash(&token_hash(1)).await.unwrap(),
        Some(first.clone())
    );
    let missing = store.revoke_token(TENANT, "tok-9").await.unwrap_err();
    assert!(matches!(missing, StoreError::NotFound(_)), "{missing}");
    let revoked = store.revoke_token(TENANT, "tok-1").await.unwrap();
    let revoked_at = revoked.revoked_at.expect("revoked");
    assert_eq!(
        revoked,
        TokenRecord {
            revoked_at: Some(revoked_at),
            ..first.clone()
        }
    );
    assert!(!revoked.is_valid_at(now()));
    let again = store.revoke_token(TENANT, "tok-1").await.unwrap();
    assert_eq!(again.revoked_at, Some(revoked_at));
    let found = store.token_by_hash(&token_hash(1)).await.unwrap().unwrap();
    assert_eq!(found, revoked);
    assert!(!found.is_valid_at(now()));
    assert_eq!(
        store.token_by_hash(&token_hash(2)).await.unwrap(),
        Some(second)
    );
    assert_eq!(store.list_tokens("globex").await.unwrap(), vec![foreign]);
}

async fn state_list_returns_the_values_of_one_key_by_name(store: &dyn Store) {
    assert!(
        store
            .state_list(TENANT, HANDLER, b"customer-7")
            .await
            .unwrap()
            .is_empty()
    );
    let batch = [
        completion(
            "m1",
            "customer-7",
            vec![
                set("b", "2"),
                set("a", "1"),
                set("Z", "0"),
                set("gone", "x"),
            ],
            &[],
        ),
        completion("m2", "customer-8", vec![set("a", "other key")], &[]),
        Completion {
            handler: "refunds".into(),
            ..completion("m3", "customer-7", vec![set("a", "other handler")], &[])
        },
        Completion {
            tenant: "globex".into(),
            binding_id: "globex-orders".into(),
            ..completion("m4", "customer-7", vec![set("a", "other tenant")], &[])
        },
    ];
    assert_eq!(
        store.commit(&batch).await.unwrap(),
        [Committed, Committed, Committed, Committed]
    );
    store
        .commit(&[completion(
            "m5",
            "customer-7",
            vec![delete("gone"), set("b", "two")],
            &[],
        )])
        .await
        .unwrap();
    // By name, byte-wise (upper case first) on both engines.
    let values: Vec<(String, String)> = store
        .state_list(TENANT, HANDLER, b"customer-7")
        .await
        .unwrap()
        .into_iter()
        .map(|(name, value)| (name, String::from_utf8(value).unwrap()))
        .collect();
    let expected = [("Z", "0"), ("a", "1"), ("b", "two")]
        .map(|(name, value)| (name.to_owned(), value.to_owned()));
    assert_eq!(values, expected);
    assert_eq!(
        store
            .state_list(TENANT, HANDLER, b"customer-8")
            .await
            .unwrap(),
        vec![("a".to_owned(), b"other key".to_vec())]
    );
}

async fn dlq_replays_are_claimed_with_a_lease_and_marked_by_the_commit(store: &dyn Store) {
    let lease = Duration::from_secs(60);
    let first = store
        .dlq_insert(&dlq_entry(BINDING, "m1", DlqErrorKind::Permanent, 10))
        .await
        .unwrap();
    let second = store
        .dlq_insert(&dlq_entry(BINDING, "m2", DlqErrorKind::Trap, 20))
        .await
        .unwrap();
    let elsewhere = store
        .dlq_insert(&dlq_entry(
            "acme-refunds",
            "m3",
            DlqErrorKind::Retryable,
            30,
        ))
        .await
        .unwrap();
    let untouched = store
        .dlq_insert(&dlq_entry(BINDING, "m4", DlqErrorKind::Permanent, 40))
        .await
        .unwrap();

    // Nothing is queued yet.
    assert!(
        store
            .dlq_claim_replays(BINDING, ReplayScope::Any, 10, lease)
            .await
            .unwrap()
            .is_empty()
    );

    // Queued: replaying, once; only the tenant's own entries.
    let queued = store.dlq_replay(TENANT, first).await.unwrap();
    assert_eq!((queued.id, queued.state), (first, DlqState::Replaying));
    assert_eq!(queued.resolved_at, None);
    let twice = store.dlq_replay(TENANT, first).await.unwrap_err();
    assert!(matches!(twice, StoreError::Conflict(_)), "{twice}");
    let foreign = store.dlq_replay("globex", second).await.unwrap_err();
    assert!(matches!(foreign, StoreError::NotFound(_)), "{foreign}");
    let missing = store.dlq_replay(TENANT, untouched + 100).await.unwrap_err();
    assert!(matches!(missing, StoreError::NotFound(_)), "{missing}");
    // A queued entry is not resolved by hand.
    let resolve = store
        .dlq_resolve(TENANT, first, Resolution::Discarded, None)
        .await
        .unwrap_err();
    assert!(matches!(resolve, StoreError::Conflict(_)), "{resolve}");
    assert_eq!(
        store.dlq_get(TENANT, first).await.unwrap().unwrap().state,
        DlqState::Replaying
    );
    store.dlq_replay(TENANT, second).await.unwrap();
    store.dlq_replay(TENANT, elsewhere).await.unwrap();
    let replaying: Vec<i64> = store
        .dlq_list(&DlqFilter {
            state: Some(DlqState::Replaying),
            ..DlqFilter::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|entry| entry.id)
        .collect();
    assert_eq!(replaying, [first, second, elsewhere]);

    // Claims: the binding's own, oldest first, up to the limit; none twice while leased.
    let claimed = store
        .dlq_claim_replays(BINDING, ReplayScope::Any, 1, lease)
        .await
        .unwrap();
    assert_eq!(claimed.iter().map(|e| e.id).collect::<Vec<_>>(), [first]);
    assert_eq!(claimed[0].entry.message_id, "m1");
    assert_eq!(claimed[0].state, DlqState::Replaying);
    let claimed = store
        .dlq_claim_replays(BINDING, ReplayScope::Any, 10, lease)
        .await
        .unwrap();
    assert_eq!(claimed.iter().map(|e| e.id).collect::<Vec<_>>(), [second]);
    assert!(
        store
            .dlq_claim_replays(BINDING, ReplayScope::Any, 10, lease)
            .await
            .unwrap()
            .is_empty()
    );
    // A lease that runs out makes the entry claimable again.
    let short = store
        .dlq_claim_replays(
            "acme-refunds",
            ReplayScope::Any,
            10,
            Duration::from_millis(50),
        )
        .await
        .unwrap();
    assert_eq!(short.iter().map(|e| e.id).collect::<Vec<_>>(), [elsewhere]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reclaimed = store
        .dlq_claim_replays("acme-refunds", ReplayScope::Any, 10, lease)
        .await
        .unwrap();
    assert_eq!(
        reclaimed.iter().map(|e| e.id).collect::<Vec<_>>(),
        [elsewhere]
    );

    // The replay of m1 commits: the entry is replayed in the same transaction. m2 was already
    // processed, so its replay is a duplicate, and its entry is replayed all the same. A
    // completion of another binding, or for an entry not queued, marks nothing.
    assert_eq!(
        store
            .commit(&[completion("m2", "k", vec![set("a", "first")], &[])])
            .await
            .unwrap(),
        [Committed]
    );
    let replays = [
        Completion {
            replay_of: Some(first),
            ..completion("m1", "k", vec![set("b", "replayed")], &["m1-out"])
        },
        Completion {
            replay_of: Some(second),
            ..completion("m2", "k", vec![set("a", "second")], &[])
        },
        Completion {
            replay_of: Some(elsewhere),
            ..completion("m3", "k", vec![], &[])
        },
        Completion {
            replay_of: Some(untouched),
            ..completion("m4", "k", vec![], &[])
        },
    ];
    assert_eq!(
        store.commit(&replays).await.unwrap(),
        [Committed, Duplicate, Committed, Committed]
    );
    assert_eq!(state(store, "k", "b").await.as_deref(), Some("replayed"));
    assert_eq!(state(store, "k", "a").await.as_deref(), Some("first"));
    for id in [first, second] {
        let entry = store.dlq_get(TENANT, id).await.unwrap().unwrap();
        assert_eq!(entry.state, DlqState::Replayed, "entry {id}");
        assert!(entry.resolved_at.is_some(), "entry {id}");
    }
    let other = store.dlq_get(TENANT, elsewhere).await.unwrap().unwrap();
    assert_eq!(
        (other.state, other.resolved_at),
        (DlqState::Replaying, None)
    );
    assert_eq!(
        store
            .dlq_get(TENANT, untouched)
            .await
            .unwrap()
            .unwrap()
            .state,
        DlqState::Pending
    );
    // Done is done: not queued again, not claimed again.
    let again = store.dlq_replay(TENANT, first).await.unwrap_err();
    assert!(matches!(again, StoreError::Conflict(_)), "{again}");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        store
            .dlq_claim_replays(BINDING, ReplayScope::Any, 10, Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    );

    // A replay that fails again lands on its entry: pending, the new failure, no lease; it can
    // be queued again and is claimable at once.
    let mut failed_again = dlq_entry("acme-refunds", "m3", DlqErrorKind::Permanent, 60);
    failed_again.error_message = "still broken".to_owned();
    failed_again.attempts = 1;
    assert_eq!(store.dlq_insert(&failed_again).await.unwrap(), elsewhere);
    let refreshed = store.dlq_get(TENANT, elsewhere).await.unwrap().unwrap();
    assert_eq!(refreshed.state, DlqState::Pending);
    assert_eq!(refreshed.entry.error_message, "still broken");
    assert_eq!(refreshed.entry.attempts, 4);
    assert_eq!(refreshed.entry.last_failure_at, at(60));
    assert!(
        store
            .dlq_claim_replays("acme-refunds", ReplayScope::Any, 10, lease)
            .await
            .unwrap()
            .is_empty()
    );
    store.dlq_replay(TENANT, elsewhere).await.unwrap();
    let claimed = store
        .dlq_claim_replays("acme-refunds", ReplayScope::Any, 10, lease)
        .await
        .unwrap();
    assert_eq!(
        claimed.iter().map(|e| e.id).collect::<Vec<_>>(),
        [elsewhere]
    );

    // A replayed message that fails once more gets a new entry.
    let new_entry = store
        .dlq_insert(&dlq_entry(BINDING, "m1", DlqErrorKind::Permanent, 70))
        .await
        .unwrap();
    assert!(new_entry > untouched);
    assert_eq!(
        store.dlq_get(TENANT, first).await.unwrap().unwrap().state,
        DlqState::Replayed
    );
}

async fn sweep_forgets_old_processed_keys(store: &dyn Store) {
    let old = [
        completion("m1", "k", vec![set("a", "1")], &[]),
        completion("m2", "k", vec![], &[]),
        completion("orders/0/5", "k", vec![], &[]),
        completion("orders/0/6", "k", vec![], &[]),
        completion("orders/1/5", "k", vec![], &[]),
        completion("orders/1/6", "k", vec![], &[]),
    ];
    assert_eq!(store.commit(&old).await.unwrap(), vec![Committed; 6]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cutoff = now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A recent offset of the block of orders/0/5 and 6 keeps them: a block goes by its newest
    // write (here one that also met a bit set before).
    let recent = [
        completion("m3", "k", vec![], &[]),
        completion("orders/0/5", "k", vec![], &[]),
        completion("orders/0/7", "k", vec![], &[]),
    ];
    assert_eq!(
        store.commit(&recent).await.unwrap(),
        vec![Committed, Duplicate, Committed]
    );

    assert_eq!(store.sweep_processed_keys(cutoff).await.unwrap(), 4);
    assert_eq!(store.sweep_processed_keys(cutoff).await.unwrap(), 0);
    // A swept message counts as new again; a recent one is still a duplicate.
    let replay = [
        completion("m1", "k", vec![set("a", "2")], &[]),
        completion("m3", "k", vec![], &[]),
        completion("orders/1/5", "k", vec![], &[]),
        completion("orders/0/5", "k", vec![], &[]),
    ];
    assert_eq!(
        store.commit(&replay).await.unwrap(),
        vec![Committed, Duplicate, Committed, Duplicate]
    );
    assert_eq!(state(store, "k", "a").await.as_deref(), Some("2"));
    assert_eq!(store.sweep_processed_keys(at(0)).await.unwrap(), 0);
}

async fn a_closed_store_is_unavailable(store: &dyn Store) {
    assert_eq!(
        store
            .commit(&[completion("m1", "k", vec![], &[])])
            .await
            .unwrap(),
        vec![Committed]
    );
    store.close().await;
    let error = store
        .commit(&[completion("m2", "k", vec![], &[])])
        .await
        .unwrap_err();
    assert!(error.is_unavailable(), "{error}");
    assert!(store.outbox_pending().await.unwrap_err().is_unavailable());
    assert!(
        store
            .bindings_revision()
            .await
            .unwrap_err()
            .is_unavailable()
    );
}

// ---- running the contract against both engines -----------------------------------------------

/// A PostgreSQL store in a schema of its own, and what dropping that schema needs.
struct PgFixture {
    store: Arc<dyn Store>,
    admin: sqlx::PgPool,
    schema: String,
}

impl PgFixture {
    async fn new() -> Self {
        let (admin, schema) = Self::schema().await;
        let store = weir::store::connect(&Self::url(&schema))
            .await
            .expect("connect and migrate");
        Self {
            store,
            admin,
            schema,
        }
    }

    /// An administrative connection and a fresh, empty schema.
    async fn schema() -> (sqlx::PgPool, String) {
        let url = weir_acceptance::services().database_url;
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .expect("connect to postgresql (start it with `tests/services up`)");
        let schema = weir_acceptance::unique_name("store");
        // `unique_name` yields only [a-z0-9_], so splicing it into SQL is safe.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .expect("create schema");
        (admin, schema)
    }

    /// The store URL of `schema`.
    fn url(schema: &str) -> String {
        let url = weir_acceptance::services().database_url;
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}options=-c%20search_path%3D{schema}&application_name={schema}")
    }

    /// A schema holding the store as migrations up to `last` left it, and no store yet.
    async fn at_migration(last: i64) -> PgSchema {
        let (admin, schema) = Self::schema().await;
        let dir = tempfile::tempdir().expect("temporary directory");
        let pool = PgSchema::pool(&schema).await;
        migrations_up_to("postgres", last, dir.path())
            .await
            .run(&pool)
            .await
            .expect("migrate to the older version");
        pool.close().await;
        PgSchema { admin, schema }
    }

    async fn drop(self) {
        self.store.close().await;
        drop_schema(&self.admin, &self.schema).await;
    }
}

async fn drop_schema(admin: &sqlx::PgPool, schema: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(admin)
        .await
        .expect("drop schema");
}

/// A PostgreSQL schema the test migrates itself.
struct PgSchema {
    admin: sqlx::PgPool,
    schema: String,
}

impl PgSchema {
    async fn pool(schema: &str) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&PgFixture::url(schema))
            .await
            .expect("connect to the schema")
    }

    /// A connection working in the schema.
    async fn admin_in_schema(&self) -> sqlx::PgPool {
        Self::pool(&self.schema).await
    }

    /// The store on the schema, migrated to today's version.
    async fn migrate(&self) -> Arc<dyn Store> {
        weir::store::connect(&PgFixture::url(&self.schema))
            .await
            .expect("connect and migrate")
    }

    async fn drop_schema(self) {
        drop_schema(&self.admin, &self.schema).await;
    }
}

/// An SQLite store in a fresh file.
async fn breakers_are_shared_by_revision_and_deleted_with_their_binding(store: &dyn Store) {
    assert_eq!(store.breaker_get(BINDING).await.unwrap(), None);
    let before = Utc::now() - chrono::Duration::seconds(5);
    let open = store
        .breaker_set(
            BINDING,
            BreakerWrite::Open {
                open_for: Duration::from_secs(60),
                consecutive_failures: 5,
            },
        )
        .await
        .unwrap();
    assert!(open.open && !open.forced);
    assert_eq!(open.revision, 1);
    assert_eq!(open.consecutive_failures, Some(5));
    let opened_at = open.opened_at.expect("opened_at");
    let until = open.open_until.expect("open_until");
    assert!(opened_at > before, "{opened_at} not after {before}");
    let open_for = (until - opened_at).num_milliseconds();
    assert!(
        (59_000..=61_000).contains(&open_for),
        "open for {open_for} ms"
    );
    assert_eq!(
        store.breaker_get(BINDING).await.unwrap(),
        Some(open.clone())
    );

    // Forcing an open breaker keeps when it opened and drops the time limit.
    let forced = store
        .breaker_set(BINDING, BreakerWrite::Forced)
        .await
        .unwrap();
    assert!(forced.open && forced.forced);
    assert_eq!(forced.revision, 2);
    assert_eq!(forced.opened_at, Some(opened_at));
    assert_eq!(forced.open_until, None);
    assert_eq!(forced.consecutive_failures, Some(5));

    // A reset closes it and clears the times.
    let closed = store
        .breaker_set(BINDING, BreakerWrite::Closed)
        .await
        .unwrap();
    assert!(!closed.open && !closed.forced);
    assert_eq!(closed.revision, 3);
    assert_eq!((closed.opened_at, closed.open_until), (None, None));
    assert_eq!(closed.consecutive_failures, None);
    assert!(closed.updated_at >= forced.updated_at);

    // Forcing a closed breaker opens it now, with no limit.
    let forced = store
        .breaker_set("other-binding", BreakerWrite::Forced)
        .await
        .unwrap();
    assert!(forced.open && forced.forced && forced.opened_at.is_some());
    assert_eq!((forced.revision, forced.open_until), (1, None));

    // Deleting the binding forgets its breaker; other bindings keep theirs.
    store
        .put_binding(BINDING, TENANT, HANDLER, &json!({"topics": ["t"]}))
        .await
        .unwrap();
    assert!(store.delete_binding(BINDING).await.unwrap());
    assert_eq!(store.breaker_get(BINDING).await.unwrap(), None);
    assert!(store.breaker_get("other-binding").await.unwrap().is_some());
}

async fn sqlite_store() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!("sqlite://{}", dir.path().join("weir.db").display());
    let store = weir::store::connect(&url).await.expect("open and migrate");
    (dir, store)
}

/// A worker claims only the replays it can run: those of the partitions it holds, and those of
/// topics its binding no longer reads; another replica's partitions are left alone.
async fn dlq_replays_are_claimed_only_within_the_scope(store: &dyn Store) {
    let lease = Duration::from_secs(60);
    let mut queued = Vec::new();
    for (n, (topic, partition)) in [("orders", 0), ("orders", 1), ("orders", 2), ("former", 7)]
        .into_iter()
        .enumerate()
    {
        let mut entry = dlq_entry(BINDING, &format!("s{n}"), DlqErrorKind::Permanent, n as i64);
        entry.topic = topic.to_owned();
        entry.partition = partition;
        let id = store.dlq_insert(&entry).await.unwrap();
        store.dlq_replay(TENANT, id).await.unwrap();
        queued.push(id);
    }
    let topics = vec!["orders".to_owned(), "refunds".to_owned()];
    let claim = |held: Vec<(&'static str, i32)>| {
        let topics = topics.clone();
        async move {
            let partitions: Vec<(String, i32)> =
                held.into_iter().map(|(t, p)| (t.to_owned(), p)).collect();
            let scope = ReplayScope::Held {
                topics: &topics,
                partitions: &partitions,
            };
            let claimed = store
                .dlq_claim_replays(BINDING, scope, 10, lease)
                .await
                .unwrap();
            claimed.iter().map(|e| e.id).collect::<Vec<_>>()
        }
    };
    // This replica holds orders/1 and refunds/0: it claims orders/1 and the former topic's.
    assert_eq!(
        claim(vec![("orders", 1), ("refunds", 0)]).await,
        [queued[1], queued[3]]
    );
    // A replica holding nothing of the binding's claims only what is left of former topics:
    // nothing now.
    assert_eq!(claim(vec![]).await, Vec::<i64>::new());
    // The replica holding orders/0 and orders/2 claims those two.
    assert_eq!(
        claim(vec![("orders", 0), ("orders", 2)]).await,
        [queued[0], queued[2]]
    );
}

macro_rules! contract {
    ($($test:ident),+ $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    let fixture = super::PgFixture::new().await;
                    super::$test(&*fixture.store).await;
                    fixture.drop().await;
                }
            )+
        }

        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    let (_dir, store) = super::sqlite_store().await;
                    super::$test(&*store).await;
                }
            )+
        }
    };
}

async fn dlq_pending_counts_are_grouped_by_tenant_and_handler(store: &dyn Store) {
    assert_eq!(store.dlq_pending_counts().await.unwrap(), Vec::new());
    let first = store
        .dlq_insert(&dlq_entry(BINDING, "m1", DlqErrorKind::Permanent, 10))
        .await
        .unwrap();
    store
        .dlq_insert(&dlq_entry(BINDING, "m2", DlqErrorKind::Trap, 20))
        .await
        .unwrap();
    store
        .dlq_insert(&dlq_entry(BINDING, "m3", DlqErrorKind::Retryable, 30))
        .await
        .unwrap();
    let mut other = dlq_entry("acme-billing", "m1", DlqErrorKind::Trap, 40);
    other.handler = "billing".to_owned();
    store.dlq_insert(&other).await.unwrap();
    // An entry queued for replay is no longer pending.
    store.dlq_replay(TENANT, first).await.unwrap();
    assert_eq!(
        store.dlq_pending_counts().await.unwrap(),
        vec![
            (TENANT.to_owned(), "billing".to_owned(), 1),
            (TENANT.to_owned(), HANDLER.to_owned(), 2),
        ]
    );
}

contract!(
    handler_versions_are_idempotent_and_activation_swaps,
    bindings_upsert_bumps_revision_and_deletion_is_visible,
    commit_writes_state_and_outbox_rows,
    a_message_committed_twice_takes_effect_once,
    duplicates_within_one_batch_keep_the_first,
    batches_of_processed_keys_alone_commit_each_message_once,
    position_ids_commit_once_as_bits_of_their_blocks,
    state_writes_apply_in_order,
    a_batch_of_a_thousand_commits_in_one_call,
    outbox_claim_mark_sent_and_mark_error,
    outbox_notifications_wake_the_relay,
    dlq_insert_list_filter_paginate_and_resolve,
    sweep_forgets_old_processed_keys,
    a_closed_store_is_unavailable,
    quotas_count_handlers_and_bytes_in_the_upload,
    handlers_are_listed_and_deleted_unless_a_binding_runs_them,
    tenants_are_created_listed_and_deleted_when_empty,
    tenant_rate_limits_are_set_read_and_removed,
    tokens_are_found_by_hash_and_revoked_by_their_tenant,
    state_list_returns_the_values_of_one_key_by_name,
    dlq_replays_are_claimed_with_a_lease_and_marked_by_the_commit,
    dlq_replays_are_claimed_only_within_the_scope,
    breakers_are_shared_by_revision_and_deleted_with_their_binding,
    dlq_pending_counts_are_grouped_by_tenant_and_handler,
);

// ---- engine-specific --------------------------------------------------------------------------

#[tokio::test]
async fn postgres_that_does_not_listen_is_unavailable() {
    // Nothing listens on port 1: connection refused.
    let error = match weir::store::connect("postgres://weir:weir@127.0.0.1:1/weir").await {
        Ok(_) => panic!("connected to a port where nothing listens"),
        Err(error) => error,
    };
    assert!(error.is_unavailable(), "{error:?}");
    assert!(error.to_string().contains("unavailable"), "{error}");
}

#[tokio::test]
async fn migrations_run_again_are_a_no_op() {
    let fixture = PgFixture::new().await;
    fixture.store.migrate().await.unwrap();
    fixture.store.migrate().await.unwrap();
    assert_eq!(fixture.store.bindings_revision().await.unwrap(), 0);
    fixture.drop().await;

    let (dir, store) = sqlite_store().await;
    store
        .put_binding(BINDING, TENANT, HANDLER, &json!({"a": 1}))
        .await
        .unwrap();
    store.close().await;
    // Reopening the file keeps what was written and migrates nothing twice.
    let url = format!("sqlite://{}", dir.path().join("weir.db").display());
    let reopened = weir::store::connect(&url).await.unwrap();
    assert_eq!(
        reopened.binding(BINDING).await.unwrap().unwrap().spec,
        json!({"a": 1})
    );
}

/// A migrator holding `engine`'s migrations up to `last` (as a database written by an older
/// Weir has them), copied into `dir`.
async fn migrations_up_to(
    engine: &str,
    last: i64,
    dir: &std::path::Path,
) -> sqlx::migrate::Migrator {
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migrations")
        .join(engine);
    for entry in std::fs::read_dir(&source).expect("read the migrations") {
        let path = entry.expect("a migration").path();
        if path.extension().and_then(|e| e.to_str()) != Some("sql") {
            continue;
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let version: i64 = name
            .split('_')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("numbered");
        if version <= last {
            std::fs::copy(&path, dir.join(&name)).expect("copy a migration");
        }
    }
    sqlx::migrate::Migrator::new(dir)
        .await
        .expect("load the migrations")
}

/// Migration 0006 rebuilt the processed keys' primary key (message id first, bytewise); 0007
/// moved the position ids into offset blocks. A database written before them keeps every
/// processed key and its age: a message committed then is still a duplicate after the upgrade
/// (an id that only looks like a position stays a row of its own), and the retention sweep
/// still finds it old, on both engines.
#[tokio::test]
async fn upgrading_keeps_every_processed_key() {
    // Processed in 2020, before the upgrade; `{at}` is how the engine writes that time.
    let old_keys = |at: &str| {
        format!(
            "INSERT INTO processed_keys (binding_id, message_id, processed_at) VALUES \
             ('{BINDING}', 'm1', {at}), ('{BINDING}', 'm2', {at}), ('other-binding', 'm3', {at}), \
             ('{BINDING}', 'orders/0/1', {at}), ('{BINDING}', 'orders/0/63', {at}), \
             ('{BINDING}', 'orders/2147483647/9223372036854775807', {at}), \
             ('{BINDING}', 'orders/01/1', {at}), ('{BINDING}', 'orders/0/9223372036854775808', {at}), \
             ('{BINDING}', 'a/b/1/5', {at}), ('{BINDING}', 't p/1/5', {at}), \
             ('{BINDING}', 'tö/1/5', {at}), ('{BINDING}', 't/2147483648/1', {at}), \
             ('{BINDING}', '{long}/1/2', {at}), ('{BINDING}', '{too_long}/1/2', {at})",
            long = "t".repeat(249),
            too_long = "t".repeat(250),
        )
    };
    let check = |store: Arc<dyn Store>| async move {
        let batch = [
            completion("m1", "k", vec![set("a", "1")], &[]),
            completion("m2", "k", vec![], &[]),
            completion("m3", "k", vec![], &[]),
            completion("m4", "k", vec![], &[]),
            completion("orders/0/1", "k", vec![set("a", "1")], &[]),
            completion("orders/0/63", "k", vec![], &[]),
            completion("orders/2147483647/9223372036854775807", "k", vec![], &[]),
            completion("orders/01/1", "k", vec![], &[]),
            completion("orders/0/9223372036854775808", "k", vec![], &[]),
            completion("orders/1/1", "k", vec![], &[]),
            completion("a/b/1/5", "k", vec![], &[]),
            completion("t p/1/5", "k", vec![], &[]),
            completion("tö/1/5", "k", vec![], &[]),
            completion("t/2147483648/1", "k", vec![], &[]),
            completion(&format!("{}/1/2", "t".repeat(249)), "k", vec![], &[]),
            completion(&format!("{}/1/2", "t".repeat(250)), "k", vec![], &[]),
        ];
        // Each id from before the upgrade, kept as a row or moved into a block, is found where
        // today's rule looks for it.
        // m3 was processed by another binding: new to this one; so is orders/1/1.
        assert_eq!(
            store.commit(&batch).await.unwrap(),
            vec![
                Duplicate, Duplicate, Committed, Committed, Duplicate, Duplicate, Duplicate,
                Duplicate, Duplicate, Committed, Duplicate, Duplicate, Duplicate, Duplicate,
                Duplicate, Duplicate
            ]
        );
        assert_eq!(
            state(&*store, "k", "a").await,
            None,
            "a duplicate's write applied"
        );
        assert_eq!(store.commit(&batch).await.unwrap(), vec![Duplicate; 16]);
        // The keys from 2020 kept their age: the sweep takes them and nothing else.
        let cutoff = Utc.with_ymd_and_hms(2021, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(store.sweep_processed_keys(cutoff).await.unwrap(), 14);
        store.close().await;
    };

    // PostgreSQL: a schema at migration 0005 with processed keys, then today's migrations.
    let fixture = PgFixture::at_migration(5).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(old_keys("'2020-06-01T00:00:00Z'")))
        .execute(&fixture.admin_in_schema().await)
        .await
        .unwrap();
    let store = fixture.migrate().await;
    let key: Vec<(String, String)> = sqlx::query_as(
        "SELECT a.attname::text, coalesce(co.collname::text, '') FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum \
         LEFT JOIN pg_collation co ON co.oid = a.attcollation \
         WHERE i.indisprimary AND c.relname = 'processed_keys' AND n.nspname = $1 \
         ORDER BY k.ord",
    )
    .bind(&fixture.schema)
    .fetch_all(&fixture.admin)
    .await
    .unwrap();
    let c = |column: &str| (column.to_owned(), "C".to_owned());
    assert_eq!(key, [c("message_id"), c("binding_id")]);
    check(store).await;
    fixture.drop_schema().await;

    // SQLite: the same, in a file.
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("weir.db").display());
    let old = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&format!("{url}?mode=rwc"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    migrations_up_to("sqlite", 5, dir.path())
        .await
        .run(&old)
        .await
        .unwrap();
    let micros = Utc
        .with_ymd_and_hms(2020, 6, 1, 0, 0, 0)
        .unwrap()
        .timestamp_micros();
    sqlx::raw_sql(sqlx::AssertSqlSafe(old_keys(&micros.to_string())))
        .execute(&old)
        .await
        .unwrap();
    old.close().await;
    let store = weir::store::connect(&url).await.expect("open and migrate");
    let key: Vec<String> = sqlx::query_scalar(
        "SELECT k.name FROM pragma_index_list('processed_keys') i, pragma_index_info(i.name) k \
         WHERE i.origin = 'pk' ORDER BY k.seqno",
    )
    .fetch_all(&sqlx::SqlitePool::connect(&url).await.unwrap())
    .await
    .unwrap();
    assert_eq!(key, ["message_id", "binding_id"]);
    check(store).await;
}

#[tokio::test]
async fn sqlite_in_memory_is_one_database() {
    let store = weir::store::connect("sqlite::memory:").await.unwrap();
    let batch = [completion("m1", "k", vec![set("a", "1")], &["m1-out"])];
    assert_eq!(store.commit(&batch).await.unwrap(), vec![Committed]);
    // Every later call sees the same database, whichever pooled connection it gets.
    let reads = (0..8).map(|_| state(&*store, "k", "a"));
    for value in futures::future::join_all(reads).await {
        assert_eq!(value.as_deref(), Some("1"));
    }
    assert_eq!(store.commit(&batch).await.unwrap(), vec![Duplicate]);
}

#[tokio::test]
async fn unknown_url_schemes_are_invalid() {
    let error = match weir::store::connect("mysql://localhost/weir").await {
        Ok(_) => panic!("accepted a mysql url"),
        Err(error) => error,
    };
    assert!(matches!(error, StoreError::Invalid(_)), "{error}");
    assert!(!error.is_unavailable());
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_commits_of_one_message_commit_it_once() {
    // Two replicas finishing the same message at the same moment (a rebalance): exactly one
    // transaction wins, on both engines.
    let fixture = PgFixture::new().await;
    let (_dir, sqlite) = sqlite_store().await;
    // A row, and a position id (a bit of an offset block).
    for (store, id) in [
        (fixture.store.clone(), "contended"),
        (sqlite.clone(), "contended"),
        (fixture.store.clone(), "contended/3/17"),
        (sqlite, "contended/3/17"),
    ] {
        let mut tasks = Vec::new();
        for attempt in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let batch = [completion(
                    id,
                    id,
                    vec![set("winner", &attempt.to_string())],
                    &[&format!("{id}-out-{attempt}")],
                )];
                store.commit(&batch).await.unwrap()[0]
            }));
        }
        let mut outcomes = BTreeMap::new();
        for task in tasks {
            *outcomes
                .entry(format!("{:?}", task.await.unwrap()))
                .or_insert(0) += 1;
        }
        assert_eq!(outcomes.get("Committed"), Some(&1), "{outcomes:?}");
        assert_eq!(outcomes.get("Duplicate"), Some(&7), "{outcomes:?}");
        let mut emitted = 0;
        for attempt in 0..8 {
            let row = store.outbox_status(&format!("{id}-out-{attempt}")).await;
            emitted += usize::from(row.unwrap().is_some());
        }
        assert_eq!(emitted, 1, "one emit in the outbox");
        let winner = state(&*store, id, "winner").await.unwrap();
        let row = store
            .outbox_status(&format!("{id}-out-{winner}"))
            .await
            .unwrap();
        assert!(row.is_some(), "the winner's emit is the one in the outbox");
    }
    fixture.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_commits_of_overlapping_offsets_commit_each_once() {
    // Replicas committing overlapping runs of offsets of the same blocks at once, bare and with
    // effects: every offset commits exactly once, on both engines.
    let fixture = PgFixture::new().await;
    let (_dir, sqlite) = sqlite_store().await;
    for store in [fixture.store.clone(), sqlite] {
        let mut tasks = Vec::new();
        for replica in 0..8_u32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let batch: Vec<Completion> = (replica * 10..replica * 10 + 30)
                    .map(|offset| {
                        let id = format!("runs/2/{offset}");
                        if replica % 2 == 0 {
                            completion(&id, "k", vec![], &[])
                        } else {
                            let out = format!("{id}-out-{replica}");
                            completion(&id, "k", vec![], &[&out])
                        }
                    })
                    .collect();
                let outcomes = store.commit(&batch).await.unwrap();
                batch.into_iter().zip(outcomes).collect::<Vec<_>>()
            }));
        }
        let mut committed = Vec::new();
        for task in tasks {
            for (completion, outcome) in task.await.unwrap() {
                // A completion's emit is in the outbox exactly when it committed.
                for emit in &completion.emits {
                    let row = store.outbox_status(&emit.message_id).await.unwrap();
                    assert_eq!(row.is_some(), outcome == Committed, "{}", emit.message_id);
                }
                if outcome == Committed {
                    committed.push(completion.message_id);
                }
            }
        }
        committed.sort();
        let expected: Vec<String> = {
            let mut all: Vec<String> = (0..100).map(|o| format!("runs/2/{o}")).collect();
            all.sort();
            all
        };
        assert_eq!(committed, expected, "each offset committed once");
        let again: Vec<Completion> = (0..100)
            .map(|o| completion(&format!("runs/2/{o}"), "k", vec![], &[]))
            .collect();
        assert_eq!(store.commit(&again).await.unwrap(), vec![Duplicate; 100]);
    }
    fixture.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_connections_killed_by_the_server_are_replaced() {
    let fixture = PgFixture::new().await;
    let store = &*fixture.store;
    assert_eq!(
        store
            .commit(&[completion("m1", "k", vec![set("a", "1")], &[])])
            .await
            .unwrap(),
        vec![Committed]
    );
    // An operator (or a fail-over) kills every connection of this store.
    let terminate = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE application_name = $1";
    let killed: i64 = sqlx::query_scalar(terminate)
        .bind(&fixture.schema)
        .fetch_one(&fixture.admin)
        .await
        .unwrap();
    assert!(killed >= 1, "no connection of the store was found to kill");
    let mut errors = Vec::new();
    let outcome = loop {
        match store
            .commit(&[completion("m2", "k", vec![set("a", "2")], &[])])
            .await
        {
            Ok(outcome) => break outcome,
            Err(error) => {
                // The pipeline's part: an unavailable store is retried, anything else is a bug.
                assert!(error.is_unavailable(), "{error}");
                errors.push(error.to_string());
                assert!(errors.len() < 20, "the store did not come back: {errors:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    eprintln!(
        "after the kill: {} unavailable answer(s) {errors:?}",
        errors.len()
    );
    assert_eq!(outcome, vec![Committed]);
    assert_eq!(state(store, "k", "a").await.as_deref(), Some("2"));
    fixture.drop().await;
}

#[tokio::test]
async fn sqlite_file_that_cannot_be_opened_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}",
        dir.path().join("missing/dir/weir.db").display()
    );
    let error = match weir::store::connect(&url).await {
        Ok(_) => panic!("opened a file in a directory that does not exist"),
        Err(error) => error,
    };
    assert!(error.is_unavailable(), "{error:?}");
    assert!(error.to_string().contains("unable to open"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_uploads_cannot_pass_a_quota_together() {
    // Eight uploads of eight new handlers at once under a quota of three: the check and the
    // insert are one transaction, so exactly three get in, on both engines.
    let fixture = PgFixture::new().await;
    let (_dir, sqlite) = sqlite_store().await;
    for store in [fixture.store.clone(), sqlite] {
        let tasks: Vec<_> = (0..8)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move {
                    let limits = Quota {
                        max_handlers: Some(3),
                        max_total_bytes: None,
                    };
                    let component = format!("component {n}");
                    store
                        .put_handler_version(
                            TENANT,
                            &format!("handler-{n}"),
                            component.as_bytes(),
                            &limits,
                        )
                        .await
                })
            })
            .collect();
        let mut stored = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => stored += 1,
                Err(StoreError::QuotaExceeded(_)) => {}
                Err(error) => panic!("upload failed otherwise: {error}"),
            }
        }
        assert_eq!(stored, 3);
        assert_eq!(store.tenant_usage(TENANT).await.unwrap().handlers, 3);
        assert_eq!(store.list_handlers(TENANT).await.unwrap().len(), 3);
    }
    fixture.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_replay_claims_never_share_an_entry() {
    let fixture = PgFixture::new().await;
    let (_dir, sqlite) = sqlite_store().await;
    for store in [fixture.store.clone(), sqlite] {
        let mut queued = Vec::new();
        for n in 0..20 {
            let message_id = format!("m{n}");
            let id = store
                .dlq_insert(&dlq_entry(BINDING, &message_id, DlqErrorKind::Trap, n))
                .await
                .unwrap();
            store.dlq_replay(TENANT, id).await.unwrap();
            queued.push(id);
        }
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .dlq_claim_replays(BINDING, ReplayScope::Any, 5, Duration::from_secs(60))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut claimed = Vec::new();
        for task in tasks {
            claimed.extend(task.await.unwrap().into_iter().map(|entry| entry.id));
        }
        claimed.sort_unstable();
        assert_eq!(claimed, queued, "every entry claimed exactly once");
    }
    fixture.drop().await;
}
