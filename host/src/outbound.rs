//! Outbound HTTP: the host's mediation of every request a handler sends through
//! `wasi:http/outgoing-handler` (SEMANTICS §3).
//!
//! Owns a binding's `http` policy ([`HttpPolicy`]: the allowlist of destination hosts, the
//! connect and total timeouts, the response-size cap and the per-destination breaker settings,
//! with field-named validation) and the [`HttpGate`] that enforces it for one binding:
//!
//! * a request to a host the allowlist does not name is refused (`HTTP-request-denied`) and
//!   never leaves the host;
//! * each destination host has its own [`Breaker`]: after `breaker.failure_threshold`
//!   consecutive failures (connect errors, timeouts, 5xx answers) requests to it fail fast with
//!   `destination-unavailable` — which the SDK reports as a retryable error — until
//!   `breaker.open_for_ms` has passed and probes succeed;
//! * the handler's own timeouts are capped by the policy's; the total timeout covers the
//!   response headers and body; a response body larger than `max_response_bytes` fails with
//!   `HTTP-response-body-size`;
//! * every request is counted and timed per binding and destination ([`HttpMetrics`]).
//!
//! The gate is handed to the runtime inside the invocation context; the runtime's `wasi:http`
//! hooks call [`HttpGate::send`]. Knows nothing of Kafka, the store or the guest: it sees
//! `http::Request`s and answers `http::Response`s or `wasmtime_wasi_http::Error`s. Breakers
//! here are per host process (not shared through the store like a binding's breaker): each
//! replica learns a destination is down from its own requests.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus::{Histogram, IntCounter, IntGauge};
use serde::{Deserialize, Serialize};
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody};

use crate::pipeline::breaker::{
    Admission, Breaker, BreakerPolicy, BreakerState, Outcome, ProbeToken,
};

/// Default connect timeout: 2 s.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Default total timeout of one request, headers and body: 10 s.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Default response-body cap: 1 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 1 << 20;
/// Largest timeout accepted: 5 minutes.
pub const MAX_TIMEOUT_MS: u64 = 5 * 60 * 1000;
/// Largest response-body cap accepted: 64 MiB.
pub const MAX_RESPONSE_BYTES: u64 = 64 << 20;
/// Most allowlist entries per binding (each is a label value of the HTTP metrics).
pub const MAX_ALLOW_ENTRIES: usize = 64;
/// Destinations (`host:port`) whose breaker one gate keeps, at most. A `*.domain` entry, or an
/// entry without a port, lets a handler name destinations without end; past this many, the
/// closed breakers are forgotten first (they hold at most a few failures short of their
/// threshold), and if every kept breaker is open or probing, all are.
pub const MAX_DESTINATION_BREAKERS: usize = 1024;

/// The `http` section of a binding's policy: outbound HTTP is granted only to bindings that
/// have one, and only to the hosts it names.
///
/// Serialized as `{ "allow": ["customers.internal:8080", "*.example.com"], "connect_timeout_ms":
/// 2000, "timeout_ms": 10000, "max_response_bytes": 1048576, "breaker": { … } }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpPolicy {
    /// Destination hosts the handler may call: `host`, `host:port`, or `*.domain` (any
    /// subdomain of `domain`). A host without a port allows every port.
    pub allow: Vec<String>,
    /// Longest wait for a connection, milliseconds (default 2000).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Longest a whole request may take, response body included, milliseconds (default 10000).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Largest response body accepted, bytes (default 1 MiB).
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,
    /// The breaker each destination host gets (default: opens after 5 consecutive failures for
    /// 60 s, closes after 2 successful probes).
    #[serde(default)]
    pub breaker: BreakerPolicy,
}

fn default_connect_timeout_ms() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_MS
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

fn default_max_response_bytes() -> u64 {
    DEFAULT_MAX_RESPONSE_BYTES
}

