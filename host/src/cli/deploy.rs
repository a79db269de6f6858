//! `weir handler deploy`: upload a handler component, make it the active version, and bind it
//! to topics — through the admin API, or straight into a store (see
//! [`super::api::store_direct`] for which).
//!
//! Through the API: the binding's settings are checked first ([`BindingSpec::validate`],
//! exit 2), then the version is uploaded (the server validates the component: exit 4 when it
//! is not a Weir handler) and activated unless `--no-activate`, then, when topics are given,
//! the binding is created, or replaced when it exists (POST, then PUT on 409).
//!
//! Straight into a store, everything is checked before anything is written: the binding's
//! settings (exit 2), then the component, in the same runtime the host uses ([`Runtime::load`],
//! exit 4). Then the handler version (an upload of bytes already stored returns the existing
//! version), its activation, and the binding (created, or replaced with its revision
//! increased). A store failure exits with 5.
//!
//! Presentation only: validation is the runtime's and the binding's, persistence the store's or
//! the API's.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use reqwest::Method;
use serde::Serialize;

use super::api::{Body, Client, ServerArgs, TenantArg, query, segment, store_direct, tenant_path};
use super::binding::{BindingFlags, binding_body};
use super::common::{ConfigFileArg, Failure, async_runtime, load_config, print};
use super::{OutputFormat, exit};
use crate::admin::bindings::BindingView;
use crate::admin::handlers::Uploaded;
use crate::pipeline::binding::check_binding_id;
use crate::pipeline::{BindingError, BindingSpec};
use crate::runtime::{ComponentError, Runtime, RuntimeConfig};

/// Flags of `weir handler deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The handler component (`.wasm`).
    pub component: PathBuf,
    #[command(flatten)]
    pub tenant: TenantArg,
    /// Handler name (a new upload of the same name is a new version).
    #[arg(long)]
    pub name: String,
    #[command(flatten)]
    pub binding: BindingFlags,
    /// Binding id (default: `<tenant>.<name>`). Deploying again under the same id replaces the
    /// binding: settings not given on the command line take their defaults again.
    #[arg(long, value_name = "ID")]
    pub binding_id: Option<String>,
    /// Store the version without activating it (the active version, if any, keeps running).
    #[arg(long)]
    pub no_activate: bool,
    #[command(flatten)]
    config_file: ConfigFileArg,
    #[command(flatten)]
    server: ServerArgs,
    /// Output format (`human`, alias `table`, or `json`).
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// What was deployed into a store.
#[derive(Debug, Serialize)]
struct Deployed {
    outcome: &'static str,
    tenant: String,
    handler: String,
    version: i32,
    sha256: String,
    size: i64,
    active: bool,
    binding_id: String,
    binding_revision: i64,
    group_id: String,
    topics: Vec<String>,
    output_topics: Vec<String>,
    dlq_topic: String,
    store: String,
}

/// What was deployed through the API: the version, and the binding when topics were given.
#[derive(Debug, Serialize)]
struct ApiDeployed {
    outcome: &'static str,
    tenant: String,
    handler: String,
    version: i32,
    sha256: String,
    size: i64,
    active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    binding_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    binding_revision: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    topics: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_topics: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dlq_topic: Option<String>,
    server: String,
}

/// Run the command; returns the exit code.
pub fn run(args: DeployArgs) -> u8 {
    let output = args.output;
    let result =
        store_direct(args.config_file.config_file.as_deref(), &args.server).and_then(|direct| {
            if direct {
                execute(args).map(|d| print(output, &d, Deployed::human))
            } else {
                through_api(args).map(|d| print(output, &d, ApiDeployed::human))
            }
        });
    result.unwrap_or_else(|failure| failure.report(output))
}

fn invalid_binding(error: BindingError) -> Failure {
    Failure::new("invalid-binding", error.to_string(), exit::USAGE)
}

