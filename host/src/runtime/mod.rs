//! The Wasm runtime: loads handler components and runs them in a bounded sandbox.
//!
//! Owns the wasmtime engine (pooling allocator, epoch interruption, stack limit), the linkers
//! (Weir's imports plus WASI with no ambient authority; a second one adds
//! `wasi:http/outgoing-handler` for bindings that grant outbound HTTP), validation of uploaded
//! bytes, the precompiled-component cache, instances and their reuse.
//!
//! Architecture invariant: the runtime applies nothing and knows nothing of Kafka or SQL. An
//! invocation returns its effects as data ([`Invocation`]); committing them is the pipeline's
//! job. A failed or trapped invocation returns no effects.

mod component;
mod config;
mod host;
mod instance;
mod invocation;
mod lower;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use component::{CacheStats, ComponentError, ContentHash};
pub use config::*;
pub use instance::{HandlerComponent, HandlerInstance, HandlerPool, InstantiateError};
pub use invocation::{
    BytesText, Effects, Emit, ErrorKind, Header, Invocation, InvocationContext, LogLevel,
    LogRecord, LogSource, MemoryState, Message, Outcome, OutputTopics, StateSource, StateWrite,
    TrapKind,
};

use host::HostState;

/// Bindings generated from `wit/handler.wit`.
#[allow(missing_docs)]
pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "handler",
        imports: {
            "weir:handler/state.get": async,
            default: tracing,
        },
        exports: { default: async },
        additional_derives: [PartialEq, Eq],
    });
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A setting is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// wasmtime refused the engine configuration (e.g. the pool does not fit in memory).
    #[error("cannot create the wasm engine: {0}")]
    Engine(String),
}

/// State shared by every component and instance of one runtime.
pub(crate) struct RuntimeShared {
    pub(crate) config: Arc<RuntimeConfig>,
    /// Instances alive now (idle in a pool or running), over every component.
    pub(crate) live_instances: std::sync::atomic::AtomicI64,
}

/// Loads and runs handler components. One per host process; cheap to share behind an `Arc`.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    http_linker: Linker<HostState>,
    shared: Arc<RuntimeShared>,
    cache: component::ComponentCache,
    ticker: EpochTicker,
}

