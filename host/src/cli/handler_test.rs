//! `weir handler test`: one invocation in the real sandbox, without Kafka or a database.
//!
//! Builds a message from flags, runs it through the same runtime the host uses, and prints the
//! outcome and the effects. Owns nothing but presentation; all behaviour is the runtime's.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use serde_json::json;

use super::{OutputFormat, exit};
use crate::metrics::Metrics;
use crate::outbound::{HttpGate, HttpPolicy};
use crate::runtime::{
    BytesText, ComponentError, Effects, Header, InstancePolicy, InstantiateError, Invocation,
    InvocationContext, LogRecord, MemoryState, Message, Outcome, OutputTopics, Runtime,
    RuntimeConfig,
};

/// Flags of `weir handler test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// The handler component (`.wasm`).
    pub component: PathBuf,
    /// Message payload, inline.
    #[arg(long, conflicts_with = "payload_file")]
    pub payload: Option<String>,
    /// Read the payload from a file (`-` for standard input).
    #[arg(long, value_name = "PATH")]
    pub payload_file: Option<PathBuf>,
    /// Message key.
    #[arg(long)]
    pub key: Option<String>,
    /// A message header, `name=value` (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_pair)]
    pub headers: Vec<(String, String)>,
    /// Topic the message appears to come from.
    #[arg(long, default_value = "test")]
    pub topic: String,
    /// Partition the message appears to come from.
    #[arg(long, default_value_t = 0)]
    pub partition: u32,
    /// Offset the message appears to have.
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
    /// Message id (default: the `message-id` header, else `<topic>/<partition>/<offset>`).
    #[arg(long)]
    pub id: Option<String>,
    /// Record timestamp, milliseconds since the Unix epoch (default: now).
    #[arg(long)]
    pub timestamp_ms: Option<i64>,
    /// Tenant that owns the handler.
    #[arg(long, default_value = "dev")]
    pub tenant: String,
    /// Attempt number (1 for a first delivery).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub attempt: u32,
    /// A binding setting, `name=value`, as the `config` import shows it (repeatable).
    #[arg(long = "config", value_name = "NAME=VALUE", value_parser = parse_pair)]
    pub config: Vec<(String, String)>,
    /// Initial keyed state of the message's key, `name=value` (repeatable; needs --key).
    #[arg(long = "state", value_name = "NAME=VALUE", value_parser = parse_pair, requires = "key")]
    pub state: Vec<(String, String)>,
    /// Restrict emits to this topic (repeatable; default: any topic).
    #[arg(long = "allow-topic", value_name = "TOPIC")]
    pub allow_topics: Vec<String>,
    /// Grant outbound HTTP to this destination, `host`, `host:port` or `*.domain`, as a
    /// binding's `http.allow` does (repeatable; default: none, every request is refused).
    #[arg(long = "allow-http", value_name = "HOST")]
    pub allow_http: Vec<String>,
    /// Invocation deadline in milliseconds (default: the runtime's, 5000).
    #[arg(long)]
    pub deadline_ms: Option<u64>,
    /// Linear-memory cap in bytes (default: the runtime's, 128 MiB).
    #[arg(long)]
    pub memory_bytes: Option<u64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("expected NAME=VALUE, got `{text}`")),
    }
}

/// Run the command; returns the exit code.
pub fn run(args: TestArgs) -> u8 {
    let output = args.output;
    match execute(args) {
        Ok(report) => {
            let code = exit_code(&report.invocation.outcome);
            match output {
                OutputFormat::Human => print!("{}", report.human()),
                OutputFormat::Json => println!("{}", report.json()),
            }
            code
        }
        Err(failure) => {
            match output {
                OutputFormat::Human => eprintln!("error: {}", failure.message),
                OutputFormat::Json => println!(
                    "{}",
                    json!({"outcome": "error", "error": {"code": failure.code, "message": failure.message}})
                ),
            }
            failure.exit
        }
    }
}

/// The exit code for an outcome.
pub fn exit_code(outcome: &Outcome) -> u8 {
    match outcome {
        Outcome::Ok => exit::OK,
        Outcome::HandlerError { .. } => exit::HANDLER_ERROR,
        Outcome::Refused { .. } | Outcome::Trap { .. } => exit::TRAP_OR_LIMIT,
    }
}

struct Failure {
    code: &'static str,
    message: String,
    exit: u8,
}

impl Failure {
    fn other(code: &'static str, message: String) -> Self {
        Self {
            code,
            message,
            exit: exit::FAILURE,
        }
    }
}

struct Report {
    path: PathBuf,
    hash: String,
    size: usize,
    message: Message,
    invocation: Invocation,
}

