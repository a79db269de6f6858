//! The host side of the WIT contract: per-store state and the `emit`, `state`, `log` and
//! `config` imports, plus the deny-by-default WASI context and the `wasi:http` hooks, which
//! hand every outgoing request to the binding's [`HttpGate`] (and refuse all when the
//! invocation has none).
//!
//! Owns effect buffering and the per-invocation effect limits. Effects are only *recorded*
//! here; whether they count is decided when the call returns (see `instance`). Knows nothing of
//! Kafka, SQL or how effects are committed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use wasmtime::component::ResourceTable;
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{
    Error as HttpError, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks,
    WasiHttpView,
};

use crate::outbound::HttpGate;

use super::RuntimeConfig;
use super::bindings::weir::handler::{config, emit, log, state, types};
use super::invocation::{
    Effects, Emit, Header, InvocationContext, LogLevel, LogRecord, LogSource, StateWrite,
};

/// Longest state name accepted, in bytes.
const MAX_STATE_NAME_BYTES: usize = 256;

/// Per-store data: WASI context, resource limits, and the state of the current invocation.
pub(crate) struct HostState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    http_hooks: HttpHooks,
    table: ResourceTable,
    pub(crate) limits: StoreLimits,
    pub(crate) stdout: GuestOutput,
    pub(crate) stderr: GuestOutput,
    pub(crate) call: CallState,
    pub(crate) deadline: Instant,
    config: Arc<RuntimeConfig>,
    /// The last invocation's key buffer, reused for the next one's key.
    spare_key: Option<Vec<u8>>,
}

/// Largest key buffer kept for the next invocation's key.
const SPARE_KEY_MAX_BYTES: usize = 4096;

/// What one invocation has done so far.
#[derive(Default)]
pub(crate) struct CallState {
    /// The current message's key (keyed state is scoped to it).
    pub(crate) key: Option<Vec<u8>>,
    /// The binding's side of the invocation; `None` between invocations.
    pub(crate) context: Option<InvocationContext>,
    pub(crate) effects: Effects,
    emitted_bytes: u64,
    /// This invocation's own state writes, so reads see them.
    overlay: HashMap<String, Option<Vec<u8>>>,
    /// The first effect the host refused; it fails the invocation.
    pub(crate) refused: Option<String>,
    pub(crate) logs: Vec<LogRecord>,
    pub(crate) logs_dropped: u32,
}

/// What one invocation left behind, taken from the call state when it ends.
pub(crate) struct Finished {
    pub(crate) effects: Effects,
    /// The first effect the host refused; it fails the invocation.
    pub(crate) refused: Option<String>,
    pub(crate) logs: Vec<LogRecord>,
    pub(crate) logs_dropped: u32,
}

impl HostState {
    pub(crate) fn new(config: Arc<RuntimeConfig>) -> Self {
        let line_cap = config.max_log_line_bytes as usize * (config.max_log_lines as usize).max(1);
        let stdout = GuestOutput::new(line_cap);
        let stderr = GuestOutput::new(line_cap);
        // No preopened directories, no environment, no arguments, no network: the component may
        // import WASI (other languages' toolchains always do) but gets no authority through it.
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(config.memory_bytes as usize)
            .table_elements(config.table_elements as usize)
            .instances(config.instances as usize)
            .tables(config.tables as usize)
            .memories(config.memories as usize)
            .trap_on_grow_failure(true)
            .build();
        Self {
            wasi,
            http: WasiHttpCtx::new(),
            http_hooks: HttpHooks {
                gate: None,
                deadline: None,
            },
            table: ResourceTable::new(),
            limits,
            stdout,
            stderr,
            call: CallState::default(),
            deadline: Instant::now(),
            config,
            spare_key: None,
        }
    }

    /// The runtime settings this store was made with.
    pub(crate) fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Prepare for an invocation of `key` under `context`.
    pub(crate) fn begin(&mut self, key: Option<&[u8]>, context: InvocationContext) {
        // Whatever is left is dropped: a call whose future was dropped before `finish`, or
        // imports the component's start-up code called outside any invocation.
        self.clear_call();
        self.http_hooks.gate = context.http.clone();
        self.call.key = key.map(|key| {
            let mut buffer = self.spare_key.take().unwrap_or_default();
            buffer.clear();
            buffer.extend_from_slice(key);
            buffer
        });
        self.call.context = Some(context);
    }

