//! `weir handler deploy`: upload a handler component, make it the active version, and bind it
//! to topics.
//!
//! Everything is checked before anything is written: the binding's settings
//! ([`BindingSpec::validate`], exit 2), then the component, in the same runtime the host uses
//! ([`Runtime::load`], exit 4). Then, in the store the configuration names: the handler
//! version (an upload of bytes already stored returns the existing version), its activation,
//! and the binding (created, or replaced with its revision increased). A store failure exits
//! with 5.
//!
//! Presentation only: validation is the runtime's and the binding's, persistence the store's.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Serialize;

use super::common::{ConfigFileArg, Failure, async_runtime, load_config, parse_pair};
use super::{OutputFormat, exit};
use crate::pipeline::{BindingError, BindingSpec, Ordering};
use crate::runtime::{ComponentError, Runtime, RuntimeConfig};

/// Longest binding id accepted.
const MAX_BINDING_ID_LEN: usize = 255;

/// Flags of `weir handler deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The handler component (`.wasm`).
    pub component: PathBuf,
    /// Tenant that owns the handler.
    #[arg(long)]
    pub tenant: String,
    /// Handler name (a new upload of the same name is a new version).
    #[arg(long)]
    pub name: String,
    /// Topic to consume (repeatable; at least one).
    #[arg(long = "topic", value_name = "TOPIC", required = true)]
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
    /// Binding id (default: `<tenant>.<name>`). Deploying again under the same id replaces the
    /// binding: settings not given on the command line take their defaults again.
    #[arg(long, value_name = "ID")]
    pub binding_id: Option<String>,
    #[command(flatten)]
    config_file: ConfigFileArg,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
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

/// What was deployed.
#[derive(Debug, Serialize)]
struct Deployed {
    outcome: &'static str,
    tenant: String,
    handler: String,
    version: i32,
    sha256: String,
    size: i64,
    binding_id: String,
    binding_revision: i64,
    group_id: String,
    topics: Vec<String>,
    output_topics: Vec<String>,
    dlq_topic: String,
    store: String,
}

/// Run the command; returns the exit code.
pub fn run(args: DeployArgs) -> u8 {
    let output = args.output;
    match execute(args) {
        Ok(deployed) => {
            match output {
                OutputFormat::Human => print!("{}", deployed.human()),
                OutputFormat::Json => match serde_json::to_string(&deployed) {
                    Ok(text) => println!("{text}"),
                    Err(e) => return Failure::other("internal", e.to_string()).report(output),
                },
            }
            exit::OK
        }
        Err(failure) => failure.report(output),
    }
}

/// The binding the flags describe.
fn binding_spec(args: &DeployArgs) -> BindingSpec {
    let mut spec = BindingSpec::new(&args.tenant, &args.name, args.topics.clone());
    spec.group_id = args.group.clone();
    if let Some(ordering) = args.ordering {
        spec.ordering = ordering.into();
    }
    if let Some(max_in_flight) = args.max_in_flight {
        spec.max_in_flight = max_in_flight;
    }
    if let Some(max_attempts) = args.max_attempts {
        spec.retry.max_attempts = max_attempts;
    }
    if let Some(backoff) = &args.backoff_ms {
        spec.retry.backoff = backoff.iter().copied().map(Duration::from_millis).collect();
    }
    spec.output_topics = args.output_topics.clone();
    spec.config = args.config.iter().cloned().collect::<BTreeMap<_, _>>();
    spec.deadline_ms = args.deadline_ms;
    spec.dlq_topic = args.dlq_topic.clone();
    spec
}

/// Binding ids: 1–255 characters of `a-z`, `0-9`, `.`, `_`, `-`, starting with a letter or
/// digit (the default `<tenant>.<name>` always is one).
fn check_binding_id(id: &str) -> Result<(), BindingError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_BINDING_ID_LEN
        && id.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(BindingError {
            field: "binding_id".to_owned(),
            message: format!(
                "`{id}` must be 1-{MAX_BINDING_ID_LEN} characters of a-z, 0-9, `.`, `_`, `-`, \
                 starting with a letter or digit"
            ),
        })
    }
}

fn invalid_binding(error: BindingError) -> Failure {
    Failure {
        code: "invalid-binding",
        message: error.to_string(),
        exit: exit::USAGE,
    }
}