/// An `http` setting that is invalid; `field` is its key inside `http` (e.g. `allow[1]`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid http.{field}: {message}")]
pub struct HttpPolicyError {
    /// The offending key.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

fn policy_error(field: impl Into<String>, message: impl Into<String>) -> HttpPolicyError {
    HttpPolicyError {
        field: field.into(),
        message: message.into(),
    }
}

impl HttpPolicy {
    /// A policy allowing `allow` with every other setting at its default.
    pub fn allowing(allow: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            allow: allow.into_iter().map(Into::into).collect(),
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            breaker: BreakerPolicy::default(),
        }
    }

    /// Check every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), HttpPolicyError> {
        if self.allow.is_empty() {
            return Err(policy_error(
                "allow",
                "name at least one destination host (`host`, `host:port` or `*.domain`); leave out `http` to grant no outbound HTTP",
            ));
        }
        if self.allow.len() > MAX_ALLOW_ENTRIES {
            return Err(policy_error(
                "allow",
                format!("{} entries; at most {MAX_ALLOW_ENTRIES}", self.allow.len()),
            ));
        }
        for (i, entry) in self.allow.iter().enumerate() {
            AllowEntry::parse(entry).map_err(|m| policy_error(format!("allow[{i}]"), m))?;
        }
        if !(1..=MAX_TIMEOUT_MS).contains(&self.connect_timeout_ms) {
            return Err(policy_error(
                "connect_timeout_ms",
                format!(
                    "{} ms is out of range; allowed 1 to {MAX_TIMEOUT_MS} ms",
                    self.connect_timeout_ms
                ),
            ));
        }
        if !(1..=MAX_TIMEOUT_MS).contains(&self.timeout_ms) {
            return Err(policy_error(
                "timeout_ms",
                format!(
                    "{} ms is out of range; allowed 1 to {MAX_TIMEOUT_MS} ms",
                    self.timeout_ms
                ),
            ));
        }
        if !(1..=MAX_RESPONSE_BYTES).contains(&self.max_response_bytes) {
            return Err(policy_error(
                "max_response_bytes",
                format!(
                    "{} is out of range; allowed 1 to {MAX_RESPONSE_BYTES} bytes",
                    self.max_response_bytes
                ),
            ));
        }
        self.breaker
            .validate()
            .map_err(|e| policy_error(format!("breaker.{}", e.field), e.message))
    }

    /// The connect timeout as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// The total timeout as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// One parsed allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AllowEntry {
    /// Lower-cased host, or the domain of a `*.` entry.
    host: String,
    /// `*.domain`: any subdomain of `host`.
    subdomains: bool,
    /// The only port allowed, if the entry names one.
    port: Option<u16>,
}

impl AllowEntry {
    fn parse(entry: &str) -> Result<Self, String> {
        if entry.contains("://") || entry.contains('/') || entry.contains('@') {
            return Err(format!(
                "`{entry}` must be a host, `host:port` or `*.domain`, without scheme, path or user"
            ));
        }
        let (host, port) = match entry.rsplit_once(':') {
            Some((host, port)) => {
                let port: u16 = port
                    .parse()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("`{entry}`: `{port}` is not a port (1-65535)"))?;
                (host, Some(port))
            }
            None => (entry, None),
        };
        let (host, subdomains) = match host.strip_prefix("*.") {
            Some(domain) => (domain, true),
            None => (host, false),
        };
        let valid_label = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if host.is_empty() || host.len() > 253 || !host.split('.').all(valid_label) {
            return Err(format!(
                "`{entry}` is not a host name or IPv4 address (letters, digits, `-`, `.`)"
            ));
        }
        Ok(Self {
            host: host.to_ascii_lowercase(),
            subdomains,
            port,
        })
    }

    fn matches(&self, host: &str, port: u16) -> bool {
        let host_ok = if self.subdomains {
            host.len() > self.host.len() + 1
                && host.ends_with(&self.host)
                && host.as_bytes()[host.len() - self.host.len() - 1] == b'.'
        } else {
            host == self.host
        };
        host_ok && self.port.is_none_or(|p| p == port)
    }
}

