//! `/v1/whoami`, `/v1/tenants`, `/v1/tenants/{tenant}/rate-limit` and
//! `/v1/tenants/{tenant}/tokens`: who is asking, tenants with their quotas and rate limits, and
//! tenant tokens (shown once, stored hashed, revocable, optional expiry). A rate limit is only
//! stored here; hosts pick it up at their next reconciliation.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AdminState;
use super::auth::{Principal, new_token, token_hash};
use super::error::{ApiError, ErrorBody, JsonBody};
use crate::pipeline::binding::check_name;
use crate::store::{NewTenant, NewToken, Quota, RateLimit, Tenant, TokenRecord};

/// Who the token belongs to.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    /// `admin` or `tenant`.
    pub role: String,
    /// The tenant, for a tenant token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The token's public id, for a tenant token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
}

/// Who is asking.
#[utoipa::path(get, path = "/v1/whoami", tag = "tenants",
    responses((status = 200, body = WhoAmI), (status = 401, body = ErrorBody)))]
pub async fn whoami(principal: Principal) -> Json<WhoAmI> {
    Json(match principal {
        Principal::Admin => WhoAmI {
            role: "admin".into(),
            tenant: None,
            token_id: None,
        },
        Principal::Tenant { tenant, token_id } => WhoAmI {
            role: "tenant".into(),
            tenant: Some(tenant),
            token_id: Some(token_id),
        },
    })
}

/// A tenant to create.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// Tenant id: 1-64 characters of a-z, 0-9, `-`, `_`.
    pub id: String,
    /// Handlers it may have (default: the platform's `server.tenant_max_handlers`).
    #[serde(default)]
    pub max_handlers: Option<i64>,
    /// Component bytes it may store (default: `server.tenant_max_total_bytes`).
    #[serde(default)]
    pub max_total_bytes: Option<i64>,
}

/// A tenant, its quotas in force and what it uses of them.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TenantView {
    /// Tenant id.
    pub id: String,
    /// Handlers it may have.
    pub max_handlers: i64,
    /// Component bytes it may store.
    pub max_total_bytes: i64,
    /// Handlers it has.
    pub handlers: i64,
    /// Component bytes it stores.
    pub total_bytes: i64,
    /// When it was created (absent for a tenant that only exists through its handlers).
    pub created_at: Option<DateTime<Utc>>,
    /// Its rate limit on each host; absent: unlimited.
    pub rate_limit: Option<RateLimitView>,
}

/// A tenant's rate limit: a token bucket per host, shared by the tenant's bindings there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitView {
    /// Messages per second each host dispatches for the tenant, at most (at least 1).
    pub messages_per_second: i64,
    /// Messages dispatched at once after an idle spell, at most (at least 1).
    pub burst: i64,
}

impl From<RateLimit> for RateLimitView {
    fn from(limit: RateLimit) -> Self {
        Self {
            messages_per_second: i64::from(limit.messages_per_second),
            burst: i64::from(limit.burst),
        }
    }
}

impl RateLimitView {
    /// The limit to store; a field-named error for a value out of range.
    fn validate(self) -> Result<RateLimit, ApiError> {
        let field = |name: &str, value: i64| {
            u32::try_from(value)
                .ok()
                .filter(|v| *v >= 1)
                .ok_or_else(|| {
                    ApiError::invalid(name, format!("must be between 1 and {}", u32::MAX))
                })
        };
        Ok(RateLimit {
            messages_per_second: field("messages_per_second", self.messages_per_second)?,
            burst: field("burst", self.burst)?,
        })
    }
}

impl AdminState {
    /// The quotas in force for `tenant` (its own, else the platform's).
    pub(crate) async fn quota(&self, tenant: &str) -> Result<Quota, ApiError> {
        let own = self.store.tenant(tenant).await?.map(|t| t.quota);
        let own = own.unwrap_or_default();
        Ok(Quota {
            max_handlers: Some(own.max_handlers.unwrap_or(self.tenant_max_handlers)),
            max_total_bytes: Some(own.max_total_bytes.unwrap_or(self.tenant_max_total_bytes)),
        })
    }

