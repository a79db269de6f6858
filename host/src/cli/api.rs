//! The admin API as the commands see it: a small typed client for `/v1`, the flags that point
//! at a server (`--server` / `WEIR_SERVER`, `--token` / `WEIR_TOKEN`), and the translation of
//! every way a call can fail into a [`Failure`] with the API's code, message and field and an
//! exit code scripts can trust.
//!
//! Presentation only: the request and response types are [`crate::admin`]'s; this module knows
//! nothing of the store or of what a route does.

use std::path::Path;
use std::time::Duration;

use clap::Args;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::common::{Failure, async_runtime};
use super::{OutputFormat, exit};
use crate::admin::error::ErrorBody;
use crate::admin::tenants::WhoAmI;
use crate::config::DEFAULT_CONFIG_FILE;

/// Environment variable naming the server when `--server` is absent.
pub const SERVER_ENV: &str = "WEIR_SERVER";
/// Environment variable holding the token when `--token` is absent.
pub const TOKEN_ENV: &str = "WEIR_TOKEN";
/// The configuration override naming a store: set, it makes the commands that can reach a
/// store directly do so (see [`store_direct`]).
const STORE_URL_ENV: &str = "WEIR_STORE__URL";
/// The server when none is named: what `weir dev` (and `weir serve` by default) listens on.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";
/// How long connecting may take: 10 s, far above a healthy server's answer and short enough
/// that a wrong address is reported while the operator still waits for it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one call may take: 5 minutes, room for a 64 MiB upload over a slow link.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Codes the API answers an upload that is not a valid Weir component with (the runtime's
/// `ComponentError::code`s): these exit with [`exit::INVALID_COMPONENT`].
const COMPONENT_CODES: &[&str] = &[
    "empty",
    "not-wasm",
    "core-module",
    "invalid-component",
    "unknown-imports",
    "wrong-world",
];
/// Characters of an error body shown when it is not the API's error shape.
const RAW_ERROR_CHARS: usize = 300;

/// The flags that point a command at a server.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// The Weir server whose admin API to call (default: `$WEIR_SERVER`, else
    /// `http://127.0.0.1:8080`, where `weir dev` serves it).
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// Bearer token: a tenant's token, or the platform admin token.
    #[arg(long, env = TOKEN_ENV, value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl ServerArgs {
    /// The server: `--server`, else `$WEIR_SERVER`, else [`DEFAULT_SERVER`]; `http://` is
    /// assumed when no scheme is given (`127.0.0.1:8080`).
    fn url(&self) -> String {
        let server = self
            .server
            .clone()
            .or_else(server_from_env)
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        if server.contains("://") {
            server
        } else {
            format!("http://{server}")
        }
    }
}

/// `$WEIR_SERVER`, when set and not empty.
pub fn server_from_env() -> Option<String> {
    std::env::var(SERVER_ENV).ok().filter(|s| !s.is_empty())
}

/// Whether a command that can do both (`weir handler deploy`, `weir binding list`) goes
/// straight to a store rather than through the admin API. The first rule that applies decides:
///
/// 1. `--config-file` → the store it configures; `--server` → the API (both: a usage error);
/// 2. `WEIR_SERVER` set → the API;
/// 3. a store configured by `WEIR_STORE__URL` or a `weir.toml` in the working directory → that
///    store, as before the API existed;
/// 4. otherwise the API at [`DEFAULT_SERVER`], where `weir dev` serves it.
pub fn store_direct(config_file: Option<&Path>, server: &ServerArgs) -> Result<bool, Failure> {
    match (config_file, &server.server) {
        (Some(_), Some(_)) => Err(Failure::usage(
            "--config-file (the store, directly) and --server (the admin API) exclude each other",
        )),
        (Some(_), None) => Ok(true),
        (None, Some(_)) => Ok(false),
        (None, None) if server_from_env().is_some() => Ok(false),
        (None, None) => Ok(
            std::env::var_os(STORE_URL_ENV).is_some_and(|v| !v.is_empty())
                || Path::new(DEFAULT_CONFIG_FILE).is_file(),
        ),
    }
}

/// The flags every API command has: the server, the token, and the output format.
#[derive(Debug, Args)]
pub struct ApiArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Output format (`human`, alias `table`, or `json`).
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// The `--tenant` flag of the commands that act on a tenant's objects.
#[derive(Debug, Args)]
pub struct TenantArg {
    /// The tenant (default: the token's own, as `GET /v1/whoami` says; the admin token must
    /// name one).
    #[arg(long)]
    pub tenant: Option<String>,
}

/// A request body.
pub enum Body<'a, T: Serialize> {
    /// None.
    Empty,
    /// A JSON document.
    Json(&'a T),
    /// A component upload (`application/wasm`).
    Wasm(Vec<u8>),
}

/// A body of no type, for requests without one.
pub const NO_BODY: Body<'static, ()> = Body::Empty;

/// A client of one server's admin API. Calls block the calling thread (the command line has
/// nothing else to do meanwhile).
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    runtime: tokio::runtime::Runtime,
}

