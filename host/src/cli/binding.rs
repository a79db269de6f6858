//! `weir binding list`: the bindings stored in the configured store.
//!
//! Prints each binding's id, tenant, handler, topics and revision (as JSON: the whole stored
//! record, spec included). Presentation only; the records are the store's.

use std::fmt::Write as _;

use clap::Args;

use super::common::{ConfigFileArg, Failure, async_runtime, load_config};
use super::{OutputFormat, exit};
use crate::store::BindingRecord;

/// Flags of `weir binding list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this tenant's bindings.
    #[arg(long)]
    pub tenant: Option<String>,
    #[command(flatten)]
    config_file: ConfigFileArg,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Run the command; returns the exit code.
pub fn list(args: ListArgs) -> u8 {
    match list_bindings(&args) {
        Ok(bindings) => {
            match args.output {
                OutputFormat::Human => print!("{}", human(&bindings)),
                OutputFormat::Json => match serde_json::to_string(&bindings) {
                    Ok(text) => println!("{text}"),
                    Err(e) => return Failure::other("internal", e.to_string()).report(args.output),
                },
            }
            exit::OK
        }
        Err(failure) => failure.report(args.output),
    }
}

fn list_bindings(args: &ListArgs) -> Result<Vec<BindingRecord>, Failure> {
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
fn topics(binding: &BindingRecord) -> String {
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

fn human(bindings: &[BindingRecord]) -> String {
    if bindings.is_empty() {
        return "no bindings\n".to_owned();
    }
    let rows: Vec<[String; 5]> = bindings
        .iter()
        .map(|b| {
            [
                b.id.clone(),
                b.tenant.clone(),
                b.handler.clone(),
                topics(b),
                b.revision.to_string(),
            ]
        })
        .collect();
    let header = ["ID", "TENANT", "HANDLER", "TOPICS", "REVISION"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 5]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ");
            }
        }
        let _ = writeln!(out, "{text}");
    };
    line(header);
    for row in &rows {
        line(row.each_ref().map(String::as_str));
    }
    out
}