/// The binding the flags describe and its id, checked.
fn checked_binding(args: &DeployArgs, tenant: &str) -> Result<(BindingSpec, String), Failure> {
    let spec = args.binding.spec(tenant, &args.name);
    spec.validate().map_err(invalid_binding)?;
    let binding_id = args
        .binding_id
        .clone()
        .unwrap_or_else(|| format!("{tenant}.{}", args.name));
    check_binding_id(&binding_id).map_err(invalid_binding)?;
    Ok((spec, binding_id))
}

fn read_component(args: &DeployArgs) -> Result<Vec<u8>, Failure> {
    std::fs::read(&args.component).map_err(|e| {
        Failure::other(
            "unreadable-component",
            format!("cannot read {}: {e}", args.component.display()),
        )
    })
}

fn through_api(args: DeployArgs) -> Result<ApiDeployed, Failure> {
    let client = Client::new(&args.server)?;
    let tenant = client.tenant(args.tenant.tenant.as_deref())?;
    // 1. The binding's settings: cheap, and a typo should not leave a version behind.
    let binding = if args.binding.topics.is_empty() {
        None
    } else {
        Some(checked_binding(&args, &tenant)?)
    };
    // 2. The version: the server validates and compiles it before storing anything.
    let bytes = read_component(&args)?;
    let path = tenant_path(
        &tenant,
        &format!(
            "/handlers/{}/versions{}",
            segment(&args.name),
            query(&[("activate", Some((!args.no_activate).to_string()))])
        ),
    );
    let uploaded: Uploaded = client
        .call(Method::POST, &path, Body::<()>::Wasm(bytes))
        .map_err(|mut failure| {
            if failure.exit == exit::INVALID_COMPONENT {
                failure.message = format!(
                    "{} is not a valid Weir handler: {}",
                    args.component.display(),
                    failure.message
                );
            }
            failure
        })?;
    let version = &uploaded.version;
    let mut deployed = ApiDeployed {
        outcome: "deployed",
        tenant: tenant.clone(),
        handler: uploaded.name.clone(),
        version: version.version,
        sha256: version.sha256.clone(),
        size: version.size,
        active: version.active,
        binding_id: None,
        binding_revision: None,
        group_id: None,
        topics: None,
        output_topics: None,
        dlq_topic: None,
        server: client.server().to_owned(),
    };
    // 3. The binding: created, or replaced when it exists.
    let Some((spec, binding_id)) = binding else {
        return Ok(deployed);
    };
    let body = binding_body(Some(&binding_id), &spec)?;
    let created: Result<BindingView, Failure> = client.call(
        Method::POST,
        &tenant_path(&tenant, "/bindings"),
        Body::Json(&body),
    );
    let stored = match created {
        Err(failure) if failure.exit == exit::CONFLICT => client
            .call(
                Method::PUT,
                &tenant_path(&tenant, &format!("/bindings/{}", segment(&binding_id))),
                Body::Json(&body),
            )
            .map_err(|failure| {
                if failure.exit == exit::NOT_FOUND {
                    // The id exists, but not among this tenant's bindings.
                    Failure::new(
                        "conflict",
                        format!(
                            "binding id {binding_id:?} belongs to another tenant; choose another \
                             with --binding-id"
                        ),
                        exit::CONFLICT,
                    )
                } else {
                    failure
                }
            }),
        other => other,
    };
    let view = stored.map_err(|mut failure| {
        let _ = write!(
            failure.message,
            " (version {} of {tenant}/{} was stored{}; the binding was not changed)",
            deployed.version,
            deployed.handler,
            if deployed.active {
                " and activated"
            } else {
                ""
            }
        );
        failure
    })?;
    deployed.binding_id = Some(view.id);
    deployed.binding_revision = Some(view.revision);
    deployed.group_id = Some(view.spec.group_id());
    deployed.dlq_topic = Some(view.spec.dlq_topic());
    deployed.topics = Some(view.spec.topics);
    deployed.output_topics = Some(view.spec.output_topics);
    Ok(deployed)
}