/// The handles of one binding's HTTP metrics for one allowlist entry (the `destination`
/// label), resolved once when the gate is built.
#[derive(Clone)]
pub struct DestinationMetrics {
    /// Requests answered, whatever the status.
    pub answered: IntCounter,
    /// Requests answered with a 5xx status (also counted in `answered`).
    pub server_errors: IntCounter,
    /// Requests that failed to connect or to be answered.
    pub failed: IntCounter,
    /// Requests that ran past a timeout.
    pub timed_out: IntCounter,
    /// Requests failed fast because the destination's breaker was open.
    pub breaker_open: IntCounter,
    /// Responses refused for exceeding `max_response_bytes`.
    pub too_large: IntCounter,
    /// Time from sending to the response headers, seconds.
    pub duration: Histogram,
    /// The breaker state of the destination last used under this entry: 0 closed, 1 half-open,
    /// 2 open.
    pub breaker_state: IntGauge,
}

/// The HTTP metrics of one binding: one set of handles per allowlist entry, plus the counter
/// of refused requests (which match no entry).
#[derive(Clone)]
pub struct HttpMetrics {
    /// Per allowlist entry, in the policy's order.
    pub destinations: Vec<DestinationMetrics>,
    /// Requests to hosts outside the allowlist.
    pub denied: IntCounter,
}

/// Enforces one binding's [`HttpPolicy`]. Shared by every invocation of the binding.
pub struct HttpGate {
    binding: String,
    policy: HttpPolicy,
    allow: Vec<AllowEntry>,
    metrics: HttpMetrics,
    breakers: Mutex<HashMap<String, Breaker>>,
    allow_private_networks: bool,
}

impl std::fmt::Debug for HttpGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpGate")
            .field("binding", &self.binding)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// The response a gate hands back, with the task that drives the connection.
pub type GateResponse = (
    http::Response<WasiBody>,
    Box<dyn Future<Output = Result<(), HttpError>> + Send>,
);

