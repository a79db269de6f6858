//! Structured logging, routed to the host's tracing with the tenant, handler, binding and
//! message attached. Lines beyond the host's per-invocation limit are counted and dropped.
//!
//! Log lines are not effects: they are kept even when the handler fails.

use crate::bindings::weir::handler::log::{self as wit, Field};

/// Severity of a log line.
pub use crate::bindings::weir::handler::log::Level;

/// Write one line at `level` with structured `fields` (name, value).
///
/// ```no_run
/// use weir_sdk::log::{self, Level};
/// log::write(Level::Info, "order accepted", &[("order_id", "o-1"), ("count", "3")]);
/// ```
pub fn write(level: Level, message: &str, fields: &[(&str, &str)]) {
    let fields: Vec<Field> = fields
        .iter()
        .map(|(name, value)| Field {
            name: (*name).to_owned(),
            value: (*value).to_owned(),
        })
        .collect();
    wit::write(level, message, &fields);
}

/// Write a trace line.
pub fn trace(message: &str) {
    write(Level::Trace, message, &[]);
}

/// Write a debug line.
pub fn debug(message: &str) {
    write(Level::Debug, message, &[]);
}

/// Write an info line.
pub fn info(message: &str) {
    write(Level::Info, message, &[]);
}

/// Write a warning line.
pub fn warn(message: &str) {
    write(Level::Warn, message, &[]);
}

/// Write an error line.
pub fn error(message: &str) {
    write(Level::Error, message, &[]);
}