    /// Empty the call state, the HTTP hooks and the guest's output in place, keeping the
    /// buffers' capacity: nothing is rebuilt or moved per invocation.
    fn clear_call(&mut self) {
        self.http_hooks.gate = None;
        self.http_hooks.deadline = None;
        self.stdout.clear();
        self.stderr.clear();
        // Every field named, so that a new one cannot be forgotten here.
        let CallState {
            key,
            context,
            effects,
            emitted_bytes,
            overlay,
            refused,
            logs,
            logs_dropped,
        } = &mut self.call;
        // An unusually large key's buffer is not kept for the instance's lifetime.
        if let Some(key) = key
            .take()
            .filter(|key| key.capacity() <= SPARE_KEY_MAX_BYTES)
        {
            self.spare_key = Some(key);
        }
        *context = None;
        effects.emits.clear();
        effects.state_writes.clear();
        *emitted_bytes = 0;
        overlay.clear();
        *refused = None;
        logs.clear();
        *logs_dropped = 0;
    }

    /// No outbound request of this invocation may outlive `deadline`.
    pub(crate) fn set_http_deadline(&mut self, deadline: Instant) {
        self.http_hooks.deadline = Some(deadline);
    }

    /// End the invocation: take what it recorded, turning guest output into log lines.
    pub(crate) fn finish(&mut self) -> Finished {
        let call = &mut self.call;
        for (output, source, level) in [
            (&self.stdout, LogSource::Stdout, LogLevel::Info),
            (&self.stderr, LogSource::Stderr, LogLevel::Warn),
        ] {
            let (bytes, truncated) = output.take();
            if truncated {
                call.logs_dropped += 1;
            }
            if bytes.is_empty() {
                continue;
            }
            let text = String::from_utf8_lossy(&bytes);
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                push_log(
                    &self.config,
                    call,
                    level,
                    source,
                    line.to_owned(),
                    Vec::new(),
                );
            }
        }
        let finished = Finished {
            effects: std::mem::take(&mut call.effects),
            refused: call.refused.take(),
            logs: std::mem::take(&mut call.logs),
            logs_dropped: std::mem::take(&mut call.logs_dropped),
        };
        // Released now, not at the next `begin`: they hold the binding's state source and HTTP
        // gate. The rest is cleared when the next invocation begins.
        call.context = None;
        self.http_hooks.gate = None;
        finished
    }

    fn refuse(&mut self, what: String) -> String {
        if self.call.refused.is_none() {
            self.call.refused = Some(what.clone());
        }
        what
    }
}

fn push_log(
    config: &RuntimeConfig,
    call: &mut CallState,
    level: LogLevel,
    source: LogSource,
    mut message: String,
    mut fields: Vec<(String, String)>,
) {
    if call.logs.len() >= config.max_log_lines as usize {
        call.logs_dropped += 1;
        return;
    }
    let cap = config.max_log_line_bytes as usize;
    truncate(&mut message, cap);
    let mut budget = cap.saturating_sub(message.len());
    fields.retain_mut(|(name, value)| {
        let need = name.len() + value.len();
        if need <= budget {
            budget -= need;
            true
        } else {
            false
        }
    });
    call.logs.push(LogRecord {
        level,
        source,
        message,
        fields,
    });
}

fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_hooks,
        }
    }
}

/// The `wasi:http` hooks of a store: outgoing requests go through the current invocation's
/// gate, or are refused when it has none (the binding grants no outbound HTTP, or no
/// invocation is running).
struct HttpHooks {
    gate: Option<Arc<HttpGate>>,
    /// The invocation's deadline: no request outlives it.
    deadline: Option<Instant>,
}