impl HttpGate {
    /// A gate for `binding` enforcing `policy` (which must have passed
    /// [`HttpPolicy::validate`]); `metrics` has one entry per allowlist entry.
    pub fn new(
        binding: impl Into<String>,
        policy: HttpPolicy,
        metrics: HttpMetrics,
    ) -> Result<Self, HttpPolicyError> {
        policy.validate()?;
        let allow = policy
            .allow
            .iter()
            .map(|entry| AllowEntry::parse(entry))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| policy_error("allow", m))?;
        if metrics.destinations.len() != allow.len() {
            return Err(policy_error(
                "allow",
                "internal: one set of metrics per allowlist entry is required",
            ));
        }
        Ok(Self {
            binding: binding.into(),
            policy,
            allow,
            metrics,
            breakers: Mutex::new(HashMap::new()),
            allow_private_networks: false,
        })
    }

    /// Let requests reach loopback, private, link-local and other internal addresses (off by
    /// default; `pipeline.http_allow_private_networks`).
    pub fn allowing_private_networks(mut self, allow: bool) -> Self {
        self.allow_private_networks = allow;
        self
    }

    /// The policy the gate enforces.
    pub fn policy(&self) -> &HttpPolicy {
        &self.policy
    }

    /// The state of the breaker of destination `host:port`, if a request has been sent there.
    pub fn breaker_state(&self, destination: &str) -> Option<BreakerState> {
        self.breakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(destination)
            .map(Breaker::state)
    }

    /// Send `request` if the policy allows it: refused outside the allowlist, failed fast while
    /// the destination's breaker is open, timeouts capped, response body capped; never past
    /// `not_after` (the invocation's deadline).
    pub async fn send(
        self: Arc<Self>,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        not_after: Option<Instant>,
    ) -> Result<GateResponse, HttpError> {
        let uri = request.uri();
        let host = uri.host().unwrap_or_default().to_ascii_lowercase();
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let with_user = uri.authority().is_some_and(|a| a.as_str().contains('@'));
        let entry = self.allow.iter().position(|e| e.matches(&host, port));
        let Some(entry) = entry.filter(|_| !with_user) else {
            self.metrics.denied.inc();
            tracing::warn!(binding = %self.binding, destination = %format!("{host}:{port}"), "outbound HTTP request refused: the destination is not in the binding's http.allow list");
            return Err(HttpError::HttpRequestDenied);
        };
        let metrics = &self.metrics.destinations[entry];
        let destination = format!("{host}:{port}");
        // Resolve here, refuse internal addresses, and send plain HTTP to the address checked
        // (a second lookup could answer differently). HTTPS keeps the name, which its
        // certificate check needs.
        let connect_timeout = self.policy.connect_timeout();
        let addresses: Vec<std::net::SocketAddr> = match tokio::time::timeout(
            connect_timeout,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(found)) => found.collect(),
            Ok(Err(_)) => {
                metrics.failed.inc();
                return Err(HttpError::DestinationNotFound);
            }
            Err(_) => {
                metrics.timed_out.inc();
                return Err(HttpError::DnsTimeout);
            }
        };
        if !self.allow_private_networks
            && let Some(internal) = addresses.iter().find(|a| is_internal(a.ip()))
        {
            self.metrics.denied.inc();
            tracing::warn!(binding = %self.binding, %destination, address = %internal.ip(), "outbound HTTP request refused: the destination resolves to a loopback, private or link-local address (pipeline.http_allow_private_networks is off)");
            return Err(HttpError::HttpRequestDenied);
        }
        let Some(address) = addresses.first().copied() else {
            metrics.failed.inc();
            return Err(HttpError::DestinationNotFound);
        };
        if !https {
            let path = request
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            let pinned = http::Uri::builder()
                .scheme(http::uri::Scheme::HTTP)
                .authority(address.to_string())
                .path_and_query(path)
                .build()
                .map_err(|_| HttpError::HttpRequestUriInvalid)?;
            *request.uri_mut() = pinned;
        }
        let probe = match self.admit(&destination, metrics) {
            Some(probe) => probe,
            None => {
                metrics.breaker_open.inc();
                tracing::debug!(binding = %self.binding, %destination, "outbound HTTP request failed fast: the destination's breaker is open");
                return Err(HttpError::DestinationUnavailable);
            }
        };
        // From here on the probe must be recorded or cancelled, even if the guest drops the
        // request: the guard cancels it unless an outcome was recorded.
        let mut guard = ProbeGuard {
            gate: &self,
            destination: &destination,
            probe,
            metrics,
            done: false,
        };
        let timeout = self.policy.timeout();
        let cap =
            |guest: Option<Duration>, limit: Duration| Some(guest.map_or(limit, |g| g.min(limit)));
        let options = RequestOptions {
            connect_timeout: cap(
                options.and_then(|o| o.connect_timeout),
                self.policy.connect_timeout(),
            ),
            first_byte_timeout: cap(options.and_then(|o| o.first_byte_timeout), timeout),
            between_bytes_timeout: cap(options.and_then(|o| o.between_bytes_timeout), timeout),
        };
        let started = Instant::now();
        let mut deadline = tokio::time::Instant::now() + timeout;
        if let Some(not_after) = not_after {
            deadline = deadline.min(tokio::time::Instant::from_std(not_after));
        }
        let sent = tokio::time::timeout_at(
            deadline,
            wasmtime_wasi_http::default_send_request(request, Some(options)),
        )
        .await;
        metrics.duration.observe(started.elapsed().as_secs_f64());
        let (response, io) = match sent {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => {
                let timed_out = matches!(
                    error,
                    HttpError::ConnectionTimeout
                        | HttpError::HttpResponseTimeout
                        | HttpError::ConnectionReadTimeout
                        | HttpError::ConnectionWriteTimeout
                );
                if timed_out {
                    metrics.timed_out.inc();
                } else {
                    metrics.failed.inc();
                }
                guard.record(Outcome::Failure);
                return Err(error);
            }
            Err(_) => {
                metrics.timed_out.inc();
                guard.record(Outcome::Failure);
                return Err(HttpError::HttpResponseTimeout);
            }
        };
        metrics.answered.inc();
        if response.status().is_server_error() {
            metrics.server_errors.inc();
            guard.record(Outcome::Failure);
        } else {
            guard.record(Outcome::Success);
        }
        let limit = self.policy.max_response_bytes;
        let declared = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            metrics.too_large.inc();
            return Err(HttpError::HttpResponseBodySize(declared));
        }
        let too_large = metrics.too_large.clone();
        let response = response.map(|body| {
            CappedBody {
                inner: body.boxed_unsync(),
                remaining: limit,
                limit,
                deadline: Box::pin(tokio::time::sleep_until(deadline)),
                too_large,
            }
            .boxed_unsync()
        });
        Ok((
            response,
            Box::new(io) as Box<dyn Future<Output = Result<(), HttpError>> + Send>,
        ))
    }

    /// Admit one request to `destination`: `Some(probe)` to send (a probe token while
    /// half-open), `None` to fail fast.
    fn admit(&self, destination: &str, metrics: &DestinationMetrics) -> Option<Option<ProbeToken>> {
        let mut breakers = self.breakers.lock().unwrap_or_else(PoisonError::into_inner);
        if breakers.len() >= MAX_DESTINATION_BREAKERS && !breakers.contains_key(destination) {
            breakers.retain(|_, breaker| breaker.state() != BreakerState::Closed);
            if breakers.len() >= MAX_DESTINATION_BREAKERS {
                tracing::warn!(binding = %self.binding, limit = MAX_DESTINATION_BREAKERS, "every destination breaker kept is open; forgetting them all");
                breakers.clear();
            }
        }
        let breaker = breakers
            .entry(destination.to_owned())
            .or_insert_with(|| Breaker::new(self.policy.breaker));
        let admission = breaker.admit(Instant::now());
        metrics.breaker_state.set(breaker.state().gauge_value());
        match admission {
            Admission::Run => Some(None),
            Admission::Probe(token) => Some(Some(token)),
            Admission::Wait => None,
        }
    }

    fn record(
        &self,
        destination: &str,
        outcome: Outcome,
        probe: Option<ProbeToken>,
        metrics: &DestinationMetrics,
    ) {
        let mut breakers = self.breakers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(breaker) = breakers.get_mut(destination) {
            if let Some(transition) = breaker.record(outcome, probe, Instant::now()) {
                tracing::info!(binding = %self.binding, %destination, ?transition, "outbound HTTP breaker of a destination changed state");
            }
            metrics.breaker_state.set(breaker.state().gauge_value());
        }
    }

    fn cancel(&self, destination: &str, probe: ProbeToken) {
        let mut breakers = self.breakers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(breaker) = breakers.get_mut(destination) {
            breaker.cancel(probe);
        }
    }
}

