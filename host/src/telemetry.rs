//! The host's own log: `tracing` to standard error, readable (`log.format = "human"`) or one
//! JSON object per line (`"json"`), filtered by `WEIR_LOG` when set, else by `log.level`.
//!
//! Owns the subscriber set up once per process. In the JSON format each event carries the
//! fields of the span it happened in — for everything a message causes, the per-message span
//! of the pipeline (`weir::message`: tenant, handler, binding, topic, partition, offset,
//! message id, attempt, trace and span id) — so a log collector can join a handler's log lines
//! (`weir::handler`) to their message and trace. Knows nothing of what is logged.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{LogConfig, LogFormat};

/// The filter: `WEIR_LOG` when set and valid, else `level`, else `fallback`.
pub fn filter(level: &str, fallback: &str) -> EnvFilter {
    EnvFilter::try_from_env("WEIR_LOG")
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new(fallback))
}

/// Install the process's subscriber per `log` (a second call does nothing).
pub fn init(log: &LogConfig) {
    let filter = filter(&log.level, "info");
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match log.format {
        LogFormat::Human => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
}

/// The subscriber of the commands that are not the host (the CLI): human, `warn` unless
/// `WEIR_LOG` says otherwise.
pub fn init_cli() {
    init(&LogConfig {
        format: LogFormat::Human,
        level: "warn".to_owned(),
    });
}