fn execute(args: DeployArgs) -> Result<Deployed, Failure> {
    let Some(tenant) = args.tenant.tenant.clone() else {
        return Err(Failure::usage(
            "--tenant is required when deploying straight into a store",
        ));
    };
    // 1. The binding's settings: cheap, and a typo should not wait for a compilation.
    let (spec, binding_id) = checked_binding(&args, &tenant)?;

    // 2. The configuration and the component, in the runtime the host would run it in.
    let config = load_config(args.config_file.config_file.as_deref())?;
    let bytes = read_component(&args)?;
    let runtime = Runtime::new(RuntimeConfig {
        // Loading validates and compiles; it instantiates nothing, so one slot is enough.
        pool_instances: 1,
        ..config.runtime.clone()
    })
    .map_err(|e| Failure::other("invalid-configuration", e.to_string()))?;
    runtime.load(&bytes).map_err(|e: ComponentError| {
        Failure::new(
            e.code(),
            format!(
                "{} is not a valid Weir handler: {e}",
                args.component.display()
            ),
            exit::INVALID_COMPONENT,
        )
    })?;
    drop(runtime);
    let spec_json = serde_json::to_value(&spec)
        .map_err(|e| Failure::other("internal", format!("cannot serialize the binding: {e}")))?;

    // 3. The store: version, activation, binding.
    let store_config = &config.store;
    let handler = &args.name;
    let activate = !args.no_activate;
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
            if let Some(existing) = existing.filter(|b| b.tenant != tenant) {
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
                .put_handler_version(&tenant, handler, &bytes, &crate::store::Quota::default())
                .await
                .map_err(|e| Failure::store(store_config, "storing the handler version in", e))?;
            if activate {
                store
                    .activate(&tenant, handler, version.version)
                    .await
                    .map_err(|e| Failure::store(store_config, "activating the version in", e))?;
            }
            let binding = store
                .put_binding(&binding_id, &tenant, handler, &spec_json)
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
        active: activate,
        binding_id: binding.id,
        binding_revision: binding.revision,
        group_id: spec.group_id(),
        dlq_topic: spec.dlq_topic(),
        topics: spec.topics,
        output_topics: spec.output_topics,
        store: store_config.redacted_url(),
    })
}

fn active(active: bool) -> &'static str {
    if active {
        "(active)"
    } else {
        "(stored, not activated)"
    }
}

fn or_none(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".to_owned()
    } else {
        items.join(", ")
    }
}

impl Deployed {
    fn human(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "handler   {}/{} version {} {}",
            self.tenant,
            self.handler,
            self.version,
            active(self.active)
        );
        let _ = writeln!(out, "sha256    {}  ({} bytes)", self.sha256, self.size);
        let _ = writeln!(
            out,
            "binding   {} (revision {})",
            self.binding_id, self.binding_revision
        );
        let _ = writeln!(out, "group     {}", self.group_id);
        let _ = writeln!(out, "topics    {}", self.topics.join(", "));
        let _ = writeln!(out, "outputs   {}", or_none(&self.output_topics));
        let _ = writeln!(out, "dlq       {}", self.dlq_topic);
        let _ = writeln!(out, "store     {}", self.store);
        out
    }
}

impl ApiDeployed {
    fn human(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "handler   {}/{} version {} {}",
            self.tenant,
            self.handler,
            self.version,
            active(self.active)
        );
        let _ = writeln!(out, "sha256    {}  ({} bytes)", self.sha256, self.size);
        match (&self.binding_id, self.binding_revision) {
            (Some(id), Some(revision)) => {
                let _ = writeln!(out, "binding   {id} (revision {revision})");
                let _ = writeln!(out, "group     {}", self.group_id.as_deref().unwrap_or(""));
                let _ = writeln!(
                    out,
                    "topics    {}",
                    or_none(self.topics.as_deref().unwrap_or_default())
                );
                let _ = writeln!(
                    out,
                    "outputs   {}",
                    or_none(self.output_topics.as_deref().unwrap_or_default())
                );
                let _ = writeln!(out, "dlq       {}", self.dlq_topic.as_deref().unwrap_or(""));
            }
            _ => {
                let _ = writeln!(out, "binding   (unchanged: no --topic given)");
            }
        }
        let _ = writeln!(out, "server    {}", self.server);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::binding::MAX_BINDING_ID_LEN;

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
