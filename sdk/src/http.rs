//! Outbound HTTP: call a service from a handler, through the host.
//!
//! Requests go out through `wasi:http/outgoing-handler`, which the host grants only to
//! bindings with an `http` policy, and only to the hosts its `http.allow` names. The host caps
//! each request's time and response size and keeps a circuit breaker per destination host:
//! while a destination keeps failing, requests to it fail at once with
//! [`HttpError::Unavailable`] instead of waiting for a timeout.
//!
//! ```no_run
//! use serde::Deserialize;
//! use weir_sdk::{Error, Message, config, http};
//!
//! #[derive(Deserialize)]
//! struct Customer {
//!     name: String,
//! }
//!
//! fn handle(message: Message) -> Result<(), Error> {
//!     let base = config::require("customers-url")?;
//!     let response = http::get(&format!("{base}/customers/42"))?;
//!     // `?` turns HTTP failures into the right kind of handler error: an unreachable or
//!     // failing service is retryable, a refused destination permanent.
//!     let customer: Customer = response.error_for_status()?.json()?;
//!     # let _ = customer.name;
//!     Ok(())
//! }
//! ```
//!
//! **A request is not an effect.** It is sent when the handler makes it, not buffered: a
//! message that is retried, redelivered after a crash or replayed from the DLQ makes its
//! requests again, and a request made by an invocation that then fails still happened. Make
//! what you call idempotent — for example, send [`Message::id`](crate::Message::id) as an
//! idempotency key — or only read.
//!
//! An HTTP error converts into [`Error`](crate::Error) with `?`: transport failures, timeouts,
//! an open breaker and 5xx / 429 answers are retryable (the message is retried with the
//! binding's backoff); a destination outside the allowlist, an oversized response, an invalid
//! request and other 4xx answers are permanent.

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use wasip2::io::streams::StreamError;

/// Bytes written to the request body per call.
const WRITE_CHUNK: usize = 4096;
/// Bytes asked for per read of the response body.
const READ_CHUNK: u64 = 64 * 1024;

/// An HTTP request to send with [`send`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    method: String,
    url: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    timeout: Option<Duration>,
}

impl Request {
    /// A request with `method` (e.g. `"GET"`, `"PATCH"`) to `url`
    /// (`http://host[:port]/path?query` or `https://…`).
    pub fn new(method: impl Into<String>, url: impl Into<String>) -> Self {
        Self {
            method: method.into(),
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: None,
        }
    }

    /// A `GET` request.
    pub fn get(url: impl Into<String>) -> Self {
        Self::new("GET", url)
    }

    /// A `POST` request.
    pub fn post(url: impl Into<String>) -> Self {
        Self::new("POST", url)
    }

    /// A `PUT` request.
    pub fn put(url: impl Into<String>) -> Self {
        Self::new("PUT", url)
    }

    /// A `DELETE` request.
    pub fn delete(url: impl Into<String>) -> Self {
        Self::new("DELETE", url)
    }

    /// Add a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Set the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Set the body to `value` as JSON, with `content-type: application/json`.
    pub fn json<T: Serialize + ?Sized>(self, value: &T) -> Result<Self, HttpError> {
        let body = serde_json::to_vec(value)
            .map_err(|e| HttpError::InvalidRequest(format!("cannot encode the JSON body: {e}")))?;
        Ok(self.header("content-type", "application/json").body(body))
    }

    /// Ask for a shorter timeout than the binding's (the host never allows a longer one).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Send the request: see [`send`].
    pub fn send(self) -> Result<Response, HttpError> {
        send(self)
    }
}

/// An HTTP response, its body read in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, in the order the server sent them (names lower-case).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (compared ignoring ASCII case), as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The response if its status is 2xx or 3xx, else [`HttpError::Status`].
    pub fn error_for_status(self) -> Result<Self, HttpError> {
        if self.status >= 400 {
            Err(HttpError::Status {
                status: self.status,
                body: String::from_utf8_lossy(&self.body[..self.body.len().min(512)]).into_owned(),
            })
        } else {
            Ok(self)
        }
    }

    /// The body as UTF-8 text.
    pub fn text(&self) -> Result<&str, HttpError> {
        std::str::from_utf8(&self.body)
            .map_err(|e| HttpError::InvalidResponse(format!("the body is not UTF-8: {e}")))
    }

    /// The body decoded from JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            HttpError::InvalidResponse(format!("the body is not the JSON expected: {e}"))
        })
    }
}

/// Why a request did not produce a usable response.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpError {
    /// The binding does not allow this destination (or grants no outbound HTTP): the host
    /// refused the request without sending it. Permanent.
    Denied(String),
    /// The destination cannot be reached: connection refused or reset, DNS failure, or its
    /// breaker is open after repeated failures. Retryable.
    Unavailable(String),
    /// The request ran past its timeout. Retryable.
    Timeout(String),
    /// The response body exceeded the binding's `http.max_response_bytes`. Permanent.
    TooLarge(String),
    /// The request could not be built (bad URL, method or header). Permanent.
    InvalidRequest(String),
    /// The response could not be read or decoded. Permanent.
    InvalidResponse(String),
    /// The server answered with an error status (from [`Response::error_for_status`]).
    /// Retryable for 5xx and 429, permanent for other 4xx.
    Status {
        /// The status code.
        status: u16,
        /// The start of the body, for the error message.
        body: String,
    },
    /// Any other protocol failure. Retryable.
    Other(String),
}

