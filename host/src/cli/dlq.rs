//! `weir dlq list|show|replay|discard`: a tenant's DLQ entries through the admin API — listed
//! with filters a page at a time, shown whole, replayed or discarded one by one or in bulk
//! (`--all`: the bulk endpoint is called page after page until it says it is done, with the
//! progress on stderr).
//!
//! Presentation only: what a replay does (queued for the entry's own binding, same message id)
//! is the API's and the pipeline's business.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand, ValueEnum};
use reqwest::Method;
use serde::Serialize;

use super::api::{ApiArgs, Body, Client, NO_BODY, TenantArg, query, tenant_path};
use super::common::{Failure, or_dash, print, table};
use crate::admin::dlq::{BulkBody, BulkProgress, DiscardBody, DlqEntryView, DlqPage, DlqQuery};

/// Longest error message shown in a list row.
const ERROR_CHARS: usize = 60;

/// `weir dlq …`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List DLQ entries, newest last, a page at a time (filters narrow; `--after` pages).
    List(ListArgs),
    /// Show one entry with its whole payload and headers.
    Show(ShowArgs),
    /// Replay one entry (`weir dlq replay <id>`), or every pending entry matching the filters
    /// (`weir dlq replay --all [filters]`): queued for its own binding, which runs it again
    /// with the same message id. Exit code 8 when the entry is not pending.
    Replay(ReplayArgs),
    /// Discard one entry (`weir dlq discard <id> --note …`), or every pending entry matching
    /// the filters (`--all`): recorded with the note, never deleted.
    Discard(DiscardArgs),
}

/// `--error-kind` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ErrorKindArg {
    /// Failed with a retryable error on every attempt.
    Retryable,
    /// The handler said it will never succeed.
    Permanent,
    /// The handler trapped or hit a sandbox limit.
    Trap,
}

/// `--state` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    /// Waiting for a decision.
    Pending,
    /// Queued for replay.
    Replaying,
    /// Replayed.
    Replayed,
    /// Discarded.
    Discarded,
}

fn value_name<T: ValueEnum>(value: T) -> Option<String> {
    value.to_possible_value().map(|v| v.get_name().to_owned())
}

/// Which entries: every filter narrows.
#[derive(Debug, Clone, Default, Args)]
pub struct FilterArgs {
    /// Only this binding's entries.
    #[arg(long, value_name = "ID")]
    pub binding: Option<String>,
    /// Only this handler's entries.
    #[arg(long, value_name = "NAME")]
    pub handler: Option<String>,
    /// Only entries that failed this way.
    #[arg(long, value_enum)]
    pub error_kind: Option<ErrorKindArg>,
    /// Only entries whose last failure is at or after this time (RFC 3339, e.g.
    /// `2025-01-31T12:00:00Z`).
    #[arg(long, value_name = "TIME")]
    pub since: Option<DateTime<Utc>>,
    /// Only entries whose last failure is before this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub until: Option<DateTime<Utc>>,
}

impl FilterArgs {
    fn is_empty(&self) -> bool {
        self.binding.is_none()
            && self.handler.is_none()
            && self.error_kind.is_none()
            && self.since.is_none()
            && self.until.is_none()
    }

    fn query(&self, after: Option<i64>) -> DlqQuery {
        DlqQuery {
            binding: self.binding.clone(),
            handler: self.handler.clone(),
            error_kind: self.error_kind.and_then(value_name),
            since: self.since,
            until: self.until,
            state: None,
            after,
            limit: None,
        }
    }
}

/// Flags of `weir dlq list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Only entries in this state (default: every state).
    #[arg(long, value_enum)]
    pub state: Option<StateArg>,
    /// Only entries with a larger id: the `next_after` of the previous page.
    #[arg(long, value_name = "ID")]
    pub after: Option<i64>,
    /// Page size (default and most: the server's page limit).
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    #[command(flatten)]
    pub tenant: TenantArg,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Flags of `weir dlq show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Entry id.
    pub id: i64,
    #[command(flatten)]
    pub tenant: TenantArg,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Flags of `weir dlq replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Entry id (or `--all`).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub id: Option<i64>,
    /// Every pending entry matching the filters.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub tenant: TenantArg,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Flags of `weir dlq discard`.