    async fn tenant_view(&self, id: &str, tenant: Option<&Tenant>) -> Result<TenantView, ApiError> {
        let quota = self.quota(id).await?;
        let usage = self.store.tenant_usage(id).await?;
        Ok(TenantView {
            id: id.to_owned(),
            max_handlers: quota.max_handlers.unwrap_or(self.tenant_max_handlers),
            max_total_bytes: quota.max_total_bytes.unwrap_or(self.tenant_max_total_bytes),
            handlers: usage.handlers,
            total_bytes: usage.total_bytes,
            created_at: tenant.map(|t| t.created_at),
            rate_limit: tenant.and_then(|t| t.rate_limit).map(RateLimitView::from),
        })
    }
}

fn check_quota(field: &str, value: Option<i64>) -> Result<(), ApiError> {
    match value {
        Some(v) if v < 0 => Err(ApiError::invalid(field, "must not be negative")),
        _ => Ok(()),
    }
}

/// Create a tenant (admin).
#[utoipa::path(post, path = "/v1/tenants", tag = "tenants", request_body = CreateTenant,
    responses((status = 201, body = TenantView), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn create_tenant(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    JsonBody(body): JsonBody<CreateTenant>,
) -> Result<(StatusCode, Json<TenantView>), ApiError> {
    principal.require_admin()?;
    check_name("id", &body.id)?;
    check_quota("max_handlers", body.max_handlers)?;
    check_quota("max_total_bytes", body.max_total_bytes)?;
    let tenant = state
        .store
        .create_tenant(&NewTenant {
            id: body.id.clone(),
            quota: Quota {
                max_handlers: body.max_handlers,
                max_total_bytes: body.max_total_bytes,
            },
        })
        .await?;
    let view = state.tenant_view(&tenant.id, Some(&tenant)).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Every tenant (admin).
#[utoipa::path(get, path = "/v1/tenants", tag = "tenants",
    responses((status = 200, body = [TenantView]), (status = 403, body = ErrorBody)))]
pub async fn list_tenants(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
) -> Result<Json<Vec<TenantView>>, ApiError> {
    principal.require_admin()?;
    let mut views = Vec::new();
    for tenant in state.store.list_tenants().await? {
        views.push(state.tenant_view(&tenant.id, Some(&tenant)).await?);
    }
    Ok(Json(views))
}

/// One tenant (the admin, or the tenant itself).
#[utoipa::path(get, path = "/v1/tenants/{tenant}", tag = "tenants",
    params(("tenant" = String, Path, description = "tenant id")),
    responses((status = 200, body = TenantView), (status = 404, body = ErrorBody)))]
pub async fn get_tenant(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path(tenant): Path<String>,
) -> Result<Json<TenantView>, ApiError> {
    principal.scope(&tenant)?;
    let record = state.store.tenant(&tenant).await?;
    if record.is_none() && principal == Principal::Admin {
        return Err(ApiError::not_found(format!("tenant {tenant}")));
    }
    Ok(Json(state.tenant_view(&tenant, record.as_ref()).await?))
}

/// Delete a tenant and its tokens (admin); refused while it has handlers or bindings.
#[utoipa::path(delete, path = "/v1/tenants/{tenant}", tag = "tenants",
    params(("tenant" = String, Path, description = "tenant id")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_tenant(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path(tenant): Path<String>,
) -> Result<StatusCode, ApiError> {
    principal.require_admin()?;
    if state.store.delete_tenant(&tenant).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("tenant {tenant}")))
    }
}