impl Runtime {
    /// Validate `config` and build the engine, the linker and the epoch ticker.
    pub fn new(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        config.validate()?;
        let engine = Engine::new(&engine_config(&config))
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        bindings::Handler::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| {
            state
        })
        .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let mut http_linker = linker.clone();
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut http_linker)
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let cache = component::ComponentCache::new(&engine, config.cache_dir.as_deref());
        let ticker = EpochTicker::start(&engine, config.epoch_tick())
            .map_err(|e| RuntimeError::Engine(format!("cannot start the epoch thread: {e}")))?;
        Ok(Self {
            engine,
            linker,
            http_linker,
            shared: Arc::new(RuntimeShared {
                config: Arc::new(config),
                live_instances: std::sync::atomic::AtomicI64::new(0),
            }),
            cache,
            ticker,
        })
    }

    /// The settings the runtime runs with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.shared.config
    }

    /// Validate `bytes` as a Weir handler and compile it (or fetch it from the cache).
    ///
    /// CPU-heavy on a cache miss (milliseconds for a Rust handler, seconds for a Python one):
    /// call it from a blocking thread in async code.
    pub fn load(&self, bytes: &[u8]) -> Result<HandlerComponent, ComponentError> {
        component::check_header(bytes)?;
        let hash = ContentHash::of(bytes);
        let component = self.cache.get_or_compile(&self.engine, hash, bytes)?;
        self.check_imports(&component)?;
        // Every valid handler links against the linker with `wasi:http`; one that imports it
        // does not link without it, and runs only under a binding that grants outbound HTTP.
        let pre_http = self
            .http_linker
            .instantiate_pre(&component)
            .map_err(|e| ComponentError::WrongWorld(format!("{e:#}")))?;
        let pre_http = bindings::HandlerPre::new(pre_http)
            .map_err(|e| ComponentError::WrongWorld(format!("{e:#}")))?;
        let imports_http = imports_http(&self.engine, &component);
        let pre = if imports_http {
            None
        } else {
            let pre = self
                .linker
                .instantiate_pre(&component)
                .map_err(|e| ComponentError::WrongWorld(format!("{e:#}")))?;
            Some(
                bindings::HandlerPre::new(pre)
                    .map_err(|e| ComponentError::WrongWorld(format!("{e:#}")))?,
            )
        };
        Ok(HandlerComponent {
            shared: self.shared.clone(),
            pre,
            pre_http,
            hash,
            size: bytes.len(),
        })
    }

    /// Handler instances alive now, idle or running, over every component (each holds one
    /// of the pooling allocator's `pool_instances` slots).
    pub fn live_instances(&self) -> i64 {
        self.shared.live_instances.load(Ordering::Relaxed)
    }

    /// Counters of the precompiled-component cache.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Refuse imports outside the contract and WASI with a list of the culprits, before the
    /// linker's less specific error.
    fn check_imports(
        &self,
        component: &wasmtime::component::Component,
    ) -> Result<(), ComponentError> {
        let ty = component.component_type();
        let unknown: Vec<String> = ty
            .imports(&self.engine)
            // Type imports (the world's `use` of `message`, `handler-error`) need no provider.
            .filter(|(_, item)| !matches!(item.ty, ComponentItem::Type(_)))
            .map(|(name, _)| name)
            .filter(|name| !(name.starts_with("weir:handler/") || name.starts_with("wasi:")))
            .map(|name| format!("`{name}`"))
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(ComponentError::UnknownImports {
                imports: unknown.join(", "),
            })
        }
    }

    /// How often the epoch advances.
    pub fn epoch_tick(&self) -> std::time::Duration {
        self.ticker.tick
    }
}

/// Whether `component` imports any `wasi:http` interface.
fn imports_http(engine: &Engine, component: &wasmtime::component::Component) -> bool {
    component
        .component_type()
        .imports(engine)
        .any(|(name, _)| name.starts_with("wasi:http/"))
}

fn engine_config(config: &RuntimeConfig) -> Config {
    let mut pool = PoolingAllocationConfig::new();
    let instances = config.pool_instances;
    pool.total_component_instances(instances)
        .total_core_instances(instances.saturating_mul(4))
        .total_memories(instances.saturating_mul(2))
        .total_tables(instances.saturating_mul(4))
        .total_stacks(instances)
        .max_core_instances_per_component(config.instances)
        .max_memories_per_component(config.memories)
        .max_tables_per_component(config.tables)
        .max_memories_per_module(config.memories)
        .max_tables_per_module(config.tables)
        .table_elements(config.table_elements as usize)
        .max_memory_size(config.memory_bytes as usize)
        .max_component_instance_size(4 << 20)
        .max_core_instance_size(4 << 20)
        // Keep a little of each recycled slot resident so reuse avoids page faults.
        .linear_memory_keep_resident(64 << 10)
        .table_keep_resident(16 << 10);
    let mut engine = Config::new();
    engine
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .epoch_interruption(true)
        .max_wasm_stack(config.stack_bytes as usize)
        // Host calls run on the fiber stack too: give them room above the guest's stack.
        .async_stack_size(config.stack_bytes as usize + (1 << 20))
        .wasm_backtrace_details(wasmtime::WasmBacktraceDetails::Enable);
    engine
}

/// Advances the engine's epoch every tick from a plain thread, until the runtime is dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    tick: std::time::Duration,
}

impl EpochTicker {
    fn start(engine: &Engine, tick: std::time::Duration) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let weak = engine.weak();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("weir-epoch".to_owned())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
            tick,
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
