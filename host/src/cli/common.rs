//! What the commands that read `weir.toml` and open the store share: loading the
//! configuration, the async runtime, and turning failures into messages and exit codes.
//!
//! Presentation only: the configuration's rules are [`crate::config`]'s, the store's behaviour
//! [`crate::store`]'s.

use std::path::{Path, PathBuf};

use clap::Args;
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

/// A command that did not succeed: a stable code for tools, a message for people, and the
/// exit code.
#[derive(Debug)]
pub struct Failure {
    /// Stable, kebab-case, e.g. `store-unavailable`.
    pub code: &'static str,
    /// Lower-case, naming the file, field or store.
    pub message: String,
    /// One of [`exit`]'s codes.
    pub exit: u8,
}

impl Failure {
    /// A failure with exit code [`exit::FAILURE`].
    pub fn other(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            exit: exit::FAILURE,
        }
    }

    /// Print the failure (on stderr for people, as a JSON document on stdout for tools) and
    /// return its exit code.
    pub fn report(self, output: OutputFormat) -> u8 {
        match output {
            OutputFormat::Human => eprintln!("error: {}", self.message),
            OutputFormat::Json => println!(
                "{}",
                json!({"outcome": "error", "error": {"code": self.code, "message": self.message}})
            ),
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

/// The process environment as text. Variables that are not Unicode are skipped unless they
/// start with `WEIR_`; those are passed on lossily, so that a bad one is refused rather than
/// silently ignored.
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