/// Set a tenant's rate limit (admin): each host dispatches at most `messages_per_second` of
/// the tenant's messages (bursts of `burst`) over all its bindings there; more wait, none is
/// dropped. Hosts apply it at their next reconciliation.
#[utoipa::path(put, path = "/v1/tenants/{tenant}/rate-limit", tag = "tenants",
    params(("tenant" = String, Path, description = "tenant id")), request_body = RateLimitView,
    responses((status = 200, body = TenantView), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn set_rate_limit(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path(tenant): Path<String>,
    JsonBody(body): JsonBody<RateLimitView>,
) -> Result<Json<TenantView>, ApiError> {
    principal.require_admin()?;
    let limit = body.validate()?;
    let record = state
        .store
        .set_tenant_rate_limit(&tenant, Some(limit))
        .await?;
    Ok(Json(state.tenant_view(&tenant, Some(&record)).await?))
}

/// Remove a tenant's rate limit (admin); hosts stop limiting it at their next reconciliation.
#[utoipa::path(delete, path = "/v1/tenants/{tenant}/rate-limit", tag = "tenants",
    params(("tenant" = String, Path, description = "tenant id")),
    responses((status = 200, body = TenantView), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn remove_rate_limit(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path(tenant): Path<String>,
) -> Result<Json<TenantView>, ApiError> {
    principal.require_admin()?;
    let record = state.store.set_tenant_rate_limit(&tenant, None).await?;
    Ok(Json(state.tenant_view(&tenant, Some(&record)).await?))
}

/// A token to create.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// A label for humans, e.g. `ci` or `alice`.
    #[serde(default)]
    pub label: Option<String>,
    /// Seconds until the token stops working; none: it works until revoked.
    #[serde(default)]
    pub expires_in_s: Option<u64>,
}

/// A token without its secret.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    /// Public id (to revoke it).
    pub id: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// Its label.
    pub label: Option<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<TokenRecord> for TokenView {
    fn from(t: TokenRecord) -> Self {
        Self {
            id: t.id,
            tenant: t.tenant,
            label: t.label,
            created_at: t.created_at,
            expires_at: t.expires_at,
            revoked_at: t.revoked_at,
        }
    }
}

/// A new token, with its secret: shown this once, never again.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    /// The secret to send as `Authorization: Bearer <token>`.
    pub token: String,
    /// The token's record.
    #[serde(flatten)]
    pub record: TokenView,
}

/// Longest token label.
const MAX_LABEL: usize = 200;

/// Create a token for a tenant (admin). The secret is in this answer only.
#[utoipa::path(post, path = "/v1/tenants/{tenant}/tokens", tag = "tenants",
    params(("tenant" = String, Path, description = "tenant id")), request_body = CreateToken,
    responses((status = 201, body = CreatedToken), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn create_token(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path(tenant): Path<String>,
    JsonBody(body): JsonBody<CreateToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    principal.require_admin()?;
    if body.label.as_ref().is_some_and(|l| l.len() > MAX_LABEL) {
        return Err(ApiError::invalid(
            "label",
            format!("longer than {MAX_LABEL} bytes"),
        ));
    }
    let expires_at = match body.expires_in_s {
        None => None,
        Some(0) => return Err(ApiError::invalid("expires_in_s", "must be at least 1")),
        Some(s) => {
            let seconds = i64::try_from(s)
                .ok()
                .and_then(chrono::Duration::try_seconds)
                .ok_or_else(|| ApiError::invalid("expires_in_s", "is too large"))?;
            Some(
                Utc::now()
                    .checked_add_signed(seconds)
                    .ok_or_else(|| ApiError::invalid("expires_in_s", "is too large"))?,
            )
        }
    };
    let (id, secret) = new_token()?;
    let record = state
        .store
        .create_token(&NewToken {
            id,
            tenant,
            sha256: token_hash(&secret),
            label: body.label,
            expires_at,
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: secret,
            record: record.into(),
        }),
    ))
}

/// A tenant's tokens, without secrets (admin).
#[utoipa::path(get, path = "/v1/tenants/{tenant}/tokens", tag = "tenants",
    params(("tenant" = String, Path, description = "tenant id")),
    responses((status = 200, body = [TokenView]), (status = 403, body = ErrorBody)))]
pub async fn list_tokens(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path(tenant): Path<String>,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    principal.require_admin()?;
    let tokens = state.store.list_tokens(&tenant).await?;
    Ok(Json(tokens.into_iter().map(TokenView::from).collect()))
}

/// Revoke a token (admin); it stops working at once.
#[utoipa::path(delete, path = "/v1/tenants/{tenant}/tokens/{id}", tag = "tenants",
    params(("tenant" = String, Path, description = "tenant id"),
        ("id" = String, Path, description = "token id")),
    responses((status = 200, body = TokenView), (status = 404, body = ErrorBody)))]
pub async fn revoke_token(
    State(state): State<Arc<AdminState>>,
    principal: Principal,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Json<TokenView>, ApiError> {
    principal.require_admin()?;
    Ok(Json(state.store.revoke_token(&tenant, &id).await?.into()))
}
