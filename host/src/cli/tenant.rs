//! `weir tenant create|list|show|delete|rate-limit` and `weir token create|list|revoke`: tenants and their
//! tokens, through the admin API. A token's secret is printed once, when it is created; the API
//! never shows it again.
//!
//! Presentation only: the rules (who may do what, quotas, token hashing) are the admin API's.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::json;

use super::api::{ApiArgs, Body, Client, NO_BODY, TenantArg, segment, tenant_path};
use super::common::{Failure, or_dash, print, table};
use crate::admin::tenants::{
    CreateTenant, CreateToken, CreatedToken, RateLimitView, TenantView, TokenView,
};

/// `weir tenant …`.
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant (admin token). Exit code 8 when it exists.
    Create(CreateArgs),
    /// List every tenant with its quotas and usage (admin token).
    List(ListArgs),
    /// Show one tenant: quotas and usage (default: the token's own).
    Show(ShowArgs),
    /// Delete a tenant and its tokens (admin token); refused (8) while it has handlers or
    /// bindings.
    Delete(DeleteArgs),
    /// Set (`--per-second N --burst B`) or remove (`--off`) a tenant's rate limit (admin
    /// token). Each host enforces it over the tenant's bindings there; hosts apply it at their
    /// next reconciliation.
    RateLimit(RateLimitArgs),
}