impl Client {
    /// A client of the server `args` name. Nothing is sent yet.
    pub fn new(args: &ServerArgs) -> Result<Self, Failure> {
        let base = args.url();
        let url = reqwest::Url::parse(&base).map_err(|e| {
            Failure::usage(format!(
                "the server {base:?} is not a URL ({e}); expected e.g. {DEFAULT_SERVER}"
            ))
        })?;
        match url.scheme() {
            "http" => {}
            "https" => {
                return Err(Failure::usage(format!(
                    "{base}: this build of weir speaks plain HTTP to the admin API; use an \
                     http:// address (a TLS-terminating proxy in front of `weir serve` works)"
                )));
            }
            other => {
                return Err(Failure::usage(format!(
                    "{base}: unsupported scheme `{other}`; expected e.g. {DEFAULT_SERVER}"
                )));
            }
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(Failure::usage(format!(
                "{base}: the server address takes no query or fragment"
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("weir-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Failure::other("internal", format!("cannot build an HTTP client: {e}")))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token: args.token.clone().filter(|t| !t.is_empty()),
            http,
            runtime: async_runtime()?,
        })
    }

    /// The server's address, as given.
    pub fn server(&self) -> &str {
        &self.base
    }

    /// `GET path`, answered with a `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Failure> {
        self.call(Method::GET, path, NO_BODY)
    }

    /// A call answered with a `T` (any 2xx status with a JSON body).
    pub fn call<T: DeserializeOwned, B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Body<'_, B>,
    ) -> Result<T, Failure> {
        let (status, bytes) = self.send(method, path, body)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Failure::other(
                "bad-response",
                format!(
                    "the server at {} answered {path} with {status} and a body this weir does \
                     not understand ({e}); are the server and this command line the same version?",
                    self.base
                ),
            )
        })
    }

    /// A call answered without a body (`204 No Content`, or any 2xx whose body is ignored).
    pub fn call_empty<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Body<'_, B>,
    ) -> Result<(), Failure> {
        self.send(method, path, body).map(|_| ())
    }

    /// Send a request; a 2xx answer's status and body, or the failure it means.
    fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Body<'_, B>,
    ) -> Result<(StatusCode, bytes::Bytes), Failure> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        request = match body {
            Body::Empty => request,
            Body::Json(value) => request.json(value),
            Body::Wasm(bytes) => request
                .header(reqwest::header::CONTENT_TYPE, "application/wasm")
                .body(bytes),
        };
        self.runtime.block_on(async {
            let response = request
                .send()
                .await
                .map_err(|e| unreachable(&self.base, &e))?;
            let status = response.status();
            let bytes = response
                .bytes()
                .await
                .map_err(|e| unreachable(&self.base, &e))?;
            if status.is_success() {
                Ok((status, bytes))
            } else {
                Err(api_failure(
                    &self.base,
                    status,
                    &bytes,
                    self.token.is_some(),
                ))
            }
        })
    }

    /// The tenant a command acts on: `explicit`, else the token's own (`GET /v1/whoami`). The
    /// admin token acts for no tenant, so with it the tenant must be named (exit 2).
    pub fn tenant(&self, explicit: Option<&str>) -> Result<String, Failure> {
        if let Some(tenant) = explicit {
            return Ok(tenant.to_owned());
        }
        let me: WhoAmI = self.get("/v1/whoami")?;
        me.tenant.ok_or_else(|| {
            Failure::usage("the admin token acts for no tenant: name one with --tenant".to_owned())
        })
    }
}

/// A call that never got an answer: the server is down, unreachable or too slow.
fn unreachable(base: &str, error: &reqwest::Error) -> Failure {
    let mut cause = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(error);
    while let Some(e) = source {
        cause = e.to_string();
        source = e.source();
    }
    let what = if error.is_timeout() {
        "no answer in time"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "the request failed"
    };
    Failure::other(
        "server-unreachable",
        format!(
            "cannot reach the Weir server at {base}: {what} ({cause}); is `weir serve` (or \
             `weir dev`) running there? Name another with --server or {SERVER_ENV}"
        ),
    )
}

/// The exit code for an error answer: 2 for input the API refused (400, 413, 422), 4 for a
/// component it refused, 6 for 401/403, 7 for 404, 8 for 409, 5 for anything else.
fn exit_code(status: StatusCode, code: &str) -> u8 {
    if COMPONENT_CODES.contains(&code) {
        return exit::INVALID_COMPONENT;
    }
    match status {
        StatusCode::BAD_REQUEST
        | StatusCode::PAYLOAD_TOO_LARGE
        | StatusCode::UNPROCESSABLE_ENTITY => exit::USAGE,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => exit::REFUSED,
        StatusCode::NOT_FOUND => exit::NOT_FOUND,
        StatusCode::CONFLICT => exit::CONFLICT,
        _ => exit::FAILURE,
    }
}

