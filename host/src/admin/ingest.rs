//! `POST /v1/topics/{topic}/messages` and `GET /v1/messages/{id}`: the ingest endpoint. It writes
//! to the outbox and answers at once with ids in state `pending` — so it keeps accepting while
//! Kafka is down — and the outbox relay publishes. A tenant may ingest only to the topics its
//! bindings consume or emit to.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AdminState;
use super::auth::{Principal, random_id};
use super::error::{ApiError, ErrorBody, JsonBody, from_value};
use crate::pipeline::BindingSpec;
use crate::runtime::Header;
use crate::store::{CommitOutcome, OutboxInsert, OutboxRecord};

/// Messages in one request, at most.
pub const MAX_BATCH: usize = 1000;
/// Payload bytes per message, at most: 1 MiB, Kafka's default `message.max.bytes`.
pub const MAX_PAYLOAD: usize = 1024 * 1024;

/// One message to publish.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestMessage {
    /// The record key (UTF-8).
    #[serde(default)]
    pub key: Option<String>,
    /// The payload as JSON (published as its compact text).
    #[serde(default)]
    pub value: Option<serde_json::Value>,
    /// The payload as base64 bytes (instead of `value`).
    #[serde(default)]
    pub value_base64: Option<String>,
    /// Record headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A stable id for the record (its `message-id` header); sending the same id twice
    /// publishes once. Default: a new random id.
    #[serde(default)]
    pub message_id: Option<String>,
}

/// One message, or a batch under `messages`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestBatch {
    /// The messages, in order.
    pub messages: Vec<IngestMessage>,
}

/// Which tenant an admin ingests for.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct IngestQuery {
    /// Required with the admin token: the tenant the records are filed under.
    pub tenant: Option<String>,
}

/// A message accepted into the outbox.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    /// Its message id (look it up at `/v1/messages/{id}`).
    pub id: String,
    /// `pending` (new), the state of this tenant's earlier message with the same id, or
    /// `conflict` when the id is taken by another tenant (nothing accepted).
    pub state: String,
    /// Whether a message with this id was accepted before (this one is not published again).
    pub duplicate: bool,
}

/// The answer to an ingest.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IngestAnswer {
    /// One per message, in order.
    pub messages: Vec<Accepted>,
}

fn message(topic: &str, index: usize, m: IngestMessage) -> Result<OutboxInsert, ApiError> {
    let field = |name: &str| format!("messages[{index}].{name}");
    let payload = match (m.value, m.value_base64) {
        (Some(value), None) => serde_json::to_vec(&value)
            .map_err(|e| ApiError::invalid(field("value"), e.to_string()))?,
        (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| ApiError::invalid(field("value_base64"), format!("not base64: {e}")))?,
        (None, None) => Vec::new(),
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                field("value"),
                "give `value` or `value_base64`, not both",
            ));
        }
    };
    if payload.len() > MAX_PAYLOAD {
        return Err(ApiError::invalid(
            field("value"),
            format!("{} bytes is over the limit of {MAX_PAYLOAD}", payload.len()),
        ));
    }
    let id = match m.message_id {
        Some(id) if id.is_empty() || id.len() > 255 => {
            return Err(ApiError::invalid(
                field("message_id"),
                "must be 1-255 characters",
            ));
        }
        Some(id) => id,
        None => random_id()?,
    };
    if m.headers.keys().any(|k| k == "message-id") {
        return Err(ApiError::invalid(
            field("headers.message-id"),
            "set `message_id` instead",
        ));
    }
    Ok(OutboxInsert {
        message_id: id.clone(),
        topic: topic.to_owned(),
        key: m.key.map(String::into_bytes),
        payload,
        headers: m
            .headers
            .into_iter()
            .map(|(key, value)| Header {
                key,
                value: value.into_bytes(),
            })
            .collect(),
        causation_id: id,
        traceparent: None,
    })
}

/// The topics `tenant` may ingest to: those its bindings consume or emit to.
async fn allowed_topics(state: &AdminState, tenant: &str) -> Result<BTreeSet<String>, ApiError> {
    let mut topics = BTreeSet::new();
    for record in state.store.list_bindings().await? {
        if record.tenant != tenant {
            continue;
        }
        if let Ok(spec) = serde_json::from_value::<BindingSpec>(record.spec) {
            topics.extend(spec.topics);
            topics.extend(spec.output_topics);
        }
    }
    Ok(topics)
}