impl HttpError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            HttpError::Unavailable(_) | HttpError::Timeout(_) | HttpError::Other(_) => true,
            HttpError::Status { status, .. } => *status >= 500 || *status == 429,
            HttpError::Denied(_)
            | HttpError::TooLarge(_)
            | HttpError::InvalidRequest(_)
            | HttpError::InvalidResponse(_) => false,
        }
    }

    fn from_code(url: &str, code: ErrorCode) -> Self {
        match code {
            ErrorCode::HttpRequestDenied => HttpError::Denied(format!(
                "request to {url} denied: its host is not in the binding's http.allow list"
            )),
            ErrorCode::DestinationUnavailable => HttpError::Unavailable(format!(
                "{url} is unavailable (its circuit breaker is open after repeated failures)"
            )),
            ErrorCode::ConnectionRefused
            | ErrorCode::ConnectionTerminated
            | ErrorCode::DestinationNotFound
            | ErrorCode::DestinationIpUnroutable
            | ErrorCode::DnsError(_)
            | ErrorCode::DnsTimeout
            | ErrorCode::ConnectionLimitReached => {
                HttpError::Unavailable(format!("cannot reach {url}: {code:?}"))
            }
            ErrorCode::ConnectionTimeout
            | ErrorCode::ConnectionReadTimeout
            | ErrorCode::ConnectionWriteTimeout
            | ErrorCode::HttpResponseTimeout => {
                HttpError::Timeout(format!("request to {url} timed out ({code:?})"))
            }
            ErrorCode::HttpResponseBodySize(_) => HttpError::TooLarge(format!(
                "the response of {url} exceeds the binding's http.max_response_bytes"
            )),
            ErrorCode::HttpRequestUriInvalid
            | ErrorCode::HttpRequestMethodInvalid
            | ErrorCode::HttpRequestUriTooLong
            | ErrorCode::DestinationIpProhibited => {
                HttpError::InvalidRequest(format!("request to {url} refused: {code:?}"))
            }
            other => HttpError::Other(format!("request to {url} failed: {other:?}")),
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Denied(m)
            | HttpError::Unavailable(m)
            | HttpError::Timeout(m)
            | HttpError::TooLarge(m)
            | HttpError::InvalidRequest(m)
            | HttpError::InvalidResponse(m)
            | HttpError::Other(m) => f.write_str(m),
            HttpError::Status { status, body } => write!(f, "HTTP status {status}: {body}"),
        }
    }
}

impl std::error::Error for HttpError {}

impl From<HttpError> for crate::Error {
    fn from(error: HttpError) -> Self {
        if error.is_retryable() {
            crate::Error::retryable(error.to_string())
        } else {
            crate::Error::permanent(error.to_string())
        }
    }
}

/// `GET url`.
pub fn get(url: &str) -> Result<Response, HttpError> {
    send(Request::get(url))
}

/// `POST url` with `value` as a JSON body.
pub fn post_json<T: Serialize + ?Sized>(url: &str, value: &T) -> Result<Response, HttpError> {
    send(Request::post(url).json(value)?)
}

/// Send `request` and read the whole response. Blocks the handler until the response has
/// arrived, failed, or timed out (the invocation's own deadline keeps running meanwhile).
pub fn send(request: Request) -> Result<Response, HttpError> {
    let url = request.url.clone();
    let target = Target::parse(&request.url)?;
    let invalid =
        |what: &str| HttpError::InvalidRequest(format!("request to {url}: invalid {what}"));
    let headers = Fields::from_list(&request.headers).map_err(|e| {
        HttpError::InvalidRequest(format!("request to {url}: header refused: {e:?}"))
    })?;
    let outgoing = OutgoingRequest::new(headers);
    outgoing
        .set_method(&method(&request.method))
        .map_err(|()| invalid("method"))?;
    outgoing
        .set_scheme(Some(&target.scheme))
        .map_err(|()| invalid("scheme"))?;
    outgoing
        .set_authority(Some(&target.authority))
        .map_err(|()| invalid("host"))?;
    outgoing
        .set_path_with_query(Some(&target.path))
        .map_err(|()| invalid("path"))?;
    let body = outgoing.body().map_err(|()| invalid("body"))?;
    let options = request.timeout.map(|timeout| {
        let options = RequestOptions::new();
        let nanos = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        // A host that does not support a timeout keeps its own: nothing to do on refusal.
        let _ = options.set_connect_timeout(Some(nanos));
        let _ = options.set_first_byte_timeout(Some(nanos));
        let _ = options.set_between_bytes_timeout(Some(nanos));
        options
    });
    // Send first, then stream the body: the host reads it while it writes the request.
    let pending = outgoing_handler::handle(outgoing, options)
        .map_err(|code| HttpError::from_code(&url, code))?;
    // A request the host refused (or that failed) stops taking its body: the write fails, and
    // the reason is the request's own error, read below.
    let written = write_body(&url, &body, &request.body);
    let sent = match written {
        Ok(()) => OutgoingBody::finish(body, None).map_err(|code| HttpError::from_code(&url, code)),
        Err(e) => {
            drop(body);
            Err(e)
        }
    };
    pending.subscribe().block();
    let incoming = match pending.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(code))) => return Err(HttpError::from_code(&url, code)),
        Some(Err(())) | None => {
            return Err(HttpError::Other(format!(
                "request to {url}: the response was not available"
            )));
        }
    };
    sent?;
    let status = incoming.status();
    let headers = incoming
        .headers()
        .entries()
        .into_iter()
        .map(|(name, value)| (name.to_ascii_lowercase(), value))
        .collect();
    let body = incoming
        .consume()
        .map_err(|()| HttpError::Other(format!("request to {url}: no response body")))?;
    let bytes = read_body(&url, &body)?;
    drop(IncomingBody::finish(body));
    Ok(Response {
        status,
        headers,
        body: bytes,
    })
}

