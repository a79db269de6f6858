//! Write Weir message handlers in Rust.
//!
//! A Weir handler is a WebAssembly component that Weir calls once for each Kafka message of a
//! binding. This crate is everything a handler needs: [`Message`] to read the message, [`Error`]
//! to say whether a failure is worth retrying, and the effects the handler may have —
//! [`emit`] messages, read and write keyed [`state`], [`log`] lines and read its binding's
//! [`config`]. Effects are buffered by the host and committed exactly once, atomically with
//! the message's offset, and only if the handler returns `Ok`: a handler that fails or panics
//! leaves no trace but its log lines. Handlers whose binding grants it may also call services
//! over [`http`]; such calls happen when they are made, not exactly once (see there).
//!
//! # A complete handler
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "my-handler"
//! version = "0.1.0"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! weir-sdk = "0.1"
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! `src/lib.rs`:
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use weir_sdk::{Error, Message, config, emit, log, state};
//!
//! #[derive(Deserialize)]
//! struct Signup {
//!     email: String,
//! }
//!
//! #[derive(Serialize)]
//! struct Welcome<'a> {
//!     email: &'a str,
//!     signups_for_key: u64,
//! }
//!
//! fn handle(message: Message) -> Result<(), Error> {
//!     // Malformed payloads can never succeed: `json` reports them as permanent errors.
//!     let signup: Signup = message.json()?;
//!     let output = config::require("output-topic")?;
//!
//!     // Keyed state belongs to the message key; the message must have one.
//!     let count = state::get_json::<u64>("signups")?.unwrap_or(0) + 1;
//!     state::set_json("signups", &count)?;
//!
//!     let welcome = Welcome { email: &signup.email, signups_for_key: count };
//!     emit::json(&output, message.key(), &welcome)?;
//!     log::write(log::Level::Info, "welcomed", &[("email", &signup.email)]);
//!     Ok(())
//! }
//!
//! weir_sdk::export!(handle);
//! ```
//!
//! Build the component and try it against a message, without Kafka:
//!
//! ```sh
//! cargo build --release --target wasm32-wasip2
//! weir handler test target/wasm32-wasip2/release/my_handler.wasm \
//!     --payload '{"email": "ada@example.com"}' --key k --config output-topic=out
//! ```
//!
//! # Errors
//!
//! Return [`Error::retryable`] for transient failures (the message is retried with the
//! binding's backoff, then dead-lettered) and [`Error::permanent`] for messages that can never
//! succeed (dead-lettered at once). The SDK's own failures are already classified: malformed
//! payloads, missing settings and refused effects are permanent, an unavailable state store is
//! retryable. A panic traps the component and counts as permanent; the SDK logs its message
//! (at error level, with its source location) before the trap.

mod error;
mod message;

pub mod config;
pub mod emit;
pub mod http;
pub mod log;
pub mod state;

pub use error::Error;
pub use message::{Header, Message};

/// Bindings generated from `wit/handler.wit`. Not part of the API: use the modules above.
#[doc(hidden)]
#[allow(unsafe_code, missing_docs, clippy::all, clippy::pedantic)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "handler",
        pub_export_macro: true,
        default_bindings_module: "weir_sdk::bindings",
    });
}

/// Export `fn(Message) -> Result<(), Error>` as the component's `handle` function.
///
/// Call it once, at the top level of the handler crate (a `cdylib`). The unsafe glue it
/// expands to lives in this crate, so the handler crate may `#![forbid(unsafe_code)]`.
///
/// ```no_run
/// fn handle(message: weir_sdk::Message) -> Result<(), weir_sdk::Error> {
///     weir_sdk::log::info(message.id());
///     Ok(())
/// }
///
/// weir_sdk::export!(handle);
/// ```
#[macro_export]
macro_rules! export {
    ($handler:expr) => {
        const _: () = {
            struct WeirHandler;

            impl $crate::bindings::Guest for WeirHandler {
                fn handle(
                    message: $crate::bindings::Message,
                ) -> ::core::result::Result<(), $crate::bindings::HandlerError> {
                    $crate::__private::invoke($handler, message)
                }
            }

    $crate::bindings::export!(WeirHandler with_types_in $crate::bindings);
        };
    };
}

/// Support for [`export!`]. Not part of the API.
#[doc(hidden)]
pub mod __private {
    use std::panic::PanicHookInfo;
    use std::sync::Once;

    use crate::{Error, Message, bindings, log};

    /// Call `handler` with the host's message and translate its answer for the host.
    pub fn invoke(
        handler: impl FnOnce(Message) -> Result<(), Error>,
        message: bindings::Message,
    ) -> Result<(), bindings::HandlerError> {
        static PANIC_HOOK: Once = Once::new();
        PANIC_HOOK.call_once(|| std::panic::set_hook(Box::new(log_panic)));
        handler(Message::from(message)).map_err(bindings::HandlerError::from)
    }

    /// Report a panic through the host's log before the trap that follows it. The default
    /// hook would write to stderr (which the host may not provide) and read `RUST_BACKTRACE`
    /// from an environment the host may not provide either.
    fn log_panic(info: &PanicHookInfo<'_>) {
        let what = info.payload_as_str().unwrap_or("a non-string payload");
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        log::write(
            log::Level::Error,
            &format!("handler panicked: {what}"),
            &[("location", &location)],
        );
    }
}