/// Publish one message (`{"key", "value", …}`) or a batch (`{"messages": [...]}`) through the
/// outbox. Answers at once; the relay publishes.
#[utoipa::path(post, path = "/v1/topics/{topic}/messages", tag = "ingest",
    params(("topic" = String, Path, description = "Kafka topic"), IngestQuery),
    request_body = IngestBatch,
    responses((status = 202, body = IngestAnswer), (status = 403, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn ingest(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path(topic): Path<String>,
    Query(query): Query<IngestQuery>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> Result<(StatusCode, Json<IngestAnswer>), ApiError> {
    let tenant = match (&principal, query.tenant) {
        (Principal::Tenant { tenant, .. }, None) => tenant.clone(),
        (Principal::Tenant { tenant, .. }, Some(asked)) if *tenant == asked => asked,
        (Principal::Tenant { .. }, Some(asked)) => {
            return Err(ApiError::not_found(format!("tenant {asked}")));
        }
        (Principal::Admin, Some(tenant)) => tenant,
        (Principal::Admin, None) => {
            return Err(ApiError::invalid(
                "tenant",
                "the admin token ingests for a tenant: add ?tenant=<id>",
            ));
        }
    };
    let messages = if body.get("messages").is_some() {
        from_value::<IngestBatch>(body)?.messages
    } else {
        vec![from_value::<IngestMessage>(body)?]
    };
    if messages.is_empty() || messages.len() > MAX_BATCH {
        return Err(ApiError::invalid(
            "messages",
            format!("send 1 to {MAX_BATCH} messages"),
        ));
    }
    if principal != Principal::Admin && !allowed_topics(&state, &tenant).await?.contains(&topic) {
        return Err(ApiError::forbidden(format!(
            "tenant {tenant} may not ingest to topic {topic}: it is not a topic of its bindings"
        )));
    }
    let rows = messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| message(&topic, i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let outcomes = state.store.outbox_insert(&tenant, None, &rows).await?;
    let mut answers = Vec::with_capacity(rows.len());
    for (row, outcome) in rows.iter().zip(outcomes) {
        let duplicate = outcome == CommitOutcome::Duplicate;
        let state_now = if duplicate {
            match state.store.outbox_status(&row.message_id).await? {
                Some(existing) if existing.tenant == tenant => existing.state.to_string(),
                // Another tenant's id: say nothing about it.
                Some(_) => "conflict".to_owned(),
                None => "pending".to_owned(),
            }
        } else {
            "pending".to_owned()
        };
        answers.push(Accepted {
            id: row.message_id.clone(),
            state: state_now,
            duplicate,
        });
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(IngestAnswer { messages: answers }),
    ))
}

/// Where an ingested (or emitted) message is.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MessageStatus {
    /// Message id.
    pub id: String,
    /// Topic.
    pub topic: String,
    /// `pending`, `sent` or `error`.
    pub state: String,
    /// Publish attempts that failed.
    pub attempts: i32,
    /// The last publish error.
    pub last_error: Option<String>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it was published.
    pub sent_at: Option<DateTime<Utc>>,
}

fn status(r: OutboxRecord) -> MessageStatus {
    MessageStatus {
        id: r.message_id,
        topic: r.topic,
        state: r.state.to_string(),
        attempts: r.attempts,
        last_error: r.last_error,
        created_at: r.created_at,
        sent_at: r.sent_at,
    }
}

/// The state of a message in the outbox.
#[utoipa::path(get, path = "/v1/messages/{id}", tag = "ingest",
    params(("id" = String, Path, description = "message id")),
    responses((status = 200, body = MessageStatus), (status = 404, body = ErrorBody)))]
pub async fn message_status(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<MessageStatus>, ApiError> {
    match state.store.outbox_status(&id).await? {
        Some(record) if principal.scope(&record.tenant).is_ok() => Ok(Json(status(record))),
        _ => Err(ApiError::not_found(format!("message {id}"))),
    }
}