impl WasiHttpHooks for HttpHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<WasiBody>,
                        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
                    ),
                    HttpError,
                >,
            > + Send,
    > {
        match self.gate.clone() {
            Some(gate) => Box::new(gate.send(request, options, self.deadline)),
            None => Box::new(std::future::ready(Err(HttpError::HttpRequestDenied))),
        }
    }
}

impl types::Host for HostState {}

impl emit::Host for HostState {
    fn send(
        &mut self,
        topic: String,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        headers: Vec<types::Header>,
    ) -> Result<(), emit::EmitError> {
        let config = &self.config;
        let allowed = self
            .call
            .context
            .as_ref()
            .is_some_and(|c| c.output_topics.allows(&topic));
        if !allowed {
            let why = self.refuse(format!(
                "emit to topic `{topic}` refused: not among the binding's output topics"
            ));
            return Err(emit::EmitError::TopicNotAllowed(why));
        }
        let size = (topic.len()
            + key.as_ref().map_or(0, Vec::len)
            + payload.len()
            + headers
                .iter()
                .map(|h| h.key.len() + h.value.len())
                .sum::<usize>()) as u64;
        if size > config.max_emit_bytes {
            let why = self.refuse(format!(
                "emit to topic `{topic}` refused: {size} bytes exceeds the limit of {} bytes per message",
                config.max_emit_bytes
            ));
            return Err(emit::EmitError::TooLarge(why));
        }
        if self.call.effects.emits.len() >= config.max_emits as usize {
            let why = self.refuse(format!(
                "emit refused: the invocation already emitted the maximum of {} messages",
                config.max_emits
            ));
            return Err(emit::EmitError::LimitExceeded(why));
        }
        if self.call.emitted_bytes + size > config.max_emit_total_bytes {
            let why = self.refuse(format!(
                "emit refused: the invocation would emit more than the maximum of {} bytes",
                config.max_emit_total_bytes
            ));
            return Err(emit::EmitError::LimitExceeded(why));
        }
        self.call.emitted_bytes += size;
        let headers = headers
            .into_iter()
            .map(|h| Header {
                key: h.key,
                value: h.value,
            })
            .collect();
        self.call.effects.emits.push(Emit {
            topic,
            key,
            payload,
            headers,
        });
        Ok(())
    }
}

impl HostState {
    fn check_state_name(&mut self, name: &str) -> Result<(), state::StateError> {
        if name.len() > MAX_STATE_NAME_BYTES {
            let why = format!(
                "state name of {} bytes exceeds the limit of {MAX_STATE_NAME_BYTES} bytes",
                name.len()
            );
            return Err(state::StateError::TooLarge(why));
        }
        Ok(())
    }

    fn write_state(
        &mut self,
        name: String,
        value: Option<Vec<u8>>,
    ) -> Result<(), state::StateError> {
        if self.call.key.is_none() {
            self.refuse(
                "state write refused: the message has no key, so it has no keyed state".to_owned(),
            );
            return Err(state::StateError::NoKey);
        }
        if let Err(e) = self.check_state_name(&name) {
            self.refuse(format!("state write refused: {e:?}"));
            return Err(e);
        }
        if let Some(v) = &value
            && v.len() as u64 > self.config.max_state_value_bytes
        {
            let why = self.refuse(format!(
                "state write of `{name}` refused: {} bytes exceeds the limit of {} bytes",
                v.len(),
                self.config.max_state_value_bytes
            ));
            return Err(state::StateError::TooLarge(why));
        }
        if self.call.effects.state_writes.len() >= self.config.max_state_writes as usize {
            let why = self.refuse(format!(
                "state write refused: the invocation already made the maximum of {} writes",
                self.config.max_state_writes
            ));
            return Err(state::StateError::LimitExceeded(why));
        }
        self.call.overlay.insert(name.clone(), value.clone());
        self.call
            .effects
            .state_writes
            .push(StateWrite { name, value });
        Ok(())
    }
}

impl state::Host for HostState {
    async fn get(&mut self, name: String) -> Result<Option<Vec<u8>>, state::StateError> {
        self.check_state_name(&name)?;
        let Some(key) = self.call.key.clone() else {
            return Err(state::StateError::NoKey);
        };
        if let Some(value) = self.call.overlay.get(&name) {
            return Ok(value.clone());
        }
        let Some(source) = self.call.context.as_ref().map(|c| c.state.clone()) else {
            return Err(state::StateError::Unavailable(
                "no invocation in progress".to_owned(),
            ));
        };
        source
            .get(&key, &name)
            .await
            .map_err(state::StateError::Unavailable)
    }

