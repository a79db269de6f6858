//! Turning uploaded bytes into a runnable handler: validation and the precompiled cache.
//!
//! Owns the checks that refuse what is not a Weir handler (with an error that says what is
//! wrong) and the cache of compiled components, keyed on the engine's compatibility hash and
//! the component's SHA-256. Knows nothing of where the bytes came from or where they are stored.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// SHA-256 of a component's bytes: its identity everywhere in Weir.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    /// Hash `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Lower-case hex, as stored and shown.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Display for ContentHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

/// Why bytes were refused as a Weir handler. Each case says what is wrong and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    /// Zero bytes.
    #[error("the file is empty; expected a WebAssembly component built for wasm32-wasip2")]
    Empty,
    /// Not WebAssembly at all.
    #[error(
        "not WebAssembly: the file starts with {prefix}, not the `\\0asm` magic; expected a component built with `cargo build --target wasm32-wasip2`"
    )]
    NotWasm {
        /// The first bytes, in hex.
        prefix: String,
    },
    /// A core module rather than a component.
    #[error(
        "a core WebAssembly module, not a component; build for the wasm32-wasip2 target (or wrap the module with `wasm-tools component new`)"
    )]
    CoreModule,
    /// WebAssembly of a kind or version wasmtime does not accept.
    #[error("not a valid WebAssembly component: {0}")]
    Invalid(String),
    /// The component imports something Weir does not provide.
    #[error(
        "the component imports {imports}, which Weir does not provide; a handler may import weir:handler/{{emit,state,log,config}}@0.1 and WASI 0.2 interfaces"
    )]
    UnknownImports {
        /// The offending import names, comma-separated and quoted.
        imports: String,
    },
    /// The component does not export `handle` with the contract's signature.
    #[error("the component does not implement the weir:handler@0.1.0 `handler` world: {0}")]
    WrongWorld(String),
}

impl ComponentError {
    /// A stable, machine-readable code for the error (used by the CLI's JSON output and the
    /// admin API).
    pub fn code(&self) -> &'static str {
        match self {
            ComponentError::Empty => "empty",
            ComponentError::NotWasm { .. } => "not-wasm",
            ComponentError::CoreModule => "core-module",
            ComponentError::Invalid(_) => "invalid-component",
            ComponentError::UnknownImports { .. } => "unknown-imports",
            ComponentError::WrongWorld(_) => "wrong-world",
        }
    }
}

/// The cheap checks, before any compilation: empty, not wasm, core module.
pub(crate) fn check_header(bytes: &[u8]) -> Result<(), ComponentError> {
    if bytes.is_empty() {
        return Err(ComponentError::Empty);
    }
    if !bytes.starts_with(b"\0asm") {
        let prefix = bytes
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ");
        return Err(ComponentError::NotWasm { prefix });
    }
    if wasmparser::Parser::is_core_wasm(bytes) {
        return Err(ComponentError::CoreModule);
    }
    if !wasmparser::Parser::is_component(bytes) {
        return Err(ComponentError::Invalid(
            "unknown WebAssembly binary version or layer; expected a component (layer 1)"
                .to_owned(),
        ));
    }
    Ok(())
}

/// Counters of the compile cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Served from memory.
    pub memory_hits: u64,
    /// Served from a precompiled file on disk.
    pub disk_hits: u64,
    /// Compiled from the bytes.
    pub compiled: u64,
}

/// Compiled components by content hash, in memory and optionally on disk.
pub(crate) struct ComponentCache {
    dir: Option<PathBuf>,
    memory: Mutex<HashMap<ContentHash, Component>>,
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    compiled: AtomicU64,
}

