//! Invocation cost: the same logic run natively, on a reused instance, and on a fresh pooled
//! instance, for payloads of 0 B, 1 KiB and 64 KiB. Prints a table with the overhead per
//! invocation and the ratios, side by side from one run.
//!
//! Run: `cargo build --release --target wasm32-wasip2 -p weir-fixture-checksum` then
//! `cargo bench -p weir --bench invoke`. `WEIR_BENCH_QUICK=1` runs a smoke-sized version.
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use weir::runtime::{InvocationContext, Message, Outcome, Runtime, RuntimeConfig};

/// Byte-for-byte the fixture's function (handlers/fixtures/checksum).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn native_handle(message: &Message) -> Result<(), String> {
    if fnv1a(&message.payload) == 0 || message.payload.first() == Some(&b'!') {
        return Err("refused".to_owned());
    }
    Ok(())
}

fn component_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("wasm32-wasip2/release/weir_fixture_checksum.wasm")
}

fn message(size: usize) -> Message {
    Message {
        id: "bench/0/0".to_owned(),
        topic: "bench".to_owned(),
        partition: 0,
        offset: 0,
        key: Some(b"key-1".to_vec()),
        payload: (0..size).map(|i| (i % 251) as u8 + 1).collect(),
        headers: Vec::new(),
        timestamp_ms: Some(0),
        tenant: "bench".to_owned(),
        attempt: 1,
    }
}

/// Median time per iteration over `rounds` rounds of `iters` iterations.
fn measure(rounds: usize, iters: usize, mut round: impl FnMut(usize) -> Duration) -> Duration {
    let mut samples: Vec<Duration> = (0..rounds).map(|_| round(iters) / iters as u32).collect();
    samples.sort();
    samples[samples.len() / 2]
}

fn ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

fn main() {
    let quick = std::env::var_os("WEIR_BENCH_QUICK").is_some();
    let (rounds, iters, fresh_iters) = if quick {
        (3, 200, 50)
    } else {
        (15, 20_000, 2_000)
    };
    let path = component_path();
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!("{}: {e}; build it with `cargo build --release --target wasm32-wasip2 -p weir-fixture-checksum`", path.display())
    });
    let runtime = Runtime::new(RuntimeConfig {
        pool_instances: 16,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let component = runtime.load(&bytes).unwrap();
    let context = InvocationContext::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    println!(
        "invocation cost per message, median of {rounds} rounds (fixture: checksum, {} bytes)",
        bytes.len()
    );
    println!(
        "{:>9} | {:>10} | {:>12} | {:>12} | {:>17} | {:>16}",
        "payload", "native ns", "reused ns", "fresh ns", "reused overhead", "fresh / reused"
    );
    for size in [0usize, 1024, 64 * 1024] {
        let msg = message(size);
        let native = measure(rounds, iters, |n| {
            let start = Instant::now();
            for _ in 0..n {
                black_box(native_handle(black_box(&msg))).unwrap();
            }
            start.elapsed()
        });
        let reused = rt.block_on(async {
            let mut instance = component.instantiate().await.unwrap();
            let mut samples = Vec::new();
            for _ in 0..rounds {
                let start = Instant::now();
                for _ in 0..iters {
                    let inv = instance.invoke(black_box(&msg), &context).await;
                    assert_eq!(inv.outcome, Outcome::Ok);
                }
                samples.push(start.elapsed() / iters as u32);
            }
            samples.sort();
            samples[samples.len() / 2]
        });
        let fresh = rt.block_on(async {
            let mut samples = Vec::new();
            for _ in 0..rounds {
                let start = Instant::now();
                for _ in 0..fresh_iters {
                    let mut instance = component.instantiate().await.unwrap();
                    let inv = instance.invoke(black_box(&msg), &context).await;
                    assert_eq!(inv.outcome, Outcome::Ok);
                }
                samples.push(start.elapsed() / fresh_iters as u32);
            }
            samples.sort();
            samples[samples.len() / 2]
        });
        println!(
            "{:>7} B | {:>10.0} | {:>12.0} | {:>12.0} | {:>14.0} ns | {:>15.1}x",
            size,
            ns(native),
            ns(reused),
            ns(fresh),
            ns(reused) - ns(native),
            ns(fresh) / ns(reused)
        );
    }
}
