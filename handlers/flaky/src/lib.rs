//! `flaky`: fails on request, for testing retries and dead-lettering.
//!
//! The JSON payload says what to do:
//!
//! * not JSON → permanent error;
//! * `"fail": "permanent"` → permanent error; `"fail": "retryable"` → retryable error, on every
//!   attempt (any other `fail` value is a permanent error, so a typo cannot pass as success);
//! * `"fail_until_attempt": N` → retryable error while the attempt is below `N`, success from
//!   attempt `N` on;
//! * `"fail_while_state": "<name>"` → retryable error while keyed state `<name>` exists under
//!   the message key: a dependency that is down until someone (a test) deletes that state;
//! * anything else → success.
//!
//! On success it increments the keyed-state counter `handled` (a JSON number) when the
//! message has a key, and emits `{"id": <message id>, "attempt": n}` with the message key to
//! the topic in setting `output-topic`, if the binding has one.

use serde_json::{Value, json};
use weir_sdk::{Error, Message, config, emit, state};

fn handle(message: Message) -> Result<(), Error> {
    let instructions: Value = message.json()?;
    let attempt = message.attempt();

    match instructions.get("fail") {
        None | Some(Value::Null) => {}
        Some(mode) if mode == "permanent" => {
            return Err(Error::permanent("flaky: asked to fail permanently"));
        }
        Some(mode) if mode == "retryable" => {
            return Err(Error::retryable(format!(
                "flaky: asked to fail, attempt {attempt}"
            )));
        }
        Some(mode) => return Err(Error::permanent(format!("flaky: unknown fail mode {mode}"))),
    }
    if let Some(name) = instructions.get("fail_while_state").and_then(Value::as_str)
        && state::get(name)?.is_some()
    {
        return Err(Error::retryable(format!(
            "flaky: dependency {name} is down, attempt {attempt}"
        )));
    }
    if let Some(until) = instructions
        .get("fail_until_attempt")
        .and_then(Value::as_u64)
        && u64::from(attempt) < until
    {
        return Err(Error::retryable(format!(
            "flaky: failing until attempt {until}, this is attempt {attempt}"
        )));
    }

    if message.key().is_some() {
        let handled = state::get_json::<u64>("handled")?
            .unwrap_or(0)
            .saturating_add(1);
        state::set_json("handled", &handled)?;
    }
    if let Some(topic) = config::get("output-topic") {
        emit::json(
            &topic,
            message.key(),
            &json!({ "id": message.id(), "attempt": attempt }),
        )?;
    }
    Ok(())
}

weir_sdk::export!(handle);