impl ComponentCache {
    /// A cache under `root/<engine compatibility hash>/` (files from an incompatible engine are
    /// never even looked at).
    pub(crate) fn new(engine: &Engine, root: Option<&Path>) -> Self {
        let dir = root.map(|root| {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut hasher);
            root.join(format!("engine-{:016x}", hasher.finish()))
        });
        Self {
            dir,
            memory: Mutex::new(HashMap::new()),
            memory_hits: AtomicU64::new(0),
            disk_hits: AtomicU64::new(0),
            compiled: AtomicU64::new(0),
        }
    }

    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            memory_hits: self.memory_hits.load(Ordering::Relaxed),
            disk_hits: self.disk_hits.load(Ordering::Relaxed),
            compiled: self.compiled.load(Ordering::Relaxed),
        }
    }

    /// The compiled form of `bytes` (whose hash is `hash`), from memory, disk, or compiled now.
    pub(crate) fn get_or_compile(
        &self,
        engine: &Engine,
        hash: ContentHash,
        bytes: &[u8],
    ) -> Result<Component, ComponentError> {
        if let Some(component) = self
            .memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&hash)
        {
            self.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(component.clone());
        }
        let component = match self.load_from_disk(engine, hash) {
            Some(component) => {
                self.disk_hits.fetch_add(1, Ordering::Relaxed);
                component
            }
            None => {
                let component = self.compile(engine, hash, bytes)?;
                self.compiled.fetch_add(1, Ordering::Relaxed);
                component
            }
        };
        self.memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(hash, component.clone());
        Ok(component)
    }

    fn path(&self, hash: ContentHash) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|dir| dir.join(format!("{}.cwasm", hash.to_hex())))
    }

    fn load_from_disk(&self, engine: &Engine, hash: ContentHash) -> Option<Component> {
        let path = self.path(hash)?;
        if !path.exists() {
            return None;
        }
        // SAFETY: files in the cache directory are written only by `compile` below, from
        // `Engine::precompile_component` of an engine with the same compatibility hash (the
        // directory name). wasmtime still checks the header and refuses a mismatching file.
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize_file(engine, &path) };
        match loaded {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "discarding unusable precompiled component");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    fn compile(
        &self,
        engine: &Engine,
        hash: ContentHash,
        bytes: &[u8],
    ) -> Result<Component, ComponentError> {
        let Some(path) = self.path(hash) else {
            return Component::new(engine, bytes)
                .map_err(|e| ComponentError::Invalid(format!("{e:#}")));
        };
        let serialized = engine
            .precompile_component(bytes)
            .map_err(|e| ComponentError::Invalid(format!("{e:#}")))?;
        if let Err(e) = write_atomically(&path, &serialized) {
            // The cache is an optimisation: a read-only or full disk must not refuse a handler.
            tracing::warn!(path = %path.display(), error = %e, "could not write precompiled component");
        }
        // SAFETY: `serialized` was produced just above by this engine's `precompile_component`.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(engine, &serialized) };
        component.map_err(|e| ComponentError::Invalid(format!("{e:#}")))
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("component"),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checks_tell_the_cases_apart() {
        assert!(matches!(check_header(b""), Err(ComponentError::Empty)));
        assert!(matches!(
            check_header(b"PK\x03\x04zip"),
            Err(ComponentError::NotWasm { .. })
        ));
        // The smallest valid core module: magic and version 1.
        assert!(matches!(
            check_header(b"\0asm\x01\0\0\0"),
            Err(ComponentError::CoreModule)
        ));
        assert!(matches!(check_header(b"\0asm\x0d\0\x01\0"), Ok(())));
        assert!(matches!(
            check_header(b"\0asm\x07\0\0\0"),
            Err(ComponentError::Invalid(_))
        ));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let err = check_header(b"hello world").expect_err("refused");
        assert_eq!(err.code(), "not-wasm");
        assert!(err.to_string().contains("68 65 6c 6c 6f 20 77 6f"), "{err}");
        assert!(
            check_header(b"\0asm\x01\0\0\0")
                .expect_err("refused")
                .to_string()
                .contains("core WebAssembly module")
        );
    }

    #[test]
    fn content_hash_is_sha256() {
        assert_eq!(
            ContentHash::of(b"").to_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