/// Flags of `weir tenant rate-limit`.
#[derive(Debug, Args)]
pub struct RateLimitArgs {
    /// The tenant.
    pub id: String,
    /// Messages per second each host dispatches for the tenant, at most.
    #[arg(
        long,
        value_name = "N",
        required_unless_present = "off",
        conflicts_with = "off"
    )]
    pub per_second: Option<i64>,
    /// Messages dispatched at once after an idle spell (default: the rate, one second's worth).
    #[arg(long, value_name = "B", conflicts_with = "off")]
    pub burst: Option<i64>,
    /// Remove the limit.
    #[arg(long)]
    pub off: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Flags of `weir tenant create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Tenant id: 1-64 characters of a-z, 0-9, `-`, `_`.
    pub id: String,
    /// Handlers it may have (default: the server's `server.tenant_max_handlers`).
    #[arg(long, value_name = "N")]
    pub max_handlers: Option<i64>,
    /// Component bytes it may store over all versions (default: the server's
    /// `server.tenant_max_total_bytes`).
    #[arg(long, value_name = "BYTES")]
    pub max_total_bytes: Option<i64>,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Flags of `weir tenant list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Flags of `weir tenant show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The tenant (default: the token's own).
    pub id: Option<String>,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Flags of `weir tenant delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The tenant.
    pub id: String,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `weir token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token for a tenant (admin token). The secret is printed this once.
    Create(TokenCreateArgs),
    /// List a tenant's tokens, without their secrets (admin token).
    List(TokenListArgs),
    /// Revoke a token: it stops working at once (admin token).
    Revoke(TokenRevokeArgs),
}

/// Flags of `weir token create`.
#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    #[command(flatten)]
    pub tenant: TenantArg,
    /// A label for humans, e.g. `ci` or `alice`.
    #[arg(long)]
    pub label: Option<String>,
    /// Seconds until the token stops working (default: it works until revoked).
    #[arg(long, value_name = "SECONDS")]
    pub expires_in_s: Option<u64>,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Flags of `weir token list`.
#[derive(Debug, Args)]
pub struct TokenListArgs {
    #[command(flatten)]
    pub tenant: TenantArg,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Flags of `weir token revoke`.
#[derive(Debug, Args)]
pub struct TokenRevokeArgs {
    /// The token's public id (as `weir token list` shows it).
    pub id: String,
    #[command(flatten)]
    pub tenant: TenantArg,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Run a `weir tenant` command; returns the exit code.
pub fn run(command: TenantCommand) -> u8 {
    let output = match &command {
        TenantCommand::Create(a) => a.api.output,
        TenantCommand::List(a) => a.api.output,
        TenantCommand::Show(a) => a.api.output,
        TenantCommand::Delete(a) => a.api.output,
        TenantCommand::RateLimit(a) => a.api.output,
    };
    let result = match command {
        TenantCommand::Create(args) => create(args),
        TenantCommand::List(args) => Client::new(&args.api.server).and_then(|client| {
            let tenants: Vec<TenantView> = client.get("/v1/tenants")?;
            Ok(print(output, &tenants, |t| tenants_table(t)))
        }),
        TenantCommand::Show(args) => Client::new(&args.api.server).and_then(|client| {
            let tenant = client.tenant(args.id.as_deref())?;
            let view: TenantView = client.get(&tenant_path(&tenant, ""))?;
            Ok(print(output, &view, tenant_human))
        }),
        TenantCommand::Delete(args) => Client::new(&args.api.server).and_then(|client| {
            client.call_empty(Method::DELETE, &tenant_path(&args.id, ""), NO_BODY)?;
            Ok(print(
                output,
                &json!({"outcome": "deleted", "tenant": args.id}),
                |_| format!("tenant {} deleted\n", args.id),
            ))
        }),
        TenantCommand::RateLimit(args) => Client::new(&args.api.server).and_then(|client| {
            let path = tenant_path(&args.id, "/rate-limit");
            let view: TenantView = match args.per_second {
                Some(per_second) if !args.off => {
                    let body = RateLimitView {
                        messages_per_second: per_second,
                        burst: args.burst.unwrap_or(per_second),
                    };
                    client.call(Method::PUT, &path, Body::Json(&body))?
                }
                _ => client.call(Method::DELETE, &path, NO_BODY)?,
            };
            Ok(print(output, &view, tenant_human))
        }),
    };
    result.unwrap_or_else(|failure| failure.report(output))
}

fn create(args: CreateArgs) -> Result<u8, Failure> {
    let client = Client::new(&args.api.server)?;
    let body = CreateTenant {
        id: args.id,
        max_handlers: args.max_handlers,
        max_total_bytes: args.max_total_bytes,
    };
    let view: TenantView = client.call(Method::POST, "/v1/tenants", Body::Json(&body))?;
    Ok(print(args.api.output, &view, |v| {
        format!(
            "tenant {} created\n{}create a token for it: weir token create --tenant {}\n",
            v.id,
            tenant_human(v),
            v.id
        )
    }))
}

fn date(at: Option<DateTime<Utc>>) -> String {
    or_dash(at.map(|t| t.format("%Y-%m-%d %H:%M:%SZ")))
}

fn tenants_table(tenants: &[TenantView]) -> String {
    if tenants.is_empty() {
        return "no tenants\n".to_owned();
    }
    let rows: Vec<[String; 4]> = tenants
        .iter()
        .map(|t| {
            [
                t.id.clone(),
                format!("{}/{}", t.handlers, t.max_handlers),
                format!("{}/{}", t.total_bytes, t.max_total_bytes),
                date(t.created_at),
            ]
        })
        .collect();
    table(["ID", "HANDLERS", "BYTES", "CREATED"], &rows)
}

fn tenant_human(t: &TenantView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "tenant    {}", t.id);
    let _ = writeln!(out, "handlers  {} of {}", t.handlers, t.max_handlers);
    let _ = writeln!(out, "bytes     {} of {}", t.total_bytes, t.max_total_bytes);
    let _ = writeln!(out, "created   {}", date(t.created_at));
    let rate = match &t.rate_limit {
        Some(l) => format!(
            "{} messages/s per host, burst {}",
            l.messages_per_second, l.burst
        ),
        None => "none".to_owned(),
    };
    let _ = writeln!(out, "rate      {rate}");
    out
}

/// Run a `weir token` command; returns the exit code.
pub fn run_token(command: TokenCommand) -> u8 {
    let output = match &command {
        TokenCommand::Create(a) => a.api.output,
        TokenCommand::List(a) => a.api.output,
        TokenCommand::Revoke(a) => a.api.output,
    };
    let result = match command {
        TokenCommand::Create(args) => Client::new(&args.api.server).and_then(|client| {
            let tenant = client.tenant(args.tenant.tenant.as_deref())?;
            let body = CreateToken {
                label: args.label,
                expires_in_s: args.expires_in_s,
            };
            let created: CreatedToken = client.call(
                Method::POST,
                &tenant_path(&tenant, "/tokens"),
                Body::Json(&body),
            )?;
            Ok(print(output, &created, |c| {
                let mut out = String::new();
                let _ = writeln!(out, "token     {}", c.token);
                let _ = writeln!(out, "id        {}", c.record.id);
                let _ = writeln!(out, "tenant    {}", c.record.tenant);
                let _ = writeln!(out, "label     {}", or_dash(c.record.label.as_deref()));
                let _ = writeln!(out, "expires   {}", date(c.record.expires_at));
                let _ = writeln!(
                    out,
                    "the secret is shown this once: keep it now, e.g. export WEIR_TOKEN={}",
                    c.token
                );
                out
            }))
        }),
        TokenCommand::List(args) => Client::new(&args.api.server).and_then(|client| {
            let tenant = client.tenant(args.tenant.tenant.as_deref())?;
            let tokens: Vec<TokenView> = client.get(&tenant_path(&tenant, "/tokens"))?;
            Ok(print(output, &tokens, |t| tokens_table(t)))
        }),
        TokenCommand::Revoke(args) => Client::new(&args.api.server).and_then(|client| {
            let tenant = client.tenant(args.tenant.tenant.as_deref())?;
            let path = tenant_path(&tenant, &format!("/tokens/{}", segment(&args.id)));
            let revoked: TokenView = client.call(Method::DELETE, &path, NO_BODY)?;
            Ok(print(output, &revoked, |t| {
                format!("token {} of tenant {} revoked\n", t.id, t.tenant)
            }))
        }),
    };
    result.unwrap_or_else(|failure| failure.report(output))
}

fn tokens_table(tokens: &[TokenView]) -> String {
    if tokens.is_empty() {
        return "no tokens\n".to_owned();
    }
    let rows: Vec<[String; 5]> = tokens
        .iter()
        .map(|t| {
            let state = if t.revoked_at.is_some() {
                "revoked"
            } else if t.expires_at.is_some_and(|at| at <= Utc::now()) {
                "expired"
            } else {
                "valid"
            };
            [
                t.id.clone(),
                or_dash(t.label.as_deref()),
                state.to_owned(),
                date(Some(t.created_at)),
                date(t.expires_at),
            ]
        })
        .collect();
    table(["ID", "LABEL", "STATE", "CREATED", "EXPIRES"], &rows)
}