fn execute(args: DeployArgs) -> Result<Deployed, Failure> {
    // 1. The binding's settings: cheap, and a typo should not wait for a compilation.
    let spec = binding_spec(&args);
    spec.validate().map_err(invalid_binding)?;
    let binding_id = args
        .binding_id
        .clone()
        .unwrap_or_else(|| format!("{}.{}", args.tenant, args.name));
    check_binding_id(&binding_id).map_err(invalid_binding)?;

    // 2. The configuration and the component, in the runtime the host would run it in.
    let config = load_config(args.config_file.config_file.as_deref())?;
    let bytes = std::fs::read(&args.component).map_err(|e| {
        Failure::other(
            "unreadable-component",
            format!("cannot read {}: {e}", args.component.display()),
        )
    })?;
    let runtime = Runtime::new(RuntimeConfig {
        // Loading validates and compiles; it instantiates nothing, so one slot is enough.
        pool_instances: 1,
        ..config.runtime.clone()
    })
    .map_err(|e| Failure::other("invalid-configuration", e.to_string()))?;
    runtime.load(&bytes).map_err(|e: ComponentError| Failure {
        code: e.code(),
        message: format!(
            "{} is not a valid Weir handler: {e}",
            args.component.display()
        ),
        exit: exit::INVALID_COMPONENT,
    })?;
    drop(runtime);
    let spec_json = serde_json::to_value(&spec)
        .map_err(|e| Failure::other("internal", format!("cannot serialize the binding: {e}")))?;

    // 3. The store: version, activation, binding.
    let store_config = &config.store;
    let tenant = &args.tenant;
    let handler = &args.name;
    let (version, binding) = async_runtime()?.block_on(async {
        let store = store_config
            .connect()
            .await
            .map_err(|e| Failure::store(store_config, "opening", e))?;
        let written = async {
            // The store refuses a binding id of another tenant only at the last write; ask
            // first, so that such a deploy leaves no version behind either.
            let existing = store
                .binding(&binding_id)
                .await
                .map_err(|e| Failure::store(store_config, "reading the binding from", e))?;
            if let Some(existing) = existing.filter(|b| &b.tenant != tenant) {
                return Err(Failure::other(
                    "conflict",
                    format!(
                        "binding id {binding_id:?} belongs to tenant {:?}; choose another with \
                         --binding-id",
                        existing.tenant
                    ),
                ));
            }
            let version = store
                .put_handler_version(tenant, handler, &bytes)
                .await
                .map_err(|e| Failure::store(store_config, "storing the handler version in", e))?;
            store
                .activate(tenant, handler, version.version)
                .await
                .map_err(|e| Failure::store(store_config, "activating the version in", e))?;
            let binding = store
                .put_binding(&binding_id, tenant, handler, &spec_json)
                .await
                .map_err(|e| Failure::store(store_config, "storing the binding in", e))?;
            Ok::<_, Failure>((version, binding))
        }
        .await;
        store.close().await;
        written
    })?;
    Ok(Deployed {
        outcome: "deployed",
        tenant: version.tenant,
        handler: version.handler,
        version: version.version,
        sha256: version.sha256,
        size: version.size,
        binding_id: binding.id,
        binding_revision: binding.revision,
        group_id: spec.group_id(),
        dlq_topic: spec.dlq_topic(),
        topics: spec.topics,
        output_topics: spec.output_topics,
        store: store_config.redacted_url(),
    })
}

impl Deployed {
    fn human(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "handler   {}/{} version {} (active)",
            self.tenant, self.handler, self.version
        );
        let _ = writeln!(out, "sha256    {}  ({} bytes)", self.sha256, self.size);
        let _ = writeln!(
            out,
            "binding   {} (revision {})",
            self.binding_id, self.binding_revision
        );
        let _ = writeln!(out, "group     {}", self.group_id);
        let _ = writeln!(out, "topics    {}", self.topics.join(", "));
        let outputs = if self.output_topics.is_empty() {
            "(none)".to_owned()
        } else {
            self.output_topics.join(", ")
        };
        let _ = writeln!(out, "outputs   {outputs}");
        let _ = writeln!(out, "dlq       {}", self.dlq_topic);
        let _ = writeln!(out, "store     {}", self.store);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_ids_are_plain_names() {
        assert!(check_binding_id("acme.orders").is_ok());
        assert!(check_binding_id("acme-orders_2").is_ok());
        for bad in ["", ".acme", "Acme.orders", "acme orders", "acme/orders"] {
            let err = check_binding_id(bad).expect_err(bad);
            assert_eq!(err.field, "binding_id");
        }
        assert!(check_binding_id(&"a".repeat(MAX_BINDING_ID_LEN + 1)).is_err());
    }
}