/// The failure an error answer means, with the API's code, message and field.
fn api_failure(base: &str, status: StatusCode, body: &[u8], had_token: bool) -> Failure {
    let Ok(ErrorBody { error }) = serde_json::from_slice::<ErrorBody>(body) else {
        let text: String = String::from_utf8_lossy(body)
            .chars()
            .take(RAW_ERROR_CHARS)
            .collect();
        let text = text.trim();
        return Failure::new(
            format!("http-{}", status.as_u16()),
            format!(
                "the server at {base} answered {status}{}{text}",
                if text.is_empty() { "" } else { ": " }
            ),
            exit_code(status, ""),
        );
    };
    let mut message = match &error.field {
        Some(field) => format!("{field}: {}", error.message),
        None => error.message.clone(),
    };
    if status == StatusCode::UNAUTHORIZED && !had_token {
        message.push_str(&format!(
            "; give a token with --token or {TOKEN_ENV} (`weir dev` prints one)"
        ));
    }
    if status.is_server_error() {
        message = format!("the server at {base} failed: {message}");
    }
    Failure {
        exit: exit_code(status, &error.code),
        code: error.code.into(),
        message,
        field: error.field,
    }
}

/// `text` as one path segment: every byte but the unreserved ones (RFC 3986) percent-encoded.
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `?name=value&…` of the pairs whose value is present (empty when none is).
pub fn query(pairs: &[(&str, Option<String>)]) -> String {
    let mut out = String::new();
    for (name, value) in pairs {
        if let Some(value) = value {
            out.push(if out.is_empty() { '?' } else { '&' });
            out.push_str(name);
            out.push('=');
            out.push_str(&segment(value));
        }
    }
    out
}

/// `/v1/tenants/{tenant}` + `rest`, the tenant encoded.
pub fn tenant_path(tenant: &str, rest: &str) -> String {
    format!("/v1/tenants/{}{rest}", segment(tenant))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_and_queries_are_encoded() {
        assert_eq!(segment("acme.orders-1_~"), "acme.orders-1_~");
        assert_eq!(segment("a/b?c d"), "a%2Fb%3Fc%20d");
        assert_eq!(segment("é"), "%C3%A9");
        assert_eq!(
            query(&[
                ("a", Some("1".into())),
                ("b", None),
                ("c", Some("x y".into()))
            ]),
            "?a=1&c=x%20y"
        );
        assert_eq!(query(&[("a", None)]), "");
        assert_eq!(tenant_path("acme", "/dlq"), "/v1/tenants/acme/dlq");
    }

    #[test]
    fn error_answers_keep_the_code_and_field_and_choose_the_exit_code() {
        let body = br#"{"error":{"code":"invalid-field","message":"must be at least 1","field":"max_in_flight"}}"#;
        let failure = api_failure("http://x", StatusCode::UNPROCESSABLE_ENTITY, body, true);
        assert_eq!(failure.exit, exit::USAGE);
        assert_eq!(failure.code, "invalid-field");
        assert_eq!(failure.field.as_deref(), Some("max_in_flight"));
        assert_eq!(failure.message, "max_in_flight: must be at least 1");

        let body = br#"{"error":{"code":"wrong-world","message":"exports nothing"}}"#;
        let failure = api_failure("http://x", StatusCode::UNPROCESSABLE_ENTITY, body, true);
        assert_eq!(failure.exit, exit::INVALID_COMPONENT);

        let body = br#"{"error":{"code":"unauthenticated","message":"missing token"}}"#;
        let failure = api_failure("http://x", StatusCode::UNAUTHORIZED, body, false);
        assert_eq!(failure.exit, exit::REFUSED);
        assert!(
            failure.message.contains("WEIR_TOKEN"),
            "{}",
            failure.message
        );

        for (status, code) in [
            (StatusCode::FORBIDDEN, exit::REFUSED),
            (StatusCode::NOT_FOUND, exit::NOT_FOUND),
            (StatusCode::CONFLICT, exit::CONFLICT),
            (StatusCode::SERVICE_UNAVAILABLE, exit::FAILURE),
            (StatusCode::INTERNAL_SERVER_ERROR, exit::FAILURE),
        ] {
            let failure = api_failure("http://x", status, b"<html>oops</html>", true);
            assert_eq!(failure.exit, code, "{status}");
            assert!(failure.message.contains("oops"), "{}", failure.message);
        }
    }

    #[test]
    fn only_plain_http_servers_are_accepted() {
        for (server, ok) in [
            ("http://127.0.0.1:8080", true),
            ("http://weir.internal:8080/", true),
            ("https://weir.example", false),
            ("127.0.0.1:8080", true),
            ("localhost:8080", true),
            ("ftp://x", false),
            ("http://x/?a=b", false),
        ] {
            let args = ServerArgs {
                server: Some(server.to_owned()),
                token: None,
            };
            match Client::new(&args) {
                Ok(client) => {
                    assert!(ok, "{server} accepted");
                    assert!(!client.server().ends_with('/'));
                }
                Err(failure) => {
                    assert!(!ok, "{server}: {}", failure.message);
                    assert_eq!(failure.exit, exit::USAGE);
                }
            }
        }
    }
}
