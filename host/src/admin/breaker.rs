//! `/v1/tenants/{tenant}/bindings/{id}/breaker`: a binding's circuit breaker — its shared state,
//! a manual reset, and a force-open that holds until reset.
//!
//! Reads and writes only the store's shared breaker state ([`crate::store::Store::breaker_get`],
//! [`crate::store::Store::breaker_set`]); every worker of the binding follows a change within
//! about a second (see [`crate::pipeline::worker`]). Knows nothing of workers: the consecutive
//! failures shown are those recorded when the breaker last opened.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AdminState;
use super::auth::Principal;
use super::bindings::owned;
use super::error::{ApiError, ErrorBody};
use crate::pipeline::{BindingSpec, BreakerPolicy, BreakerState};
use crate::store::{BreakerRecord, BreakerWrite};

/// A binding's breaker, as every replica follows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BreakerView {
    /// The binding.
    pub binding_id: String,
    /// `closed`, `open` or `half_open` (open past `until`: probes run).
    pub state: BreakerState,
    /// Opened by an operator: stays open until reset.
    pub forced: bool,
    /// The consecutive failures that opened it, if a worker opened it.
    pub consecutive_failures: Option<i32>,
    /// When it opened, if open.
    pub opened_at: Option<DateTime<Utc>>,
    /// When it lets probes through, if open and not forced.
    pub until: Option<DateTime<Utc>>,
    /// When the shared state was last written (none: never, it is closed).
    pub updated_at: Option<DateTime<Utc>>,
    /// The binding's breaker policy.
    pub policy: BreakerPolicy,
}

fn view(binding_id: &str, policy: BreakerPolicy, record: Option<BreakerRecord>) -> BreakerView {
    let Some(record) = record else {
        return BreakerView {
            binding_id: binding_id.to_owned(),
            state: BreakerState::Closed,
            forced: false,
            consecutive_failures: None,
            opened_at: None,
            until: None,
            updated_at: None,
            policy,
        };
    };
    let state = match (record.open, record.forced, record.open_until) {
        (false, _, _) => BreakerState::Closed,
        (true, true, _) => BreakerState::Open,
        (true, false, Some(until)) if until > Utc::now() => BreakerState::Open,
        (true, false, _) => BreakerState::HalfOpen,
    };
    BreakerView {
        binding_id: record.binding_id,
        state,
        forced: record.forced,
        consecutive_failures: record.consecutive_failures,
        opened_at: record.opened_at,
        until: record.open_until,
        updated_at: Some(record.updated_at),
        policy,
    }
}

/// The binding (scoped to `tenant`) and its breaker policy.
async fn policy(state: &AdminState, tenant: &str, id: &str) -> Result<BreakerPolicy, ApiError> {
    let record = owned(state, tenant, id).await?;
    let spec: BindingSpec = serde_json::from_value(record.spec)
        .map_err(|e| ApiError::internal("reading a stored binding", e))?;
    Ok(spec.breaker)
}

/// A binding's breaker.
#[utoipa::path(get, path = "/v1/tenants/{tenant}/bindings/{id}/breaker", tag = "bindings",
    params(("tenant" = String, Path, description = "tenant id"),
        ("id" = String, Path, description = "binding id")),
    responses((status = 200, body = BreakerView), (status = 404, body = ErrorBody)))]
pub async fn get_breaker(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Json<BreakerView>, ApiError> {
    principal.scope(&tenant)?;
    let policy = policy(&state, &tenant, &id).await?;
    let record = state.store.breaker_get(&id).await?;
    Ok(Json(view(&id, policy, record)))
}

/// Close a binding's breaker (also a forced one): every replica resumes within about a second.
#[utoipa::path(post, path = "/v1/tenants/{tenant}/bindings/{id}/breaker/reset", tag = "bindings",
    params(("tenant" = String, Path, description = "tenant id"),
        ("id" = String, Path, description = "binding id")),
    responses((status = 200, body = BreakerView), (status = 404, body = ErrorBody)))]
pub async fn reset_breaker(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Json<BreakerView>, ApiError> {
    write(&state, &principal, &tenant, &id, BreakerWrite::Closed).await
}

/// Open a binding's breaker until reset: every replica pauses the binding's partitions within
/// about a second; messages are not spent meanwhile.
#[utoipa::path(post, path = "/v1/tenants/{tenant}/bindings/{id}/breaker/open", tag = "bindings",
    params(("tenant" = String, Path, description = "tenant id"),
        ("id" = String, Path, description = "binding id")),
    responses((status = 200, body = BreakerView), (status = 404, body = ErrorBody)))]
pub async fn open_breaker(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Json<BreakerView>, ApiError> {
    write(&state, &principal, &tenant, &id, BreakerWrite::Forced).await
}

async fn write(
    state: &AdminState,
    principal: &Principal,
    tenant: &str,
    id: &str,
    write: BreakerWrite,
) -> Result<Json<BreakerView>, ApiError> {
    principal.scope(tenant)?;
    let policy = policy(state, tenant, id).await?;
    let record = state.store.breaker_set(id, write).await?;
    tracing::info!(binding = %id, %tenant, ?write, "breaker changed through the admin API");
    Ok(Json(view(id, policy, Some(record))))
}
