//! The admin HTTP API under `/v1`: tenants and tokens, handlers and their versions, bindings
//! and their breakers, the DLQ, keyed state for debugging, and the ingest endpoint — with one
//! error shape ([`error::ErrorBody`]) and an OpenAPI 3 document generated from these handlers
//! (`GET /v1/openapi.json`).
//!
//! Owns authentication and the tenancy rules ([`auth`]): a tenant token sees only its own
//! objects (others answer 404), admin routes answer 403 to tenant tokens, a missing or bad
//! token answers 401. Every change goes to the store and nowhere else: hosts pick bindings and
//! active versions up by reconciling, so this module knows nothing of workers, Kafka clients
//! or the relay. It uses the runtime only to validate an upload before storing it.

pub mod auth;
pub mod bindings;
pub mod breaker;
pub mod dlq;
pub mod error;
pub mod handlers;
pub mod ingest;
pub mod tenants;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use utoipa::OpenApi;

use crate::config::{Secret, ServerConfig};
use crate::runtime::Runtime;
use crate::store::Store;

/// What every route shares.
pub struct AdminState {
    /// Where everything is kept.
    pub store: Arc<dyn Store>,
    /// Validates uploads.
    pub runtime: Arc<Runtime>,
    /// The platform admin token, if one is configured.
    pub admin_token: Option<Secret>,
    /// Largest upload, bytes.
    pub max_upload_bytes: usize,
    /// Default handler quota per tenant.
    pub tenant_max_handlers: i64,
    /// Default component-bytes quota per tenant.
    pub tenant_max_total_bytes: i64,
}

impl AdminState {
    /// The state for `server`'s settings.
    pub fn new(store: Arc<dyn Store>, runtime: Arc<Runtime>, server: &ServerConfig) -> Self {
        Self {
            store,
            runtime,
            admin_token: server.admin_token.clone(),
            max_upload_bytes: usize::try_from(server.max_upload_bytes).unwrap_or(usize::MAX),
            tenant_max_handlers: server.tenant_max_handlers,
            tenant_max_total_bytes: server.tenant_max_total_bytes,
        }
    }
}

/// The OpenAPI document of the admin API.
#[derive(OpenApi)]
#[openapi(
    info(title = "Weir admin API", description = "Tenants, handlers, bindings, the DLQ and ingest. Authenticate with `Authorization: Bearer <token>`."),
    paths(
        tenants::whoami, tenants::create_tenant, tenants::list_tenants, tenants::get_tenant,
        tenants::delete_tenant, tenants::set_rate_limit, tenants::remove_rate_limit,
        tenants::create_token, tenants::list_tokens, tenants::revoke_token,
        handlers::upload_version, handlers::list_handlers, handlers::get_handler,
        handlers::delete_handler, handlers::activate, handlers::rollback, dlq::state,
        bindings::create_binding, bindings::list_bindings, bindings::get_binding,
        bindings::put_binding, bindings::delete_binding, breaker::get_breaker,
        breaker::reset_breaker, breaker::open_breaker,
        dlq::list, dlq::show, dlq::replay_one, dlq::discard_one, dlq::replay_many,
        dlq::discard_many,
        ingest::ingest, ingest::message_status,
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
    }
}

/// The OpenAPI document as JSON.
async fn openapi() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

/// Unknown routes under `/v1` answer in the API's error shape.
async fn no_route() -> error::ApiError {
    error::ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "no-route",
        "no such route; GET /v1/openapi.json lists them",
    )
}

/// The admin API's routes.
pub fn router(state: Arc<AdminState>) -> Router {
    let upload_limit = state.max_upload_bytes.saturating_add(64 * 1024);
    let t = "/v1/tenants/{tenant}";
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/whoami", get(tenants::whoami))
        .route(
            "/v1/tenants",
            get(tenants::list_tenants).post(tenants::create_tenant),
        )
        .route(t, get(tenants::get_tenant).delete(tenants::delete_tenant))
        .route(
            &format!("{t}/rate-limit"),
            axum::routing::put(tenants::set_rate_limit).delete(tenants::remove_rate_limit),
        )
        .route(
            &format!("{t}/tokens"),
            get(tenants::list_tokens).post(tenants::create_token),
        )
        .route(
            &format!("{t}/tokens/{{id}}"),
            axum::routing::delete(tenants::revoke_token),
        )
        .route(&format!("{t}/handlers"), get(handlers::list_handlers))
        .route(
            &format!("{t}/handlers/{{name}}"),
            get(handlers::get_handler).delete(handlers::delete_handler),
        )
        .route(
            &format!("{t}/handlers/{{name}}/versions"),
            post(handlers::upload_version).layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route(
            &format!("{t}/handlers/{{name}}/activate"),
            post(handlers::activate),
        )
        .route(
            &format!("{t}/handlers/{{name}}/rollback"),
            post(handlers::rollback),
        )
        .route(&format!("{t}/handlers/{{name}}/state"), get(dlq::state))
        .route(
            &format!("{t}/bindings"),
            get(bindings::list_bindings).post(bindings::create_binding),
        )
        .route(
            &format!("{t}/bindings/{{id}}"),
            get(bindings::get_binding)
                .put(bindings::put_binding)
                .delete(bindings::delete_binding),
        )
        .route(
            &format!("{t}/bindings/{{id}}/breaker"),
            get(breaker::get_breaker),
        )
        .route(
            &format!("{t}/bindings/{{id}}/breaker/reset"),
            post(breaker::reset_breaker),
        )
        .route(
            &format!("{t}/bindings/{{id}}/breaker/open"),
            post(breaker::open_breaker),
        )
        .route(&format!("{t}/dlq"), get(dlq::list))
        .route(&format!("{t}/dlq/replay"), post(dlq::replay_many))
        .route(&format!("{t}/dlq/discard"), post(dlq::discard_many))
        .route(&format!("{t}/dlq/{{id}}"), get(dlq::show))
        .route(&format!("{t}/dlq/{{id}}/replay"), post(dlq::replay_one))
        .route(&format!("{t}/dlq/{{id}}/discard"), post(dlq::discard_one))
        .route("/v1/topics/{topic}/messages", post(ingest::ingest))
        .route("/v1/messages/{id}", get(ingest::message_status))
        .route("/v1/{*rest}", axum::routing::any(no_route))
        .with_state(state)
}
