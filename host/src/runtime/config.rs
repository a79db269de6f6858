//! Sandbox limits and runtime settings: the `[runtime]` section of the configuration.
//!
//! Owns the defaults (named constants that say where they come from) and the validation that
//! refuses zero or absurd values with a message naming the field. Knows nothing of wasmtime:
//! [`super::Runtime::new`] turns a validated [`RuntimeConfig`] into an engine.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Default wall-clock deadline of one invocation: 5 s. Longer than any sane handler needs for one
/// message (Redpanda Data Transforms allow 3 s); a handler waiting on a slow dependency should
/// return a retryable error instead.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);
/// Default epoch tick: 10 ms. The deadline is enforced to within one tick, and a CPU-bound guest
/// yields to the async executor once per tick.
pub const DEFAULT_EPOCH_TICK: Duration = Duration::from_millis(10);
/// Default linear-memory cap per instance: 128 MiB. Enough for a Python handler built by
/// componentize-py (which embeds CPython); a Rust handler needs a few MiB.
pub const DEFAULT_MEMORY_BYTES: u64 = 128 * MIB;
/// Default table-element cap per table: 100 000 (CPython's function tables need tens of
/// thousands).
pub const DEFAULT_TABLE_ELEMENTS: u32 = 100_000;
/// Default cap on core instances per component: 64.
pub const DEFAULT_INSTANCES: u32 = 64;
/// Default cap on tables per component: 16.
pub const DEFAULT_TABLES: u32 = 16;
/// Default cap on linear memories per component: 8.
pub const DEFAULT_MEMORIES: u32 = 8;
/// Default WebAssembly stack: 1 MiB (wasmtime's default is 512 KiB; CPython recurses deeply).
pub const DEFAULT_STACK_BYTES: u64 = MIB;
/// Default number of instance slots in the pooling allocator: 128 instances alive at once.
pub const DEFAULT_POOL_INSTANCES: u32 = 128;
/// Default number of invocations an instance serves before it is replaced: 10 000, so that a
/// handler that leaks memory is recycled long before it reaches its cap.
pub const DEFAULT_MAX_INVOCATIONS_PER_INSTANCE: u32 = 10_000;
/// Default cap on messages emitted by one invocation: 1 000.
pub const DEFAULT_MAX_EMITS: u32 = 1_000;
/// Default cap on one emitted message (key + payload + headers): 1 MiB, Kafka's default
/// `message.max.bytes`.
pub const DEFAULT_MAX_EMIT_BYTES: u64 = MIB;
/// Default cap on all messages emitted by one invocation: 16 MiB.
pub const DEFAULT_MAX_EMIT_TOTAL_BYTES: u64 = 16 * MIB;
/// Default cap on keyed-state writes (set or delete) by one invocation: 1 000.
pub const DEFAULT_MAX_STATE_WRITES: u32 = 1_000;
/// Default cap on one keyed-state value: 256 KiB.
pub const DEFAULT_MAX_STATE_VALUE_BYTES: u64 = 256 * KIB;
/// Default cap on log lines kept from one invocation: 100 (the rest are counted, not kept).
pub const DEFAULT_MAX_LOG_LINES: u32 = 100;
/// Default cap on one log line (message and fields): 4 KiB; longer lines are truncated.
pub const DEFAULT_MAX_LOG_LINE_BYTES: u64 = 4 * KIB;

/// What to do with an instance after an invocation that did not trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum InstancePolicy {
    /// Keep the instance for the next message (the fast default). Guest globals survive between
    /// messages of the same handler version; handlers must not rely on that.
    #[default]
    Reuse,
    /// Drop the instance and start every message on a fresh one from the pool: complete
    /// isolation between messages, at the cost of an instantiation per message.
    Fresh,
}

