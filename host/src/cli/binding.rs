//! `weir binding list|show|create|update|delete|breaker`: bindings, through the admin API — and
//! `weir binding list` straight from a store, as before the API existed, when one is configured
//! (see [`super::api::store_direct`]). Also the binding flags `weir handler deploy` shares
//! ([`BindingFlags`]).
//!
//! Prints each binding's id, tenant, handler, topics and revision (as JSON: the whole record,
//! spec included). Presentation only; validation is the binding's and the API's, the records
//! the store's.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::json;

use super::OutputFormat;
use super::api::{
    ApiArgs, Body, Client, NO_BODY, ServerArgs, TenantArg, segment, store_direct, tenant_path,
};
use super::common::{
    ConfigFileArg, Failure, async_runtime, load_config, or_dash, parse_pair, print, table,
};
use crate::admin::bindings::BindingView;
use crate::admin::breaker::BreakerView;
use crate::outbound::HttpPolicy;
use crate::pipeline::{BindingSpec, Ordering};
use crate::store::BindingRecord;

/// `weir binding …`.
#[derive(Debug, Subcommand)]
pub enum BindingCommand {
    /// List bindings: id, tenant, handler, topics, revision.
    ///
    /// Through the admin API: the tenant's bindings. Straight from the store (with
    /// `--config-file`, or when `WEIR_STORE__URL` is set or `./weir.toml` exists, and neither
    /// `--server` nor `WEIR_SERVER` is given): every binding, or `--tenant`'s.
    List(ListArgs),
    /// Show one binding with its whole policy.
    Show(ShowArgs),
    /// Create a binding of a handler to topics. Exit code 2 when a setting is invalid (the
    /// field is named), 8 when the id is taken.
    Create(CreateArgs),
    /// Change a binding: flags given replace the current values (a repeatable flag replaces
    /// the whole list), the rest stay. Every host picks the change up without a restart.
    Update(UpdateArgs),
    /// Delete a binding (its processed keys and DLQ entries stay).
    Delete(DeleteArgs),
    /// Show a binding's circuit breaker; `--reset` closes it, `--open` forces it open until
    /// reset (every host pauses or resumes the binding within about a second).
    Breaker(BreakerArgs),
}

/// Flags of `weir binding breaker`.
#[derive(Debug, Args)]
pub struct BreakerArgs {
    /// Binding id.
    pub id: String,
    /// Close the breaker (a forced one too): consumption resumes.
    #[arg(long, conflicts_with = "open")]
    pub reset: bool,
    /// Force the breaker open until `--reset`: consumption pauses, nothing is spent.
    #[arg(long)]
    pub open: bool,
    #[command(flatten)]
    pub tenant: TenantArg,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// A binding's policy as flags: shared by `weir binding create|update` and
/// `weir handler deploy`.
#[derive(Debug, Clone, Args)]
pub struct BindingFlags {
    /// Topic to consume (repeatable).
    #[arg(long = "topic", value_name = "TOPIC")]
    pub topics: Vec<String>,
    /// Topic the handler may emit to (repeatable; default: none).
    #[arg(long = "output-topic", value_name = "TOPIC")]
    pub output_topics: Vec<String>,
    /// A binding setting, `name=value`, read by the handler through the `config` import
    /// (repeatable).
    #[arg(long = "config", value_name = "NAME=VALUE", value_parser = parse_pair)]
    pub config: Vec<(String, String)>,
    /// Consumer group (default: `weir.<tenant>.<name>`).
    #[arg(long = "group", value_name = "GROUP")]
    pub group: Option<String>,
    /// Message ordering (default: key).
    #[arg(long, value_enum)]
    pub ordering: Option<OrderingArg>,
    /// Messages in flight at once (default: 64).
    #[arg(long, value_name = "N")]
    pub max_in_flight: Option<usize>,
    /// Attempts in all, the first included, before a message is dead-lettered (default: 4).
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Waits before the 2nd, 3rd, … attempt, in milliseconds (default: 1000,2000,5000).
    #[arg(long, value_name = "MS,…", value_delimiter = ',')]
    pub backoff_ms: Option<Vec<u64>>,
    /// Invocation deadline in milliseconds (default: the runtime's).
    #[arg(long, value_name = "MS")]
    pub deadline_ms: Option<u64>,
    /// Topic dead-lettered messages are published to (default: `<first topic>.dlq`).
    #[arg(long, value_name = "TOPIC")]
    pub dlq_topic: Option<String>,
    /// Grant outbound HTTP to this destination: `host`, `host:port` or `*.domain` (repeatable;
    /// the other `http` settings keep their defaults or current values).
    #[arg(long = "allow-http", value_name = "HOST")]
    pub allow_http: Vec<String>,
}

/// `--ordering` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OrderingArg {
    /// One message at a time per key, in offset order; different keys in parallel.
    Key,
    /// One message at a time per partition.
    Partition,
    /// No ordering.
    None,
}