/// Whether `ip` is an address a tenant's handler must not reach by default: loopback,
/// unspecified, private (RFC 1918, unique local), link-local (cloud metadata services live
/// there), shared (CGNAT), broadcast, multicast, documentation or reserved.
pub fn is_internal(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
        }
        std::net::IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(std::net::IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

/// Records the outcome of one admitted request, or cancels its probe if none was recorded.
struct ProbeGuard<'a> {
    gate: &'a HttpGate,
    destination: &'a str,
    probe: Option<ProbeToken>,
    metrics: &'a DestinationMetrics,
    done: bool,
}

impl ProbeGuard<'_> {
    fn record(&mut self, outcome: Outcome) {
        self.done = true;
        self.gate
            .record(self.destination, outcome, self.probe, self.metrics);
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if !self.done
            && let Some(probe) = self.probe
        {
            self.gate.cancel(self.destination, probe);
        }
    }
}

/// A response body that fails with `HTTP-response-body-size` past `limit` bytes and with
/// `HTTP-response-timeout` past the request's total deadline.
struct CappedBody {
    inner: WasiBody,
    remaining: u64,
    limit: u64,
    deadline: Pin<Box<tokio::time::Sleep>>,
    too_large: IntCounter,
}

impl Body for CappedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(HttpError::HttpResponseTimeout)));
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            let len = data.len() as u64;
            if len > self.remaining {
                self.too_large.inc();
                self.remaining = 0;
                return Poll::Ready(Some(Err(HttpError::HttpResponseBodySize(Some(
                    self.limit + 1,
                )))));
            }
            self.remaining -= len;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(s: &str) -> AllowEntry {
        AllowEntry::parse(s).unwrap()
    }

    #[test]
    fn allow_entries_match_host_port_and_subdomains() {
        assert!(entry("api.example.com").matches("api.example.com", 443));
        assert!(entry("api.example.com").matches("api.example.com", 8080));
        assert!(!entry("api.example.com").matches("example.com", 443));
        assert!(!entry("api.example.com").matches("evil-api.example.com", 443));
        assert!(entry("127.0.0.1:8080").matches("127.0.0.1", 8080));
        assert!(!entry("127.0.0.1:8080").matches("127.0.0.1", 8081));
        assert!(entry("*.example.com").matches("a.b.example.com", 80));
        assert!(!entry("*.example.com").matches("example.com", 80));
        assert!(!entry("*.example.com").matches("badexample.com", 80));
        assert!(entry("API.Example.com").matches("api.example.com", 80));
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_internal(internal.parse().unwrap()), "{internal}");
        }
        for public in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(!is_internal(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn bad_policies_name_the_field() {
        let ok = HttpPolicy::allowing(["customers:8080"]);
        assert_eq!(ok.validate(), Ok(()));
        type Mutation = fn(&mut HttpPolicy);
        let cases: Vec<(&str, Mutation)> = vec![
            ("allow", |p| p.allow.clear()),
            ("allow[1]", |p| p.allow.push("http://x.example".into())),
            ("allow[1]", |p| p.allow.push("x.example:0".into())),
            ("allow[1]", |p| p.allow.push("x.example/path".into())),
            ("allow[1]", |p| p.allow.push("bad host".into())),
            ("connect_timeout_ms", |p| p.connect_timeout_ms = 0),
            ("timeout_ms", |p| p.timeout_ms = MAX_TIMEOUT_MS + 1),
            ("max_response_bytes", |p| p.max_response_bytes = 0),
            ("breaker.failure_threshold", |p| {
                p.breaker.failure_threshold = 0
            }),
        ];
        for (field, mutate) in cases {
            let mut policy = ok.clone();
            mutate(&mut policy);
            let err = policy.validate().expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
    }

    /// A handler naming ever new destinations (`*.domain`) cannot grow the breaker map without
    /// end; an open breaker outlives the closed ones forgotten to make room.
    #[test]
    fn destination_breakers_are_capped() {
        let policy = HttpPolicy {
            breaker: BreakerPolicy {
                failure_threshold: 1,
                ..BreakerPolicy::default()
            },
            ..HttpPolicy::allowing(["*.example.com"])
        };
        let allow = policy.allow.clone();
        let gate = HttpGate::new(
            "b1",
            policy,
            crate::metrics::Metrics::new().http("b1", &allow),
        )
        .unwrap();
        let metrics = gate.metrics.destinations[0].clone();
        let down = "down.example.com:443";
        let probe = gate.admit(down, &metrics).unwrap();
        gate.record(down, Outcome::Failure, probe, &metrics);
        assert_eq!(gate.breaker_state(down), Some(BreakerState::Open));
        for n in 0..3 * MAX_DESTINATION_BREAKERS {
            let destination = format!("h{n}.example.com:443");
            let probe = gate.admit(&destination, &metrics).unwrap();
            gate.record(&destination, Outcome::Success, probe, &metrics);
            let kept = gate.breakers.lock().unwrap().len();
            assert!(kept <= MAX_DESTINATION_BREAKERS, "{kept} breakers kept");
        }
        assert_eq!(gate.breaker_state(down), Some(BreakerState::Open));
    }

    #[test]
    fn defaults_fill_in_from_json() {
        let policy: HttpPolicy = serde_json::from_str(r#"{"allow":["a.example"]}"#).unwrap();
        assert_eq!(policy, HttpPolicy::allowing(["a.example"]));
        assert!(serde_json::from_str::<HttpPolicy>(r#"{"allow":[],"x":1}"#).is_err());
    }
}