/// Settings of the Wasm runtime. Every field has a default; see the `DEFAULT_*` constants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Reuse instances across invocations, or instantiate fresh for each one.
    pub instance_policy: InstancePolicy,
    /// Invocations an instance serves before it is replaced (with `reuse`).
    pub max_invocations_per_instance: u32,
    /// Wall-clock deadline of one invocation, in milliseconds.
    pub deadline_ms: u64,
    /// Epoch tick in milliseconds: the resolution of the deadline.
    pub epoch_tick_ms: u64,
    /// Linear-memory cap per instance, in bytes.
    pub memory_bytes: u64,
    /// Elements per table.
    pub table_elements: u32,
    /// Core instances per component.
    pub instances: u32,
    /// Tables per component.
    pub tables: u32,
    /// Linear memories per component.
    pub memories: u32,
    /// WebAssembly stack size, in bytes.
    pub stack_bytes: u64,
    /// Instance slots in the pooling allocator (instances alive at once, across all handlers).
    pub pool_instances: u32,
    /// Messages one invocation may emit.
    pub max_emits: u32,
    /// Bytes of one emitted message (key, payload and headers).
    pub max_emit_bytes: u64,
    /// Bytes of all messages one invocation emits.
    pub max_emit_total_bytes: u64,
    /// Keyed-state writes (set or delete) of one invocation.
    pub max_state_writes: u32,
    /// Bytes of one keyed-state value.
    pub max_state_value_bytes: u64,
    /// Log lines kept from one invocation.
    pub max_log_lines: u32,
    /// Bytes of one log line.
    pub max_log_line_bytes: u64,
    /// Directory for precompiled components. `None`: compile in memory only.
    pub cache_dir: Option<PathBuf>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            instance_policy: InstancePolicy::default(),
            max_invocations_per_instance: DEFAULT_MAX_INVOCATIONS_PER_INSTANCE,
            deadline_ms: DEFAULT_DEADLINE.as_millis() as u64,
            epoch_tick_ms: DEFAULT_EPOCH_TICK.as_millis() as u64,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            table_elements: DEFAULT_TABLE_ELEMENTS,
            instances: DEFAULT_INSTANCES,
            tables: DEFAULT_TABLES,
            memories: DEFAULT_MEMORIES,
            stack_bytes: DEFAULT_STACK_BYTES,
            pool_instances: DEFAULT_POOL_INSTANCES,
            max_emits: DEFAULT_MAX_EMITS,
            max_emit_bytes: DEFAULT_MAX_EMIT_BYTES,
            max_emit_total_bytes: DEFAULT_MAX_EMIT_TOTAL_BYTES,
            max_state_writes: DEFAULT_MAX_STATE_WRITES,
            max_state_value_bytes: DEFAULT_MAX_STATE_VALUE_BYTES,
            max_log_lines: DEFAULT_MAX_LOG_LINES,
            max_log_line_bytes: DEFAULT_MAX_LOG_LINE_BYTES,
            cache_dir: None,
        }
    }
}

/// A configuration value that is out of range. `field` is the configuration key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid runtime.{field}: {message}")]
pub struct ConfigError {
    /// The offending key, e.g. `deadline_ms`.
    pub field: &'static str,
    /// What is wrong and what is allowed.
    pub message: String,
}

fn check(
    field: &'static str,
    value: u64,
    min: u64,
    max: u64,
    unit: &str,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError {
            field,
            message: format!("{value} {unit} is out of range; allowed {min} to {max} {unit}"),
        });
    }
    Ok(())
}