impl From<OrderingArg> for Ordering {
    fn from(arg: OrderingArg) -> Self {
        match arg {
            OrderingArg::Key => Ordering::Key,
            OrderingArg::Partition => Ordering::Partition,
            OrderingArg::None => Ordering::None,
        }
    }
}

impl BindingFlags {
    /// The binding the flags describe, every setting not given at its default.
    pub fn spec(&self, tenant: &str, handler: &str) -> BindingSpec {
        let mut spec = BindingSpec::new(tenant, handler, Vec::new());
        self.apply(&mut spec);
        spec
    }

    /// Set what the flags give on `spec`, leaving the rest as it is. A repeatable flag given
    /// replaces the whole list (or map).
    pub fn apply(&self, spec: &mut BindingSpec) {
        if !self.topics.is_empty() {
            spec.topics.clone_from(&self.topics);
        }
        if !self.output_topics.is_empty() {
            spec.output_topics.clone_from(&self.output_topics);
        }
        if !self.config.is_empty() {
            spec.config = self.config.iter().cloned().collect::<BTreeMap<_, _>>();
        }
        if let Some(group) = &self.group {
            spec.group_id = Some(group.clone());
        }
        if let Some(ordering) = self.ordering {
            spec.ordering = ordering.into();
        }
        if let Some(max_in_flight) = self.max_in_flight {
            spec.max_in_flight = max_in_flight;
        }
        if let Some(max_attempts) = self.max_attempts {
            spec.retry.max_attempts = max_attempts;
        }
        if let Some(backoff) = &self.backoff_ms {
            spec.retry.backoff = backoff.iter().copied().map(Duration::from_millis).collect();
        }
        if let Some(deadline_ms) = self.deadline_ms {
            spec.deadline_ms = Some(deadline_ms);
        }
        if let Some(dlq_topic) = &self.dlq_topic {
            spec.dlq_topic = Some(dlq_topic.clone());
        }
        if !self.allow_http.is_empty() {
            match &mut spec.http {
                Some(http) => http.allow.clone_from(&self.allow_http),
                None => spec.http = Some(HttpPolicy::allowing(self.allow_http.iter().cloned())),
            }
        }
    }
}

/// The JSON body of a binding create or replace: the spec, and the id.
pub fn binding_body(id: Option<&str>, spec: &BindingSpec) -> Result<serde_json::Value, Failure> {
    let mut body = serde_json::to_value(spec)
        .map_err(|e| Failure::other("internal", format!("cannot serialize the binding: {e}")))?;
    if let (Some(id), Some(fields)) = (id, body.as_object_mut()) {
        fields.insert("id".to_owned(), json!(id));
    }
    Ok(body)
}

/// Flags of `weir binding list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this tenant's bindings (through the API, default: the token's own tenant).
    #[arg(long)]
    pub tenant: Option<String>,
    #[command(flatten)]
    config_file: ConfigFileArg,
    #[command(flatten)]
    server: ServerArgs,
    /// Output format (`human`, alias `table`, or `json`).
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Flags of `weir binding show` and `weir binding delete`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Binding id.
    pub id: String,
    #[command(flatten)]
    pub tenant: TenantArg,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Flags of `weir binding delete`.
pub type DeleteArgs = ShowArgs;

