//! `/v1/tenants/{tenant}/handlers`: upload a version (validated as a Weir component before
//! anything is stored), list, show, delete, activate (a hot swap on every host) and roll back.

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AdminState;
use super::auth::Principal;
use super::error::{ApiError, ErrorBody, JsonBody, content_type_is, read_body};
use crate::pipeline::binding::check_name;
use crate::store::{HandlerSummary, HandlerVersion};

/// One stored version of a handler.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VersionView {
    /// Version number (1, 2, …).
    pub version: i32,
    /// SHA-256 of the component, hex.
    pub sha256: String,
    /// Component size in bytes.
    pub size: i64,
    /// When it was uploaded.
    pub created_at: DateTime<Utc>,
    /// Whether it is the version that runs.
    pub active: bool,
}

fn version_view(v: &HandlerVersion, active: Option<i32>) -> VersionView {
    VersionView {
        version: v.version,
        sha256: v.sha256.clone(),
        size: v.size,
        created_at: v.created_at,
        active: active == Some(v.version),
    }
}

/// A handler, summed up; `versions` is filled when one handler is shown.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HandlerView {
    /// Owning tenant.
    pub tenant: String,
    /// Handler name.
    pub name: String,
    /// The version that runs, if one is active.
    pub active_version: Option<i32>,
    /// The highest version.
    pub latest_version: i32,
    /// How many versions are stored.
    pub version_count: i64,
    /// Component bytes over all versions.
    pub total_bytes: i64,
    /// When the handler was created.
    pub created_at: DateTime<Utc>,
    /// Its versions, oldest first (when one handler is shown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub versions: Option<Vec<VersionView>>,
}

fn handler_view(s: HandlerSummary) -> HandlerView {
    HandlerView {
        tenant: s.tenant,
        name: s.handler,
        active_version: s.active_version,
        latest_version: s.latest_version,
        version_count: s.versions,
        total_bytes: s.total_bytes,
        created_at: s.created_at,
        versions: None,
    }
}

/// Options of an upload.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    /// Activate the version once stored (a hot swap).
    #[serde(default)]
    pub activate: bool,
}

/// What an upload did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Uploaded {
    /// The handler.
    pub name: String,
    /// The version stored (or the existing one with the same bytes).
    #[serde(flatten)]
    pub version: VersionView,
}

/// The component bytes of an upload: an `application/wasm` (or `application/octet-stream`)
/// body, or a `multipart/form-data` part named `component`.
async fn component_bytes(
    state: &Arc<AdminState>,
    request: Request,
) -> Result<bytes::Bytes, ApiError> {
    let limit = state.max_upload_bytes;
    let headers = request.headers();
    if content_type_is(headers, "application/wasm")
        || content_type_is(headers, "application/octet-stream")
    {
        return read_body(request, limit).await;
    }
    if content_type_is(headers, "multipart/form-data") {
        let mut multipart = Multipart::from_request(request, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("malformed multipart body: {e}")))?;
        loop {
            let field = multipart.next_field().await.map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too-large",
                        format!("the upload is larger than the limit of {limit} bytes"),
                    )
                } else {
                    ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()))
                }
            })?;
            let Some(field) = field else {
                return Err(ApiError::bad_request(
                    "the multipart body has no part named `component`",
                )
                .with_field("component"));
            };
            if field.name() == Some("component") {
                return field.bytes().await.map_err(|e| {
                    ApiError::new(
                        e.status(),
                        "too-large",
                        format!(
                            "cannot read the `component` part (limit {limit} bytes): {}",
                            e.body_text()
                        ),
                    )
                });
            }
        }
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
        "send the component as `Content-Type: application/wasm`, or as the `component` part of a multipart/form-data body",
    ))
}