impl RuntimeConfig {
    /// Refuse zero and absurd values, naming the field. Ranges are wide: they exist to catch
    /// typos (a deadline of 0 or of a year), not to second-guess operators.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            "max_invocations_per_instance",
            self.max_invocations_per_instance.into(),
            1,
            100_000_000,
            "invocations",
        )?;
        check("deadline_ms", self.deadline_ms, 1, 15 * 60 * 1000, "ms")?;
        check("epoch_tick_ms", self.epoch_tick_ms, 1, 1000, "ms")?;
        if self.epoch_tick_ms > self.deadline_ms {
            return Err(ConfigError {
                field: "epoch_tick_ms",
                message: format!(
                    "a tick of {} ms is longer than the deadline of {} ms; the deadline could not be kept",
                    self.epoch_tick_ms, self.deadline_ms
                ),
            });
        }
        check(
            "memory_bytes",
            self.memory_bytes,
            64 * KIB,
            4 * GIB,
            "bytes",
        )?;
        check(
            "table_elements",
            self.table_elements.into(),
            1,
            10_000_000,
            "elements",
        )?;
        check("instances", self.instances.into(), 1, 10_000, "instances")?;
        check("tables", self.tables.into(), 1, 10_000, "tables")?;
        check("memories", self.memories.into(), 1, 10_000, "memories")?;
        check("stack_bytes", self.stack_bytes, 64 * KIB, 64 * MIB, "bytes")?;
        check(
            "pool_instances",
            self.pool_instances.into(),
            1,
            100_000,
            "instances",
        )?;
        check("max_emits", self.max_emits.into(), 1, 1_000_000, "messages")?;
        check("max_emit_bytes", self.max_emit_bytes, 1, 256 * MIB, "bytes")?;
        check(
            "max_emit_total_bytes",
            self.max_emit_total_bytes,
            1,
            4 * GIB,
            "bytes",
        )?;
        if self.max_emit_total_bytes < self.max_emit_bytes {
            return Err(ConfigError {
                field: "max_emit_total_bytes",
                message: format!(
                    "{} bytes is less than max_emit_bytes ({}); one message could never be emitted whole",
                    self.max_emit_total_bytes, self.max_emit_bytes
                ),
            });
        }
        check(
            "max_state_writes",
            self.max_state_writes.into(),
            1,
            1_000_000,
            "writes",
        )?;
        check(
            "max_state_value_bytes",
            self.max_state_value_bytes,
            1,
            256 * MIB,
            "bytes",
        )?;
        check(
            "max_log_lines",
            self.max_log_lines.into(),
            0,
            1_000_000,
            "lines",
        )?;
        check(
            "max_log_line_bytes",
            self.max_log_line_bytes,
            16,
            MIB,
            "bytes",
        )?;
        Ok(())
    }

    /// The invocation deadline as a duration.
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }

    /// The epoch tick as a duration.
    pub fn epoch_tick(&self) -> Duration {
        Duration::from_millis(self.epoch_tick_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(RuntimeConfig::default().validate(), Ok(()));
    }

    #[test]
    fn zero_and_absurd_values_name_the_field() {
        type Mutation = Box<dyn Fn(&mut RuntimeConfig)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("deadline_ms", Box::new(|c| c.deadline_ms = 0)),
            (
                "deadline_ms",
                Box::new(|c| c.deadline_ms = 365 * 24 * 3600 * 1000),
            ),
            ("epoch_tick_ms", Box::new(|c| c.epoch_tick_ms = 0)),
            (
                "epoch_tick_ms",
                Box::new(|c| {
                    c.deadline_ms = 5;
                    c.epoch_tick_ms = 10;
                }),
            ),
            ("memory_bytes", Box::new(|c| c.memory_bytes = 0)),
            ("memory_bytes", Box::new(|c| c.memory_bytes = 1 << 40)),
            ("table_elements", Box::new(|c| c.table_elements = 0)),
            ("instances", Box::new(|c| c.instances = 0)),
            ("tables", Box::new(|c| c.tables = 0)),
            ("memories", Box::new(|c| c.memories = 0)),
            ("stack_bytes", Box::new(|c| c.stack_bytes = 0)),
            ("pool_instances", Box::new(|c| c.pool_instances = 0)),
            ("max_emits", Box::new(|c| c.max_emits = 0)),
            ("max_emit_bytes", Box::new(|c| c.max_emit_bytes = 0)),
            (
                "max_emit_total_bytes",
                Box::new(|c| c.max_emit_total_bytes = 10),
            ),
            ("max_state_writes", Box::new(|c| c.max_state_writes = 0)),
            (
                "max_state_value_bytes",
                Box::new(|c| c.max_state_value_bytes = 0),
            ),
            ("max_log_line_bytes", Box::new(|c| c.max_log_line_bytes = 0)),
            (
                "max_invocations_per_instance",
                Box::new(|c| c.max_invocations_per_instance = 0),
            ),
        ];
        for (field, mutate) in cases {
            let mut config = RuntimeConfig::default();
            mutate(&mut config);
            let err = config.validate().expect_err(field);
            assert_eq!(err.field, field, "{err}");
            assert!(
                err.to_string()
                    .starts_with(&format!("invalid runtime.{field}: ")),
                "{err}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<RuntimeConfig>("deadline_ms = 100\ndeadlin_ms = 5\n")
            .expect_err("unknown key accepted");
        assert!(err.to_string().contains("deadlin_ms"), "{err}");
        let ok: RuntimeConfig = toml::from_str("deadline_ms = 100\ninstance_policy = \"fresh\"\n")
            .expect("valid config");
        assert_eq!(ok.deadline_ms, 100);
        assert_eq!(ok.instance_policy, InstancePolicy::Fresh);
        assert_eq!(ok.memory_bytes, DEFAULT_MEMORY_BYTES);
    }
}