fn execute(args: TestArgs) -> Result<Report, Failure> {
    let bytes = std::fs::read(&args.component).map_err(|e| {
        Failure::other(
            "unreadable-component",
            format!("cannot read {}: {e}", args.component.display()),
        )
    })?;
    let payload = match (&args.payload, &args.payload_file) {
        (Some(text), _) => text.clone().into_bytes(),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).map_err(|e| {
                Failure::other(
                    "unreadable-payload",
                    format!("cannot read standard input: {e}"),
                )
            })?;
            buf
        }
        (None, Some(path)) => std::fs::read(path).map_err(|e| {
            Failure::other(
                "unreadable-payload",
                format!("cannot read {}: {e}", path.display()),
            )
        })?,
        (None, None) => Vec::new(),
    };

    let mut config = RuntimeConfig {
        // One invocation: a small pool, a fresh instance.
        pool_instances: 4,
        instance_policy: InstancePolicy::Fresh,
        ..RuntimeConfig::default()
    };
    if let Some(deadline) = args.deadline_ms {
        config.deadline_ms = deadline;
    }
    if let Some(memory) = args.memory_bytes {
        config.memory_bytes = memory;
    }
    let runtime =
        Runtime::new(config).map_err(|e| Failure::other("invalid-settings", e.to_string()))?;
    let component = runtime.load(&bytes).map_err(|e: ComponentError| Failure {
        code: e.code(),
        message: format!(
            "{} is not a valid Weir handler: {e}",
            args.component.display()
        ),
        exit: exit::INVALID_COMPONENT,
    })?;

    let headers: Vec<Header> = args
        .headers
        .iter()
        .map(|(k, v)| Header {
            key: k.clone(),
            value: v.clone().into_bytes(),
        })
        .collect();
    let id = args.id.clone().unwrap_or_else(|| {
        headers
            .iter()
            .find(|h| h.key == "message-id")
            .map(|h| String::from_utf8_lossy(&h.value).into_owned())
            .unwrap_or_else(|| format!("{}/{}/{}", args.topic, args.partition, args.offset))
    });
    let message = Message {
        id,
        topic: args.topic.clone(),
        partition: args.partition,
        offset: args.offset,
        key: args.key.clone().map(String::into_bytes),
        payload,
        headers,
        timestamp_ms: Some(args.timestamp_ms.unwrap_or_else(now_ms)),
        tenant: args.tenant.clone(),
        attempt: args.attempt,
    };
    let mut state = MemoryState::new();
    if let Some(key) = &args.key {
        for (name, value) in &args.state {
            state.insert(
                key.clone().into_bytes(),
                name.clone(),
                value.clone().into_bytes(),
            );
        }
    }
    let mut context = InvocationContext {
        config: Arc::new(args.config.iter().cloned().collect::<BTreeMap<_, _>>()),
        output_topics: if args.allow_topics.is_empty() {
            OutputTopics::Any
        } else {
            OutputTopics::Only(Arc::new(
                args.allow_topics.iter().cloned().collect::<HashSet<_>>(),
            ))
        },
        state: Arc::new(state),
        deadline: None,
        http: None,
    };
    let http = !args.allow_http.is_empty();
    if http {
        let policy = HttpPolicy::allowing(args.allow_http.iter().cloned());
        let metrics = Metrics::new().http("handler-test", &policy.allow);
        let gate = HttpGate::new("handler-test", policy, metrics).map_err(|e| Failure {
            code: "invalid-input",
            message: format!("--allow-http: {}", e.message),
            exit: exit::USAGE,
        })?;
        // A local tool: the services a handler is tried against usually run on this machine.
        context.http = Some(Arc::new(gate.allowing_private_networks(true)));
    }

    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::other("internal", format!("cannot start the async runtime: {e}")))?;
    let invocation = tokio.block_on(async {
        let mut instance = component
            .instantiate_with(http)
            .await
            .map_err(|e| Failure {
                code: "instantiate-failed",
                message: match e {
                    InstantiateError::HttpNotGranted { .. } => format!(
                        "{e} (here: pass --allow-http HOST for each host the handler may call)"
                    ),
                    e => e.to_string(),
                },
                exit: exit::TRAP_OR_LIMIT,
            })?;
        Ok::<_, Failure>(instance.invoke(&message, &context).await)
    })?;
    Ok(Report {
        path: args.component,
        hash: component.hash().to_string(),
        size: component.size(),
        message,
        invocation,
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Bytes for people: quoted text when printable UTF-8, else a hex preview.
fn show_bytes(bytes: &[u8]) -> String {
    const PREVIEW: usize = 512;
    match std::str::from_utf8(bytes) {
        Ok(text)
            if !text
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t') =>
        {
            if text.len() > PREVIEW {
                let mut end = PREVIEW;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                format!("{}… ({} bytes)", &text[..end], bytes.len())
            } else {
                text.to_owned()
            }
        }
        _ => {
            let hex: String = bytes.iter().take(32).map(|b| format!("{b:02x}")).collect();
            format!(
                "<{} bytes: {hex}{}>",
                bytes.len(),
                if bytes.len() > 32 { "…" } else { "" }
            )
        }
    }
}

impl Report {
    fn human(&self) -> String {
        let mut out = String::new();
        let inv = &self.invocation;
        let _ = writeln!(
            out,
            "handler   {} ({}, {} bytes)",
            self.path.display(),
            self.hash,
            self.size
        );
        let key = self
            .message
            .key
            .as_deref()
            .map(show_bytes)
            .unwrap_or_else(|| "(none)".to_owned());
        let _ = writeln!(
            out,
            "message   id {}  key {}  {} payload bytes  attempt {}",
            self.message.id,
            key,
            self.message.payload.len(),
            self.message.attempt
        );
        let took = format!("{:.3} ms", inv.duration.as_secs_f64() * 1e3);
        let _ = match &inv.outcome {
            Outcome::Ok => writeln!(out, "outcome   ok  ({took})"),
            Outcome::HandlerError { kind, message } => {
                writeln!(
                    out,
                    "outcome   handler error ({kind:?}): {message}  ({took})"
                )
            }
            Outcome::Refused { message } => {
                writeln!(out, "outcome   refused effect: {message}  ({took})")
            }
            Outcome::Trap { kind, message } => {
                writeln!(
                    out,
                    "outcome   trap ({}): {message}  ({took})",
                    json!(kind).as_str().unwrap_or("trap")
                )
            }
        };
        write_effects(&mut out, &inv.effects, &key, inv.outcome.is_ok());
        write_logs(&mut out, &inv.logs, inv.logs_dropped);
        out
    }

    fn json(&self) -> serde_json::Value {
        let mut value = json!({
            "component": {"path": self.path, "hash": self.hash, "size": self.size},
            "message": message_json(&self.message),
        });
        if let (Some(obj), Ok(serde_json::Value::Object(inv))) = (
            value.as_object_mut(),
            serde_json::to_value(&self.invocation),
        ) {
            obj.extend(inv);
        }
        value
    }
}

/// The message as JSON, bytes as text where they are UTF-8 (as in the effects).
fn message_json(message: &Message) -> serde_json::Value {
    let bytes = |b: &[u8]| json!(BytesText(b));
    json!({
        "id": message.id,
        "topic": message.topic,
        "partition": message.partition,
        "offset": message.offset,
        "key": message.key.as_deref().map(bytes),
        "payload": bytes(&message.payload),
        "headers": message.headers.iter().map(|h| json!({"key": h.key, "value": bytes(&h.value)})).collect::<Vec<_>>(),
        "timestamp_ms": message.timestamp_ms,
        "tenant": message.tenant,
        "attempt": message.attempt,
    })
}

fn write_effects(out: &mut String, effects: &Effects, key: &str, ok: bool) {
    if !ok {
        let _ = writeln!(
            out,
            "effects   none (a failed invocation leaves no effects)"
        );
        return;
    }
    let _ = writeln!(out, "emits     {}", effects.emits.len());
    for emit in &effects.emits {
        let emit_key = emit
            .key
            .as_deref()
            .map(show_bytes)
            .unwrap_or_else(|| "(none)".to_owned());
        let _ = writeln!(
            out,
            "  -> {}  key {}  {}",
            emit.topic,
            emit_key,
            show_bytes(&emit.payload)
        );
        for header in &emit.headers {
            let _ = writeln!(
                out,
                "       header {}: {}",
                header.key,
                show_bytes(&header.value)
            );
        }
    }
    let _ = writeln!(
        out,
        "state     {} write(s) for key {}",
        effects.state_writes.len(),
        key
    );
    for write in &effects.state_writes {
        let _ = match &write.value {
            Some(value) => writeln!(out, "  set {} = {}", write.name, show_bytes(value)),
            None => writeln!(out, "  delete {}", write.name),
        };
    }
}

fn write_logs(out: &mut String, logs: &[LogRecord], dropped: u32) {
    if logs.is_empty() && dropped == 0 {
        return;
    }
    let _ = writeln!(out, "logs");
    for log in logs {
        let level = json!(log.level);
        let source = json!(log.source);
        let _ = write!(
            out,
            "  {:<5} [{}] {}",
            level.as_str().unwrap_or("").to_uppercase(),
            source.as_str().unwrap_or(""),
            log.message
        );
        for (name, value) in &log.fields {
            let _ = write!(out, "  {name}={value}");
        }
        let _ = writeln!(out);
    }
    if dropped > 0 {
        let _ = writeln!(
            out,
            "  ({dropped} more line(s) dropped over the per-invocation limit)"
        );
    }
}