#[derive(Debug, Args)]
pub struct DiscardArgs {
    /// Entry id (or `--all`).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub id: Option<i64>,
    /// Every pending entry matching the filters.
    #[arg(long)]
    pub all: bool,
    /// Why: recorded with every entry discarded.
    #[arg(long, required = true)]
    pub note: String,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub tenant: TenantArg,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// What a bulk replay or discard did, over every page.
#[derive(Debug, Serialize)]
struct BulkDone {
    outcome: &'static str,
    matched: usize,
    done: usize,
    skipped: usize,
    pages: usize,
}

/// Run a `weir dlq` command; returns the exit code.
pub fn run(command: DlqCommand) -> u8 {
    let output = match &command {
        DlqCommand::List(a) => a.api.output,
        DlqCommand::Show(a) => a.api.output,
        DlqCommand::Replay(a) => a.api.output,
        DlqCommand::Discard(a) => a.api.output,
    };
    let result = match command {
        DlqCommand::List(args) => list(&args),
        DlqCommand::Show(args) => Client::new(&args.api.server).and_then(|client| {
            let tenant = client.tenant(args.tenant.tenant.as_deref())?;
            let entry: DlqEntryView =
                client.get(&tenant_path(&tenant, &format!("/dlq/{}", args.id)))?;
            Ok(print(output, &entry, entry_human))
        }),
        DlqCommand::Replay(args) => resolve(
            Verb::Replay,
            args.id,
            args.all,
            &args.filter,
            None,
            &args.tenant,
            &args.api,
        ),
        DlqCommand::Discard(args) => resolve(
            Verb::Discard,
            args.id,
            args.all,
            &args.filter,
            Some(args.note.clone()),
            &args.tenant,
            &args.api,
        ),
    };
    result.unwrap_or_else(|failure| failure.report(output))
}

fn list(args: &ListArgs) -> Result<u8, Failure> {
    let client = Client::new(&args.api.server)?;
    let tenant = client.tenant(args.tenant.tenant.as_deref())?;
    let q = args.filter.query(args.after);
    let path = tenant_path(
        &tenant,
        &format!(
            "/dlq{}",
            query(&[
                ("binding", q.binding),
                ("handler", q.handler),
                ("error_kind", q.error_kind),
                ("since", q.since.map(|t| t.to_rfc3339())),
                ("until", q.until.map(|t| t.to_rfc3339())),
                ("state", args.state.and_then(value_name)),
                ("after", q.after.map(|a| a.to_string())),
                ("limit", args.limit.map(|l| l.to_string())),
            ])
        ),
    );
    let page: DlqPage = client.get(&path)?;
    Ok(print(args.api.output, &page, page_human))
}

#[derive(Clone, Copy)]
enum Verb {
    Replay,
    Discard,
}

impl Verb {
    fn path(self) -> &'static str {
        match self {
            Verb::Replay => "replay",
            Verb::Discard => "discard",
        }
    }

    fn done(self) -> &'static str {
        match self {
            Verb::Replay => "replayed",
            Verb::Discard => "discarded",
        }
    }
}

fn resolve(
    verb: Verb,
    id: Option<i64>,
    all: bool,
    filter: &FilterArgs,
    note: Option<String>,
    tenant: &TenantArg,
    api: &ApiArgs,
) -> Result<u8, Failure> {
    if !all && !filter.is_empty() {
        return Err(Failure::usage(format!(
            "filters select entries for --all; to {} one entry, give only its id",
            verb.path()
        )));
    }
    let client = Client::new(&api.server)?;
    let tenant = client.tenant(tenant.tenant.as_deref())?;
    if let (Some(id), false) = (id, all) {
        let path = tenant_path(&tenant, &format!("/dlq/{id}/{}", verb.path()));
        let entry: DlqEntryView = match verb {
            Verb::Replay => client.call(Method::POST, &path, NO_BODY)?,
            Verb::Discard => client.call(Method::POST, &path, Body::Json(&DiscardBody { note }))?,
        };
        return Ok(print(api.output, &entry, |e| match verb {
            Verb::Replay => format!(
                "entry {} queued for replay on binding {} (state {})\n",
                e.id, e.binding_id, e.state
            ),
            Verb::Discard => format!(
                "entry {} discarded (note: {})\n",
                e.id,
                or_dash(e.resolution_note.as_deref())
            ),
        }));
    }
    let path = tenant_path(&tenant, &format!("/dlq/{}", verb.path()));
    let mut total = BulkDone {
        outcome: verb.done(),
        matched: 0,
        done: 0,
        skipped: 0,
        pages: 0,
    };
    let mut after: Option<i64> = None;
    loop {
        let body = BulkBody {
            filter: filter.query(after),
            note: note.clone(),
        };
        let progress: BulkProgress = client
            .call(Method::POST, &path, Body::Json(&body))
            .map_err(|mut failure| {
                if total.pages > 0 {
                    let _ = write!(
                        failure.message,
                        " (after {} {} entries, {} skipped)",
                        verb.done(),
                        total.done,
                        total.skipped
                    );
                }
                failure
            })?;
        total.pages += 1;
        total.matched += progress.matched;
        total.done += progress.done;
        total.skipped += progress.skipped;
        eprintln!(
            "{} {} of {} matched so far (skipped {})",
            verb.done(),
            total.done,
            total.matched,
            total.skipped
        );
        match progress.next_after {
            // The cursor only moves forward; a server that answered otherwise would loop.
            Some(next) if after.is_none_or(|a| next > a) => after = Some(next),
            Some(next) => {
                return Err(Failure::other(
                    "bad-response",
                    format!(
                        "the server at {} returned the page cursor {next} twice; stopped after \
                         {} {} entries",
                        client.server(),
                        verb.done(),
                        total.done
                    ),
                ));
            }
            None => break,
        }
    }
    Ok(print(api.output, &total, |t| {
        if t.matched == 0 {
            "no pending entries match\n".to_owned()
        } else {
            format!(
                "{} {} {} ({} skipped: resolved by someone else meanwhile)\n",
                t.outcome,
                t.done,
                if t.done == 1 { "entry" } else { "entries" },
                t.skipped
            )
        }
    }))
}