/// Upload a handler version. The bytes are validated as a Weir component (and compiled) before
/// anything is stored; identical bytes return the existing version.
#[utoipa::path(post, path = "/v1/tenants/{tenant}/handlers/{name}/versions", tag = "handlers",
    params(("tenant" = String, Path, description = "tenant id"),
        ("name" = String, Path, description = "handler name"), UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/wasm"),
    responses((status = 201, body = Uploaded), (status = 403, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn upload_version(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path((tenant, name)): Path<(String, String)>,
    Query(query): Query<UploadQuery>,
    request: Request,
) -> Result<(StatusCode, Json<Uploaded>), ApiError> {
    principal.scope(&tenant)?;
    check_name("name", &name)?;
    let bytes = component_bytes(&state, request).await?;
    let runtime = state.runtime.clone();
    let checked = bytes.clone();
    tokio::task::spawn_blocking(move || runtime.load(&checked).map(|_| ()))
        .await
        .map_err(|e| ApiError::internal("validating the component", e))??;
    let quota = state.quota(&tenant).await?;
    let version = state
        .store
        .put_handler_version(&tenant, &name, &bytes, &quota)
        .await?;
    let active = if query.activate {
        state
            .store
            .activate(&tenant, &name, version.version)
            .await?;
        Some(version.version)
    } else {
        state
            .store
            .active_version(&tenant, &name)
            .await?
            .map(|v| v.version)
    };
    tracing::info!(%tenant, handler = %name, version = version.version, activated = query.activate, "handler version uploaded");
    Ok((
        StatusCode::CREATED,
        Json(Uploaded {
            name,
            version: version_view(&version, active),
        }),
    ))
}

/// A tenant's handlers.
#[utoipa::path(get, path = "/v1/tenants/{tenant}/handlers", tag = "handlers",
    params(("tenant" = String, Path, description = "tenant id")),
    responses((status = 200, body = [HandlerView]), (status = 404, body = ErrorBody)))]
pub async fn list_handlers(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path(tenant): Path<String>,
) -> Result<Json<Vec<HandlerView>>, ApiError> {
    principal.scope(&tenant)?;
    let handlers = state.store.list_handlers(&tenant).await?;
    Ok(Json(handlers.into_iter().map(handler_view).collect()))
}

async fn find_handler(
    state: &AdminState,
    tenant: &str,
    name: &str,
) -> Result<HandlerSummary, ApiError> {
    state
        .store
        .list_handlers(tenant)
        .await?
        .into_iter()
        .find(|h| h.handler == name)
        .ok_or_else(|| ApiError::not_found(format!("handler {name}")))
}

/// One handler with its versions.
#[utoipa::path(get, path = "/v1/tenants/{tenant}/handlers/{name}", tag = "handlers",
    params(("tenant" = String, Path, description = "tenant id"),
        ("name" = String, Path, description = "handler name")),
    responses((status = 200, body = HandlerView), (status = 404, body = ErrorBody)))]
pub async fn get_handler(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path((tenant, name)): Path<(String, String)>,
) -> Result<Json<HandlerView>, ApiError> {
    principal.scope(&tenant)?;
    let summary = find_handler(&state, &tenant, &name).await?;
    let active = summary.active_version;
    let versions = state.store.list_handler_versions(&tenant, &name).await?;
    let mut view = handler_view(summary);
    view.versions = Some(versions.iter().map(|v| version_view(v, active)).collect());
    Ok(Json(view))
}

/// Delete a handler and all its versions; refused while a binding runs it.
#[utoipa::path(delete, path = "/v1/tenants/{tenant}/handlers/{name}", tag = "handlers",
    params(("tenant" = String, Path, description = "tenant id"),
        ("name" = String, Path, description = "handler name")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_handler(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path((tenant, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    principal.scope(&tenant)?;
    if state.store.delete_handler(&tenant, &name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("handler {name}")))
    }
}

/// Which version to activate.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Activate {
    /// The version number.
    pub version: i32,
}

/// Activate a version: every host runs it from the next message on, without restarting
/// consumers; in-flight messages finish on the version they started with.
#[utoipa::path(post, path = "/v1/tenants/{tenant}/handlers/{name}/activate", tag = "handlers",
    params(("tenant" = String, Path, description = "tenant id"),
        ("name" = String, Path, description = "handler name")),
    request_body = Activate,
    responses((status = 200, body = HandlerView), (status = 404, body = ErrorBody)))]
pub async fn activate(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path((tenant, name)): Path<(String, String)>,
    JsonBody(body): JsonBody<Activate>,
) -> Result<Json<HandlerView>, ApiError> {
    principal.scope(&tenant)?;
    find_handler(&state, &tenant, &name).await?;
    state.store.activate(&tenant, &name, body.version).await?;
    tracing::info!(%tenant, handler = %name, version = body.version, "handler version activated");
    Ok(Json(handler_view(
        find_handler(&state, &tenant, &name).await?,
    )))
}

/// Roll back: activate the highest version below the active one.
#[utoipa::path(post, path = "/v1/tenants/{tenant}/handlers/{name}/rollback", tag = "handlers",
    params(("tenant" = String, Path, description = "tenant id"),
        ("name" = String, Path, description = "handler name")),
    responses((status = 200, body = HandlerView), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn rollback(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path((tenant, name)): Path<(String, String)>,
) -> Result<Json<HandlerView>, ApiError> {
    principal.scope(&tenant)?;
    let summary = find_handler(&state, &tenant, &name).await?;
    let Some(active) = summary.active_version else {
        return Err(ApiError::conflict(format!(
            "handler {name} has no active version to roll back from"
        )));
    };
    let previous = state
        .store
        .list_handler_versions(&tenant, &name)
        .await?
        .into_iter()
        .map(|v| v.version)
        .filter(|v| *v < active)
        .max()
        .ok_or_else(|| {
            ApiError::conflict(format!(
                "handler {name} has no version before {active} to roll back to"
            ))
        })?;
    state.store.activate(&tenant, &name, previous).await?;
    tracing::info!(%tenant, handler = %name, from = active, to = previous, "handler rolled back");
    Ok(Json(handler_view(
        find_handler(&state, &tenant, &name).await?,
    )))
}
