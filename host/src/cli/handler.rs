//! `weir handler list|show|activate|rollback|delete`: a tenant's handlers and their versions,
//! through the admin API. (`weir handler deploy` and `weir handler test` have modules of their
//! own.)
//!
//! Presentation only: what an activation or a rollback does (a hot swap on every host) is the
//! API's and the host's business.

use std::fmt::Write as _;

use clap::Args;
use reqwest::Method;
use serde_json::json;

use super::OutputFormat;
use super::api::{ApiArgs, Body, Client, NO_BODY, TenantArg, segment, tenant_path};
use super::common::{Failure, or_dash, print, table};
use crate::admin::handlers::{Activate, HandlerView};

/// Flags of `weir handler list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub tenant: TenantArg,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Flags of `weir handler show`, `rollback` and `delete`.
#[derive(Debug, Args)]
pub struct NameArgs {
    /// Handler name.
    pub name: String,
    #[command(flatten)]
    pub tenant: TenantArg,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Flags of `weir handler activate`.
#[derive(Debug, Args)]
pub struct ActivateArgs {
    /// Handler name.
    pub name: String,
    /// The version to run (`weir handler show` lists them).
    #[arg(value_name = "VERSION")]
    pub number: i32,
    #[command(flatten)]
    pub tenant: TenantArg,
    #[command(flatten)]
    pub api: ApiArgs,
}

fn handler_path(tenant: &str, name: &str, rest: &str) -> String {
    tenant_path(tenant, &format!("/handlers/{}{rest}", segment(name)))
}

fn finish(output: OutputFormat, result: Result<u8, Failure>) -> u8 {
    result.unwrap_or_else(|failure| failure.report(output))
}

/// `weir handler list`.
pub fn list(args: ListArgs) -> u8 {
    let output = args.api.output;
    finish(
        output,
        Client::new(&args.api.server).and_then(|client| {
            let tenant = client.tenant(args.tenant.tenant.as_deref())?;
            let handlers: Vec<HandlerView> = client.get(&tenant_path(&tenant, "/handlers"))?;
            Ok(print(output, &handlers, |h| handlers_table(h)))
        }),
    )
}

/// `weir handler show`.
pub fn show(args: NameArgs) -> u8 {
    let output = args.api.output;
    finish(
        output,
        Client::new(&args.api.server).and_then(|client| {
            let tenant = client.tenant(args.tenant.tenant.as_deref())?;
            let view: HandlerView = client.get(&handler_path(&tenant, &args.name, ""))?;
            Ok(print(output, &view, handler_human))
        }),
    )
}

/// `weir handler activate`.
pub fn activate(args: ActivateArgs) -> u8 {
    let output = args.api.output;
    finish(
        output,
        Client::new(&args.api.server).and_then(|client| {
            let tenant = client.tenant(args.tenant.tenant.as_deref())?;
            let body = Activate {
                version: args.number,
            };
            let view: HandlerView = client.call(
                Method::POST,
                &handler_path(&tenant, &args.name, "/activate"),
                Body::Json(&body),
            )?;
            Ok(print(output, &view, |v| {
                format!(
                    "{}/{}: version {} is active; every host runs it from its next message\n",
                    v.tenant,
                    v.name,
                    or_dash(v.active_version)
                )
            }))
        }),
    )
}

/// `weir handler rollback`.
pub fn rollback(args: NameArgs) -> u8 {
    let output = args.api.output;
    finish(
        output,
        Client::new(&args.api.server).and_then(|client| {
            let tenant = client.tenant(args.tenant.tenant.as_deref())?;
            let view: HandlerView = client.call(
                Method::POST,
                &handler_path(&tenant, &args.name, "/rollback"),
                NO_BODY,
            )?;
            Ok(print(output, &view, |v| {
                format!(
                    "{}/{}: rolled back; version {} is active\n",
                    v.tenant,
                    v.name,
                    or_dash(v.active_version)
                )
            }))
        }),
    )
}

/// `weir handler delete`.
pub fn delete(args: NameArgs) -> u8 {
    let output = args.api.output;
    finish(
        output,
        Client::new(&args.api.server).and_then(|client| {
            let tenant = client.tenant(args.tenant.tenant.as_deref())?;
            client.call_empty(
                Method::DELETE,
                &handler_path(&tenant, &args.name, ""),
                NO_BODY,
            )?;
            Ok(print(
                output,
                &json!({"outcome": "deleted", "tenant": tenant, "handler": args.name}),
                |_| {
                    format!(
                        "handler {tenant}/{} and all its versions deleted\n",
                        args.name
                    )
                },
            ))
        }),
    )
}

fn handlers_table(handlers: &[HandlerView]) -> String {
    if handlers.is_empty() {
        return "no handlers\n".to_owned();
    }
    let rows: Vec<[String; 5]> = handlers
        .iter()
        .map(|h| {
            [
                h.name.clone(),
                or_dash(h.active_version),
                h.latest_version.to_string(),
                h.version_count.to_string(),
                h.total_bytes.to_string(),
            ]
        })
        .collect();
    table(["NAME", "ACTIVE", "LATEST", "VERSIONS", "BYTES"], &rows)
}

fn handler_human(h: &HandlerView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "handler   {}/{}", h.tenant, h.name);
    let _ = writeln!(out, "active    {}", or_dash(h.active_version));
    let _ = writeln!(
        out,
        "versions  {} ({} bytes in all)",
        h.version_count, h.total_bytes
    );
    let _ = writeln!(
        out,
        "created   {}",
        h.created_at.format("%Y-%m-%d %H:%M:%SZ")
    );
    if let Some(versions) = &h.versions {
        let rows: Vec<[String; 5]> = versions
            .iter()
            .map(|v| {
                [
                    v.version.to_string(),
                    if v.active { "*" } else { "" }.to_owned(),
                    v.size.to_string(),
                    v.created_at.format("%Y-%m-%d %H:%M:%SZ").to_string(),
                    v.sha256.clone(),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            ["VERSION", "ACTIVE", "BYTES", "CREATED", "SHA256"],
            &rows,
        ));
    }
    out
}
