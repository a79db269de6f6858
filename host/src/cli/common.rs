//! What the commands share: loading the configuration, the async runtime, turning failures
//! into messages and exit codes, and printing results (one JSON document, or a table).
//!
//! Presentation only: the configuration's rules are [`crate::config`]'s, the store's behaviour
//! [`crate::store`]'s, the admin API's [`crate::admin`]'s.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;
use serde_json::json;

use super::{OutputFormat, exit};
use crate::config::{DEFAULT_CONFIG_FILE, StoreConfig, WeirConfig};
use crate::store::StoreError;

/// The flag naming the configuration file, shared by the commands that read it.
#[derive(Debug, Clone, Args)]
pub struct ConfigFileArg {
    /// The host's configuration file (default: `weir.toml` in the working directory, if it
    /// exists). `WEIR_<SECTION>__<KEY>` environment variables override it, e.g.
    /// `WEIR_STORE__URL`.
    #[arg(long = "config-file", value_name = "PATH")]
    pub config_file: Option<PathBuf>,
}

/// A command that did not succeed: a stable code for tools, a message for people, the field to
/// blame when there is one, and the exit code.
#[derive(Debug)]
pub struct Failure {
    /// Stable, kebab-case, e.g. `store-unavailable`, or the admin API's own code.
    pub code: Cow<'static, str>,
    /// Lower-case, naming the file, field, store or server.
    pub message: String,
    /// The offending field, when the admin API named one (dotted for nested ones).
    pub field: Option<String>,
    /// One of [`exit`]'s codes.
    pub exit: u8,
}

impl Failure {
    /// A failure with `code`, `message` and exit code `exit`.
    pub fn new(code: impl Into<Cow<'static, str>>, message: impl Into<String>, exit: u8) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            field: None,
            exit,
        }
    }

    /// A failure with exit code [`exit::FAILURE`].
    pub fn other(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(code, message, exit::FAILURE)
    }

    /// A usage mistake the command line could not catch (exit code [`exit::USAGE`]).
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new("usage", message, exit::USAGE)
    }

    /// Print the failure (on stderr for people, as a JSON document on stdout for tools) and
    /// return its exit code.
    pub fn report(self, output: OutputFormat) -> u8 {
        match output {
            OutputFormat::Human => eprintln!("error: {}", self.message),
            OutputFormat::Json => {
                let mut error = json!({"code": self.code, "message": self.message});
                if let Some(field) = &self.field {
                    error["field"] = json!(field);
                }
                println!("{}", json!({"outcome": "error", "error": error}));
            }
        }
        self.exit
    }

    /// A store operation that failed: unreachable (retry later) or refused. The URL is shown
    /// without its password.
    pub fn store(config: &StoreConfig, doing: &str, error: StoreError) -> Self {
        let url = config.redacted_url();
        if error.is_unavailable() {
            Self::other(
                "store-unavailable",
                format!("store unreachable at {url}: {error}"),
            )
        } else {
            let code = match error {
                StoreError::Conflict(_) => "conflict",
                StoreError::Migrate(_) => "migration-failed",
                _ => "store-error",
            };
            Self::other(code, format!("{doing} the store at {url} failed: {error}"))
        }
    }
}

/// The configuration: `explicit` if given (it must exist), else `weir.toml` in the working
/// directory if it exists, else the defaults; then the `WEIR_*` environment overrides.
pub fn load_config(explicit: Option<&Path>) -> Result<WeirConfig, Failure> {
    let implicit = Path::new(DEFAULT_CONFIG_FILE);
    let path = explicit.or_else(|| implicit.is_file().then_some(implicit));
    WeirConfig::load(path, environment())
        .map_err(|e| Failure::other("invalid-configuration", e.to_string()))
}

/// The process environment as text (the command line's own variables, `WEIR_SERVER` and
/// `WEIR_TOKEN`, are among the configuration's reserved names). Variables that are not Unicode are skipped unless they start with `WEIR_`; those are passed
/// on lossily, so that a bad one is refused rather than silently ignored.
fn environment() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(name, value)| {
            let name = name.into_string().ok()?;
            match value.into_string() {
                Ok(value) => Some((name, value)),
                Err(value) if name.starts_with(crate::config::ENV_PREFIX) => {
                    Some((name, value.to_string_lossy().into_owned()))
                }
                Err(_) => None,
            }
        })
        .collect()
}

/// A single-threaded async runtime for a command's store calls.
pub fn async_runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::other("internal", format!("cannot start the async runtime: {e}")))
}

/// `NAME=VALUE` with a non-empty name.
pub fn parse_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("expected NAME=VALUE, got `{text}`")),
    }
}

/// Print `value`: as one JSON document, or as `human` renders it. Returns the exit code.
pub fn print<T: Serialize>(
    output: OutputFormat,
    value: &T,
    human: impl FnOnce(&T) -> String,
) -> u8 {
    match output {
        OutputFormat::Human => {
            print!("{}", human(value));
            exit::OK
        }
        OutputFormat::Json => match serde_json::to_string(value) {
            Ok(text) => {
                println!("{text}");
                exit::OK
            }
            Err(e) => Failure::other("internal", e.to_string()).report(output),
        },
    }
}

/// A table: the header, then one line per row, columns padded to their widest cell (the last
/// one is not padded).
pub fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; N]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ");
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(header);
    for row in rows {
        line(row.each_ref().map(String::as_str));
    }
    out
}

/// `-` for an absent value.
pub fn or_dash<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}