fn short(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() > ERROR_CHARS || line.len() < text.len() {
        let cut: String = line.chars().take(ERROR_CHARS).collect();
        format!("{cut}…")
    } else {
        line.to_owned()
    }
}

fn page_human(page: &DlqPage) -> String {
    if page.entries.is_empty() {
        return "no entries\n".to_owned();
    }
    let rows: Vec<[String; 7]> = page
        .entries
        .iter()
        .map(|e| {
            [
                e.id.to_string(),
                e.binding_id.clone(),
                e.error_kind.clone(),
                e.state.clone(),
                e.attempts.to_string(),
                e.last_failure_at.format("%Y-%m-%d %H:%M:%SZ").to_string(),
                short(&e.error_message),
            ]
        })
        .collect();
    let mut out = table(
        [
            "ID",
            "BINDING",
            "KIND",
            "STATE",
            "ATTEMPTS",
            "LAST FAILURE",
            "ERROR",
        ],
        &rows,
    );
    if let Some(after) = page.next_after {
        let _ = writeln!(out, "more entries: add --after {after}");
    }
    out
}

fn entry_human(e: &DlqEntryView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "entry     {} ({})", e.id, e.state);
    let _ = writeln!(
        out,
        "binding   {} ({}/{} version {})",
        e.binding_id,
        e.tenant,
        e.handler,
        or_dash(e.handler_version)
    );
    let _ = writeln!(out, "record    {}/{}/{}", e.topic, e.partition, e.offset);
    let _ = writeln!(out, "message   {}", e.message_id);
    let key = e.key.as_ref().map(|k| {
        k.text
            .clone()
            .unwrap_or_else(|| format!("base64:{}", k.base64))
    });
    let _ = writeln!(out, "key       {}", or_dash(key));
    let _ = writeln!(out, "error     {}: {}", e.error_kind, e.error_message);
    let _ = writeln!(
        out,
        "attempts  {} (first failure {}, last {})",
        e.attempts,
        e.first_failure_at.format("%Y-%m-%d %H:%M:%SZ"),
        e.last_failure_at.format("%Y-%m-%d %H:%M:%SZ")
    );
    if let Some(at) = e.resolved_at {
        let _ = writeln!(
            out,
            "resolved  {}{}",
            at.format("%Y-%m-%d %H:%M:%SZ"),
            e.resolution_note
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
    }
    if let Some(headers) = &e.headers {
        for header in headers {
            let value = header
                .value
                .text
                .clone()
                .unwrap_or_else(|| format!("base64:{}", header.value.base64));
            let _ = writeln!(out, "header    {}: {value}", header.key);
        }
    }
    let payload = match &e.payload {
        Some(p) => p
            .text
            .clone()
            .unwrap_or_else(|| format!("base64:{}", p.base64)),
        None => e.payload_preview.clone(),
    };
    let _ = writeln!(out, "payload   {} bytes", e.payload_size);
    let _ = writeln!(out, "{payload}");
    out
}
