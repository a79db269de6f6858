//! `/v1/tenants/{tenant}/bindings`: create, list, show, replace and delete bindings. A change
//! reaches every host at its next reconciliation, without a restart.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::AdminState;
use super::auth::Principal;
use super::error::{ApiError, ErrorBody, JsonBody, from_value};
use crate::pipeline::BindingSpec;
use crate::pipeline::binding::check_binding_id;
use crate::store::BindingRecord;

/// A binding as stored.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct BindingView {
    /// Binding id, unique across tenants.
    pub id: String,
    /// Owning tenant.
    pub tenant: String,
    /// The handler it runs.
    pub handler: String,
    /// Its policy.
    pub spec: BindingSpec,
    /// 1 when created, one more on every change.
    pub revision: i64,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was last changed.
    pub updated_at: DateTime<Utc>,
}

fn view(record: BindingRecord) -> Result<BindingView, ApiError> {
    let spec: BindingSpec = serde_json::from_value(record.spec)
        .map_err(|e| ApiError::internal("reading a stored binding", e))?;
    Ok(BindingView {
        id: record.id,
        tenant: record.tenant,
        handler: record.handler,
        spec,
        revision: record.revision,
        created_at: record.created_at,
        updated_at: record.updated_at,
    })
}

/// Read a binding body for `tenant`: unknown fields refused, every value validated with the
/// field named (settings that name a topic must name an allowed output topic), the handler
/// checked to exist.
async fn read_binding(
    state: &AdminState,
    tenant: &str,
    body: serde_json::Value,
) -> Result<(Option<String>, BindingSpec), ApiError> {
    let serde_json::Value::Object(mut fields) = body else {
        return Err(ApiError::bad_request("expected a JSON object"));
    };
    let id = match fields.remove("id") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(id)) => Some(id),
        Some(_) => return Err(ApiError::invalid("id", "must be a string")),
    };
    match fields.get("tenant") {
        None => {}
        Some(serde_json::Value::String(t)) if t == tenant => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "tenant",
                "is taken from the path; leave it out",
            ));
        }
    }
    fields.insert(
        "tenant".into(),
        serde_json::Value::String(tenant.to_owned()),
    );
    let spec: BindingSpec = from_value(serde_json::Value::Object(fields))?;
    spec.validate()?;
    if state
        .store
        .list_handler_versions(tenant, &spec.handler)
        .await?
        .is_empty()
    {
        return Err(ApiError::invalid(
            "handler",
            format!(
                "tenant {tenant} has no handler `{}`; upload a version first",
                spec.handler
            ),
        ));
    }
    Ok((id, spec))
}

pub(super) async fn owned(
    state: &AdminState,
    tenant: &str,
    id: &str,
) -> Result<BindingRecord, ApiError> {
    match state.store.binding(id).await? {
        Some(record) if record.tenant == tenant => Ok(record),
        _ => Err(ApiError::not_found(format!("binding {id}"))),
    }
}

async fn store_binding(
    state: &AdminState,
    id: &str,
    spec: &BindingSpec,
) -> Result<BindingView, ApiError> {
    let json =
        serde_json::to_value(spec).map_err(|e| ApiError::internal("encoding a binding", e))?;
    let record = state
        .store
        .put_binding(id, &spec.tenant, &spec.handler, &json)
        .await?;
    tracing::info!(binding = %id, tenant = %spec.tenant, handler = %spec.handler, revision = record.revision, "binding stored");
    view(record)
}

/// Create a binding.
#[utoipa::path(post, path = "/v1/tenants/{tenant}/bindings", tag = "bindings",
    params(("tenant" = String, Path, description = "tenant id")), request_body = BindingSpec,
    responses((status = 201, body = BindingView), (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_binding(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path(tenant): Path<String>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> Result<(StatusCode, Json<BindingView>), ApiError> {
    principal.scope(&tenant)?;
    let (id, spec) = read_binding(&state, &tenant, body).await?;
    let id = id.unwrap_or_else(|| format!("{tenant}.{}", spec.handler));
    check_binding_id(&id).map_err(|e| ApiError::invalid("id", e.message))?;
    if state.store.binding(&id).await?.is_some() {
        return Err(ApiError::conflict(format!(
            "binding {id} exists; change it with PUT /v1/tenants/{tenant}/bindings/{id}"
        )));
    }
    Ok((
        StatusCode::CREATED,
        Json(store_binding(&state, &id, &spec).await?),
    ))
}

/// A tenant's bindings.
#[utoipa::path(get, path = "/v1/tenants/{tenant}/bindings", tag = "bindings",
    params(("tenant" = String, Path, description = "tenant id")),
    responses((status = 200, body = [BindingView]), (status = 404, body = ErrorBody)))]
pub async fn list_bindings(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path(tenant): Path<String>,
) -> Result<Json<Vec<BindingView>>, ApiError> {
    principal.scope(&tenant)?;
    let records = state.store.list_bindings().await?;
    let views = records
        .into_iter()
        .filter(|r| r.tenant == tenant)
        .map(view)
        .collect::<Result<_, _>>()?;
    Ok(Json(views))
}

/// One binding.
#[utoipa::path(get, path = "/v1/tenants/{tenant}/bindings/{id}", tag = "bindings",
    params(("tenant" = String, Path, description = "tenant id"),
        ("id" = String, Path, description = "binding id")),
    responses((status = 200, body = BindingView), (status = 404, body = ErrorBody)))]
pub async fn get_binding(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Json<BindingView>, ApiError> {
    principal.scope(&tenant)?;
    Ok(Json(view(owned(&state, &tenant, &id).await?)?))
}

/// Replace a binding's handler and policy (the revision increases; every host picks it up).
#[utoipa::path(put, path = "/v1/tenants/{tenant}/bindings/{id}", tag = "bindings",
    params(("tenant" = String, Path, description = "tenant id"),
        ("id" = String, Path, description = "binding id")),
    request_body = BindingSpec,
    responses((status = 200, body = BindingView), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn put_binding(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path((tenant, id)): Path<(String, String)>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> Result<Json<BindingView>, ApiError> {
    principal.scope(&tenant)?;
    owned(&state, &tenant, &id).await?;
    let (body_id, spec) = read_binding(&state, &tenant, body).await?;
    if body_id.is_some_and(|b| b != id) {
        return Err(ApiError::invalid("id", "differs from the id in the path"));
    }
    Ok(Json(store_binding(&state, &id, &spec).await?))
}

/// Delete a binding (its processed keys and DLQ entries stay).
#[utoipa::path(delete, path = "/v1/tenants/{tenant}/bindings/{id}", tag = "bindings",
    params(("tenant" = String, Path, description = "tenant id"),
        ("id" = String, Path, description = "binding id")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_binding(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    principal.scope(&tenant)?;
    owned(&state, &tenant, &id).await?;
    state.store.delete_binding(&id).await?;
    tracing::info!(binding = %id, %tenant, "binding deleted");
    Ok(StatusCode::NO_CONTENT)
}