fn write_body(url: &str, body: &OutgoingBody, bytes: &[u8]) -> Result<(), HttpError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let stream = body
        .write()
        .map_err(|()| HttpError::InvalidRequest(format!("request to {url}: invalid body")))?;
    for chunk in bytes.chunks(WRITE_CHUNK) {
        stream.blocking_write_and_flush(chunk).map_err(|e| {
            HttpError::Other(format!("request to {url}: cannot write the body: {e:?}"))
        })?;
    }
    Ok(())
}

fn read_body(url: &str, body: &IncomingBody) -> Result<Vec<u8>, HttpError> {
    let stream = body
        .stream()
        .map_err(|()| HttpError::Other(format!("request to {url}: no response body stream")))?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(READ_CHUNK) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(StreamError::Closed) => return Ok(bytes),
            Err(StreamError::LastOperationFailed(error)) => {
                if let Some(code) = wasip2::http::types::http_error_code(&error) {
                    return Err(HttpError::from_code(url, code));
                }
                // Hosts may report a failed body read as text only (wasmtime does): classify
                // the host's caps by their wording, the rest as a retryable failure.
                let text = error.to_debug_string();
                let lower = text.to_ascii_lowercase();
                return Err(if lower.contains("body size") {
                    HttpError::TooLarge(format!(
                        "the response of {url} exceeds the binding's http.max_response_bytes ({text})"
                    ))
                } else if lower.contains("timeout") || lower.contains("timed out") {
                    HttpError::Timeout(format!(
                        "request to {url} timed out reading the body ({text})"
                    ))
                } else {
                    HttpError::Other(format!(
                        "request to {url}: cannot read the response body: {text}"
                    ))
                });
            }
        }
    }
}

fn method(name: &str) -> Method {
    match name.to_ascii_uppercase().as_str() {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "CONNECT" => Method::Connect,
        "OPTIONS" => Method::Options,
        "TRACE" => Method::Trace,
        "PATCH" => Method::Patch,
        _ => Method::Other(name.to_owned()),
    }
}

/// The parts of a URL `wasi:http` wants.
#[derive(Debug)]
struct Target {
    scheme: Scheme,
    authority: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, HttpError> {
        let bad = |why: &str| HttpError::InvalidRequest(format!("invalid URL `{url}`: {why}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("it must start with http:// or https://"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.is_empty() || authority.contains('@') {
            return Err(bad("it must name a host (without user info)"));
        }
        let path = match path {
            "" => "/".to_owned(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_owned(),
        };
        Ok(Self {
            scheme,
            authority: authority.to_owned(),
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_authority_and_path() {
        let t = Target::parse("http://127.0.0.1:8080/customers/7?x=1").unwrap();
        assert!(matches!(t.scheme, Scheme::Http));
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert_eq!(t.path, "/customers/7?x=1");
        let t = Target::parse("HTTPS://api.example.com").unwrap();
        assert!(matches!(t.scheme, Scheme::Https));
        assert_eq!(t.path, "/");
        assert_eq!(Target::parse("https://a.example?q").unwrap().path, "/?q");
        for bad in ["api.example.com/x", "ftp://x", "http:///x", "http://u@x/"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_say_whether_to_retry() {
        assert!(HttpError::Unavailable(String::new()).is_retryable());
        assert!(HttpError::Timeout(String::new()).is_retryable());
        assert!(!HttpError::Denied(String::new()).is_retryable());
        assert!(!HttpError::TooLarge(String::new()).is_retryable());
        let status = |status| HttpError::Status {
            status,
            body: String::new(),
        };
        assert!(status(503).is_retryable());
        assert!(status(429).is_retryable());
        assert!(!status(404).is_retryable());
        let error: crate::Error = status(404).into();
        assert!(error.is_permanent());
    }
}
