//! Weir's host: runs tenants' message handlers, compiled to WebAssembly components, against
//! Kafka, and owns everything hard around them (see `ARCHITECTURE.md` at the repository root).
//!
//! Modules, each owning one concern:
//! * [`runtime`] — the Wasm sandbox: loading, validating and running handler components.
//! * [`pipeline`] — what happens to a message: the pure core (offset tracking, key-ordered
//!   dispatch, retry decisions), the binding's policy, and the worker that runs one binding.
//! * [`store`] — persistence: handlers, bindings, processed keys, keyed state, outbox and DLQ,
//!   on PostgreSQL or SQLite.
//! * [`kafka`] — Weir's side of librdkafka: client settings, record conversion, and the outbox
//!   relay that publishes emitted messages.
//! * [`config`] — the whole configuration, `weir.toml` and its `WEIR_*` environment overrides.
//! * [`serve`] — the long-running host: reconciles bindings from the store and runs a worker per
//!   binding, the outbox relay and the health endpoints.
//! * [`cli`] — the `weir` command line.

pub mod admin;
pub mod cli;
pub mod config;
pub mod kafka;
pub mod metrics;
pub mod outbound;
pub mod pipeline;
pub mod runtime;
pub mod serve;
pub mod store;
pub mod telemetry;
