//! The admin API's one error shape, `{"error": {"code", "message", "field"?}}`, and the body
//! extractors that turn every way a request can be wrong into it.
//!
//! Owns the mapping from the modules' errors (store, binding validation, component validation)
//! to HTTP statuses and stable codes. Knows nothing of routes.

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

use crate::pipeline::BindingError;
use crate::runtime::ComponentError;
use crate::store::StoreError;

/// Largest JSON body accepted: 4 MiB (an ingest batch of a few thousand small messages).
pub const MAX_JSON_BYTES: usize = 4 * 1024 * 1024;

/// The body of every error response.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// One error.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code, e.g. `not-found`, `invalid-field`, `wrong-world`.
    pub code: String,
    /// What is wrong and what is expected, for humans.
    pub message: String,
    /// The offending field, dotted for nested ones, when one is to blame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// An error answer: a status and the body.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// The body's content.
    pub detail: ErrorDetail,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            detail: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
                field: None,
            },
        }
    }

    /// Name the field to blame.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.detail.field = Some(field.into());
        self
    }

    /// 400 `bad-request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", message)
    }

    /// 422 `invalid-field` naming `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-field", message).with_field(field)
    }

    /// 404 `not-found`.
    pub fn not_found(what: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("{what} not found"),
        )
    }

    /// 409 `conflict`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 401 with `code`.
    pub fn unauthorized(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 500 `internal`; the detail goes to the log, not to the client.
    pub fn internal(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "admin api: {context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{context} failed; the host's log has the details"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, axum::Json(ErrorBody { error: self.detail })).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match &error {
            StoreError::NotFound(what) => Self::not_found(what),
            StoreError::Conflict(message) => Self::conflict(message.clone()),
            StoreError::QuotaExceeded(message) => {
                Self::new(StatusCode::FORBIDDEN, "quota-exceeded", message.clone())
            }
            StoreError::Invalid(message) => Self::bad_request(message.clone()),
            _ if error.is_unavailable() => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "the store is unavailable; try again shortly",
            ),
            _ => Self::internal("a store operation", &error),
        }
    }
}

impl From<BindingError> for ApiError {
    fn from(error: BindingError) -> Self {
        Self::invalid(error.field, error.message)
    }
}

impl From<ComponentError> for ApiError {
    fn from(error: ComponentError) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            error.code(),
            error.to_string(),
        )
    }
}

/// Whether the request says its body is of `expected` (a media type without parameters).
pub fn content_type_is(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(expected))
}

/// Read a whole body, at most `limit` bytes (413 past it).
pub async fn read_body(request: Request, limit: usize) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                format!("the body is larger than the limit of {limit} bytes"),
            )
        })
}

/// A JSON body: `application/json` (else 415), at most [`MAX_JSON_BYTES`] (else 413), well
/// formed and of the expected shape with no unknown fields (else 400 naming the field).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        if !content_type_is(request.headers(), "application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "expected a JSON body with `Content-Type: application/json`",
            ));
        }
        let bytes = read_body(request, MAX_JSON_BYTES).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parse JSON into `T`, turning serde's message into an error naming the field by its full
/// path (e.g. `http.proxy` for an unknown field inside `http`).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer)
        .map_err(|e| json_error_at(e.inner(), &e.path().to_string()))?;
    deserializer.end().map_err(|e| json_error(&e))?;
    Ok(value)
}

/// Convert a JSON value into `T`, naming a bad field by its full path like [`parse_json`].
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value)
        .map_err(|e| json_error_at(e.inner(), &e.path().to_string()))
}

/// A field-naming error from serde's message, the field prefixed with `path` (serde's path to
/// where the error arose; `.` for the top level).
fn json_error_at(error: &serde_json::Error, path: &str) -> ApiError {
    let api = json_error(error);
    let path = path.trim_start_matches('.');
    if path.is_empty() {
        return api;
    }
    let field = match &api.detail.field {
        Some(name) if path == name || path.ends_with(&format!(".{name}")) => path.to_owned(),
        Some(name) => format!("{path}.{name}"),
        None => path.to_owned(),
    };
    api.with_field(field)
}

/// A field-naming error from serde's message.
pub fn json_error(error: &serde_json::Error) -> ApiError {
    let message = error.to_string();
    let quoted = |prefix: &str| {
        message
            .split_once(prefix)
            .and_then(|(_, rest)| rest.split('`').next())
            .map(str::to_owned)
    };
    let code = match error.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => "malformed-json",
        _ => "invalid-body",
    };
    let api = ApiError::new(StatusCode::BAD_REQUEST, code, message.clone());
    match quoted("unknown field `").or_else(|| quoted("missing field `")) {
        Some(field) => api.with_field(field),
        None => api,
    }
}
