//! The binding's configuration: string settings chosen by whoever deployed the handler (for
//! example `output-topic`). Read-only.

use crate::Error;
use crate::bindings::weir::handler::config;

/// The value of setting `name`, if the binding has it.
pub fn get(name: &str) -> Option<String> {
    config::get(name)
}

/// The value of setting `name`; a permanent error naming the setting if the binding lacks it.
pub fn require(name: &str) -> Result<String, Error> {
    get(name).ok_or_else(|| Error::permanent(format!("missing required config setting `{name}`")))
}

/// Every setting of the binding as (name, value), sorted by name.
pub fn all() -> Vec<(String, String)> {
    config::all()
}