    fn set(&mut self, name: String, value: Vec<u8>) -> Result<(), state::StateError> {
        self.write_state(name, Some(value))
    }

    fn delete(&mut self, name: String) -> Result<(), state::StateError> {
        self.write_state(name, None)
    }
}

impl log::Host for HostState {
    fn write(&mut self, level: log::Level, message: String, fields: Vec<log::Field>) {
        let level = match level {
            log::Level::Trace => LogLevel::Trace,
            log::Level::Debug => LogLevel::Debug,
            log::Level::Info => LogLevel::Info,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Error => LogLevel::Error,
        };
        let fields = fields.into_iter().map(|f| (f.name, f.value)).collect();
        push_log(
            &self.config,
            &mut self.call,
            level,
            LogSource::Log,
            message,
            fields,
        );
    }
}

impl config::Host for HostState {
    fn get(&mut self, name: String) -> Option<String> {
        self.call
            .context
            .as_ref()
            .and_then(|c| c.config.get(&name).cloned())
    }

    fn all(&mut self) -> Vec<(String, String)> {
        self.call
            .context
            .as_ref()
            .map(|c| {
                c.config
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A guest's stdout or stderr: kept in memory up to a cap, then dropped (never an error the
/// guest could trap on), and turned into log lines after each invocation.
#[derive(Clone)]
pub(crate) struct GuestOutput {
    inner: Arc<Mutex<OutputBuf>>,
    /// Something was appended since the last `take` or `clear`: most invocations write
    /// nothing, and then neither takes the lock.
    written: Arc<AtomicBool>,
}

struct OutputBuf {
    bytes: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl GuestOutput {
    fn new(cap: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(OutputBuf {
                bytes: Vec::new(),
                cap,
                truncated: false,
            })),
            written: Arc::new(AtomicBool::new(false)),
        }
    }

    fn append(&self, data: &[u8]) {
        let mut buf = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let room = buf.cap.saturating_sub(buf.bytes.len());
        if data.len() > room {
            buf.truncated = true;
        }
        let take = data.len().min(room);
        buf.bytes.extend_from_slice(&data[..take]);
        // Set under the lock, so a `take` that sees it also sees what was appended.
        self.written.store(true, Ordering::Release);
    }

    /// Whether something was appended since the last call, resetting the flag. A plain load
    /// first: the usual invocation writes nothing, and a swap would cost a locked instruction
    /// on every call.
    fn take_written(&self) -> bool {
        self.written.load(Ordering::Acquire) && self.written.swap(false, Ordering::AcqRel)
    }

    fn clear(&self) {
        if !self.take_written() {
            return;
        }
        let mut buf = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        buf.bytes.clear();
        buf.truncated = false;
    }

    fn take(&self) -> (Vec<u8>, bool) {
        if !self.take_written() {
            return (Vec::new(), false);
        }
        let mut buf = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let truncated = std::mem::take(&mut buf.truncated);
        (std::mem::take(&mut buf.bytes), truncated)
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// Room advertised to the guest per write; large writes are split by the guest.
const OUTPUT_PERMIT: usize = 64 * 1024;

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(OUTPUT_PERMIT)
    }
}

#[async_trait::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_output_is_taken_once_and_cleared_between_invocations() {
        let output = GuestOutput::new(8);
        assert_eq!(output.take(), (Vec::new(), false));
        output.append(b"hello ");
        output.append(b"world");
        assert_eq!(output.take(), (b"hello wo".to_vec(), true));
        assert_eq!(output.take(), (Vec::new(), false));
        output.append(b"left over");
        output.clear();
        assert_eq!(output.take(), (Vec::new(), false));
        output.append(b"next");
        assert_eq!(output.take(), (b"next".to_vec(), false));
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let mut text = "héllo wörld".to_owned();
        truncate(&mut text, 2);
        assert_eq!(text, "h…");
        let mut short = "ok".to_owned();
        truncate(&mut short, 10);
        assert_eq!(short, "ok");
    }

    /// Everything recorded before an invocation begins is gone when it does: what the last
    /// invocation left whether it finished or its future was dropped half-way, and what imports
    /// recorded outside any invocation (a component's start-up code). The new invocation keeps
    /// its own HTTP gate.
    #[test]
    fn nothing_of_one_invocation_reaches_the_next() {
        use crate::outbound::{HttpGate, HttpPolicy};
        let policy = HttpPolicy::allowing(["api.example.com"]);
        let metrics = crate::metrics::Metrics::new().http("b1", &policy.allow);
        let gate = Arc::new(HttpGate::new("b1", policy, metrics).unwrap());
        let gated = InvocationContext {
            http: Some(gate),
            ..InvocationContext::default()
        };
        let record = |state: &mut HostState| {
            state.call.effects.state_writes.push(StateWrite {
                name: "n".into(),
                value: Some(b"v".to_vec()),
            });
            state.call.overlay.insert("n".into(), Some(b"v".to_vec()));
            state.call.emitted_bytes = 7;
            state.call.refused = Some("refused".into());
            state.call.logs.push(LogRecord {
                level: LogLevel::Info,
                source: LogSource::Log,
                message: "logged".into(),
                fields: Vec::new(),
            });
            state.call.logs_dropped = 2;
            state.stdout.append(b"a line\n");
        };
        for ending in ["finished", "dropped", "outside any invocation"] {
            let mut state = HostState::new(Arc::new(RuntimeConfig::default()));
            if ending != "outside any invocation" {
                state.begin(Some(b"k1"), InvocationContext::default());
            }
            record(&mut state);
            if ending == "finished" {
                let first = state.finish();
                assert_eq!(first.effects.state_writes.len(), 1);
                assert_eq!(first.refused.as_deref(), Some("refused"));
                assert_eq!((first.logs.len(), first.logs_dropped), (2, 2));
            }
            state.begin(Some(b"k2"), gated.clone());
            assert_eq!(state.call.key.as_deref(), Some(&b"k2"[..]), "{ending}");
            assert!(state.call.overlay.is_empty(), "{ending}");
            assert_eq!(state.call.emitted_bytes, 0, "{ending}");
            assert!(
                state.http_hooks.gate.is_some(),
                "{ending}: the gate was lost"
            );
            let second = state.finish();
            assert!(second.effects.is_empty(), "{ending}");
            assert_eq!(second.refused, None, "{ending}");
            assert!(second.logs.is_empty(), "{ending}: {:?}", second.logs);
            assert_eq!(second.logs_dropped, 0, "{ending}");
            assert!(state.call.context.is_none(), "{ending}");
            assert!(state.http_hooks.gate.is_none(), "{ending}");
        }
    }

    #[test]
    fn log_lines_are_capped_and_counted() {
        let config = RuntimeConfig {
            max_log_lines: 2,
            max_log_line_bytes: 16,
            ..RuntimeConfig::default()
        };
        let mut call = CallState::default();
        for i in 0..5 {
            let fields = vec![("k".to_owned(), "v".repeat(i * 4))];
            push_log(
                &config,
                &mut call,
                LogLevel::Info,
                LogSource::Log,
                format!("line {i}"),
                fields,
            );
        }
        assert_eq!(call.logs.len(), 2);
        assert_eq!(call.logs_dropped, 3);
        // Fields that do not fit in the line's byte budget are dropped, not split.
        assert_eq!(
            call.logs[1].fields,
            vec![("k".to_owned(), "vvvv".to_owned())]
        );
    }

    #[test]
    fn guest_output_is_capped_without_failing_the_guest() {
        let out = GuestOutput::new(8);
        out.append(b"hello ");
        out.append(b"world, more than eight bytes");
        let (bytes, truncated) = out.take();
        assert_eq!(bytes, b"hello wo");
        assert!(truncated);
        assert_eq!(out.take(), (Vec::new(), false));
    }
}
