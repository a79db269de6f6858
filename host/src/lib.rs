//! Weir's host: runs tenants' message handlers, compiled to WebAssembly components, against
//! Kafka, and owns everything hard around them (see `ARCHITECTURE.md` at the repository root).
//!
//! Modules, each owning one concern:
//! * [`runtime`] — the Wasm sandbox: loading, validating and running handler components.
//! * [`cli`] — the `weir` command line.

pub mod cli;
pub mod runtime;