/// Flags of `weir binding create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The handler to run (its active version).
    #[arg(long)]
    pub handler: String,
    /// Binding id (default: `<tenant>.<handler>`).
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    #[command(flatten)]
    pub binding: BindingFlags,
    #[command(flatten)]
    pub tenant: TenantArg,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Flags of `weir binding update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Binding id.
    pub id: String,
    /// Run another handler.
    #[arg(long)]
    pub handler: Option<String>,
    #[command(flatten)]
    pub binding: BindingFlags,
    #[command(flatten)]
    pub tenant: TenantArg,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Run a `weir binding` command; returns the exit code.
pub fn run(command: BindingCommand) -> u8 {
    let output = match &command {
        BindingCommand::List(a) => a.output,
        BindingCommand::Show(a) | BindingCommand::Delete(a) => a.api.output,
        BindingCommand::Create(a) => a.api.output,
        BindingCommand::Update(a) => a.api.output,
        BindingCommand::Breaker(a) => a.api.output,
    };
    let result = match command {
        BindingCommand::List(args) => list(&args),
        BindingCommand::Show(args) => Client::new(&args.api.server).and_then(|client| {
            let tenant = client.tenant(args.tenant.tenant.as_deref())?;
            let view: BindingView = client.get(&binding_path(&tenant, &args.id))?;
            Ok(print(output, &view, binding_human))
        }),
        BindingCommand::Create(args) => Client::new(&args.api.server).and_then(|client| {
            let tenant = client.tenant(args.tenant.tenant.as_deref())?;
            let spec = args.binding.spec(&tenant, &args.handler);
            let body = binding_body(args.id.as_deref(), &spec)?;
            let view: BindingView = client.call(
                Method::POST,
                &tenant_path(&tenant, "/bindings"),
                Body::Json(&body),
            )?;
            Ok(print(output, &view, |v| {
                format!("binding {} created\n{}", v.id, binding_human(v))
            }))
        }),
        BindingCommand::Update(args) => Client::new(&args.api.server).and_then(|client| {
            let tenant = client.tenant(args.tenant.tenant.as_deref())?;
            let path = binding_path(&tenant, &args.id);
            let current: BindingView = client.get(&path)?;
            let mut spec = current.spec;
            if let Some(handler) = &args.handler {
                spec.handler.clone_from(handler);
            }
            args.binding.apply(&mut spec);
            let body = binding_body(Some(&args.id), &spec)?;
            let view: BindingView = client.call(Method::PUT, &path, Body::Json(&body))?;
            Ok(print(output, &view, |v| {
                format!("binding {} updated\n{}", v.id, binding_human(v))
            }))
        }),
        BindingCommand::Delete(args) => Client::new(&args.api.server).and_then(|client| {
            let tenant = client.tenant(args.tenant.tenant.as_deref())?;
            client.call_empty(Method::DELETE, &binding_path(&tenant, &args.id), NO_BODY)?;
            Ok(print(
                output,
                &json!({"outcome": "deleted", "binding_id": args.id}),
                |_| format!("binding {} deleted\n", args.id),
            ))
        }),
        BindingCommand::Breaker(args) => Client::new(&args.api.server).and_then(|client| {
            let tenant = client.tenant(args.tenant.tenant.as_deref())?;
            let path = format!("{}/breaker", binding_path(&tenant, &args.id));
            let view: BreakerView = if args.reset {
                client.call(Method::POST, &format!("{path}/reset"), NO_BODY)?
            } else if args.open {
                client.call(Method::POST, &format!("{path}/open"), NO_BODY)?
            } else {
                client.get(&path)?
            };
            Ok(print(output, &view, breaker_human))
        }),
    };
    result.unwrap_or_else(|failure| failure.report(output))
}

/// A breaker, for people.
fn breaker_human(v: &BreakerView) -> String {
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or_else(
            || "-".to_owned(),
            |t| t.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string(),
        )
    };
    let mut out = String::new();
    let state = v.state.as_str();
    let forced = if v.forced {
        " (forced until reset)"
    } else {
        ""
    };
    let _ = writeln!(out, "binding   {}", v.binding_id);
    let _ = writeln!(out, "state     {state}{forced}");
    let _ = writeln!(out, "failures  {}", or_dash(v.consecutive_failures));
    let _ = writeln!(out, "opened    {}", time(v.opened_at));
    let _ = writeln!(out, "until     {}", time(v.until));
    let _ = writeln!(
        out,
        "policy    failure_threshold {}, success_threshold {}, open_for_ms {}",
        v.policy.failure_threshold, v.policy.success_threshold, v.policy.open_for_ms
    );
    out
}

fn binding_path(tenant: &str, id: &str) -> String {
    tenant_path(tenant, &format!("/bindings/{}", segment(id)))
}

fn list(args: &ListArgs) -> Result<u8, Failure> {
    if store_direct(args.config_file.config_file.as_deref(), &args.server)? {
        let bindings = list_from_store(args)?;
        return Ok(print(args.output, &bindings, |b| {
            bindings_table(b.iter().map(|b| {
                (
                    b.id.as_str(),
                    b.tenant.as_str(),
                    b.handler.as_str(),
                    stored_topics(b),
                    b.revision,
                )
            }))
        }));
    }
    let client = Client::new(&args.server)?;
    let tenant = client.tenant(args.tenant.as_deref())?;
    let bindings: Vec<BindingView> = client.get(&tenant_path(&tenant, "/bindings"))?;
    Ok(print(args.output, &bindings, |b| {
        bindings_table(b.iter().map(|b| {
            (
                b.id.as_str(),
                b.tenant.as_str(),
                b.handler.as_str(),
                b.spec.topics.join(","),
                b.revision,
            )
        }))
    }))
}

fn list_from_store(args: &ListArgs) -> Result<Vec<BindingRecord>, Failure> {
    let config = load_config(args.config_file.config_file.as_deref())?;
    let store_config = &config.store;
    let mut bindings = async_runtime()?.block_on(async {
        let store = store_config
            .connect()
            .await
            .map_err(|e| Failure::store(store_config, "opening", e))?;
        let listed = store.list_bindings().await;
        store.close().await;
        listed.map_err(|e| Failure::store(store_config, "listing the bindings of", e))
    })?;
    if let Some(tenant) = &args.tenant {
        bindings.retain(|binding| &binding.tenant == tenant);
    }
    Ok(bindings)
}

/// The topics a stored spec names (the store does not interpret specs; neither does this, beyond
/// showing them).
fn stored_topics(binding: &BindingRecord) -> String {
    binding
        .spec
        .get("topics")
        .and_then(serde_json::Value::as_array)
        .map(|topics| {
            topics
                .iter()
                .filter_map(serde_json::Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn bindings_table<'a>(
    bindings: impl Iterator<Item = (&'a str, &'a str, &'a str, String, i64)>,
) -> String {
    let rows: Vec<[String; 5]> = bindings
        .map(|(id, tenant, handler, topics, revision)| {
            [
                id.to_owned(),
                tenant.to_owned(),
                handler.to_owned(),
                topics,
                revision.to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no bindings\n".to_owned();
    }
    table(["ID", "TENANT", "HANDLER", "TOPICS", "REVISION"], &rows)
}

/// One binding, for people.
pub fn binding_human(v: &BindingView) -> String {
    let spec = &v.spec;
    let list = |items: &[String]| {
        if items.is_empty() {
            "(none)".to_owned()
        } else {
            items.join(", ")
        }
    };
    let mut out = String::new();
    let _ = writeln!(out, "binding   {} (revision {})", v.id, v.revision);
    let _ = writeln!(out, "handler   {}/{}", v.tenant, v.handler);
    let _ = writeln!(out, "group     {}", spec.group_id());
    let _ = writeln!(out, "topics    {}", list(&spec.topics));
    let _ = writeln!(out, "outputs   {}", list(&spec.output_topics));
    let _ = writeln!(out, "dlq       {}", spec.dlq_topic());
    let ordering = serde_json::to_value(spec.ordering)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "policy    ordering {ordering}, max_in_flight {}, deadline_ms {}",
        spec.max_in_flight,
        or_dash(spec.deadline_ms)
    );
    let backoff: Vec<String> = spec
        .retry
        .backoff
        .iter()
        .map(|d| d.as_millis().to_string())
        .collect();
    let _ = writeln!(
        out,
        "retry     {} attempts, backoff_ms {}",
        spec.retry.max_attempts,
        backoff.join(",")
    );
    let _ = writeln!(
        out,
        "breaker   failure_threshold {}, success_threshold {}, open_for_ms {}",
        spec.breaker.failure_threshold, spec.breaker.success_threshold, spec.breaker.open_for_ms
    );
    for (name, value) in &spec.config {
        let _ = writeln!(out, "config    {name}={value}");
    }
    let _ = writeln!(
        out,
        "updated   {}",
        v.updated_at.format("%Y-%m-%d %H:%M:%SZ")
    );
    out
}
