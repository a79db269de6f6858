//! The **seed** phase: the baseline algorithm Weir replaces, written plainly.
//!
//! For each message, in the order librdkafka delivers them: `BEGIN`; insert the processed key
//! (`binding_id`, `message_id`) into `seed_processed_keys` with `ON CONFLICT DO NOTHING`;
//! `COMMIT`; then commit the message's offset synchronously
//! (`consumer.commit_message(&m, CommitMode::Sync)`). One thread, one connection, one consumer
//! in a fresh group: two round trips to PostgreSQL and one to the broker per message, nothing
//! overlapped. Slow by design, so it runs over a prefix of the topic (`--seed-messages`).
//!
//! Owns nothing else; the table lives in the run's schema (`database.rs`), and message ids are
//! Weir's (`topic/partition/offset`), so both write the same rows.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::message::Message as _;
use sqlx::{Connection as _, PgConnection};
use weir_acceptance::unique_name;

use crate::cpu::Mark;
use crate::kafka::{self, STALL_TIMEOUT};
use crate::report::PhaseFigures;

/// The binding id the baseline records its processed keys under.
const SEED_BINDING: &str = "seed";

/// Handle the first `messages` messages of `topic` one transaction and one synchronous offset
/// commit at a time, storing processed keys through `store_url`.
pub async fn run(
    bootstrap: &str,
    topic: &str,
    store_url: &str,
    messages: u64,
) -> anyhow::Result<PhaseFigures> {
    let connection = PgConnection::connect(store_url)
        .await
        .context("seed: cannot connect to PostgreSQL")?;
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        seed_blocking(&runtime, connection, &bootstrap, &topic, messages)
    })
    .await
    .context("the baseline's thread failed")?
}

fn seed_blocking(
    runtime: &tokio::runtime::Handle,
    mut connection: PgConnection,
    bootstrap: &str,
    topic: &str,
    messages: u64,
) -> anyhow::Result<PhaseFigures> {
    let consumer = kafka::consumer(bootstrap, &unique_name("weir_bench_seed"))?;
    consumer
        .subscribe(&[topic])
        .with_context(|| format!("seed: cannot subscribe to {topic}"))?;
    let start = Mark::now();
    let mut first: Option<Mark> = None;
    let mut done: u64 = 0;
    let mut last_progress = start.at;
    let mut last_error = None;
    while done < messages {
        let message = match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => message,
            Some(Err(error)) => {
                last_error = Some(error.to_string());
                continue;
            }
            None => {
                if last_progress.elapsed() > STALL_TIMEOUT {
                    bail!(
                        "seed: no message for {STALL_TIMEOUT:?} after {done} of {messages} \
                         (last consumer error: {})",
                        last_error.as_deref().unwrap_or("none")
                    );
                }
                continue;
            }
        };
        first.get_or_insert_with(Mark::now);
        let message_id = weir::pipeline::worker::message_id(
            message.topic(),
            message.partition(),
            message.offset(),
            &[],
        );
        runtime
            .block_on(async {
                let mut tx = connection.begin().await?;
                sqlx::query(
                    "INSERT INTO seed_processed_keys (binding_id, message_id) VALUES ($1, $2) \
                     ON CONFLICT DO NOTHING",
                )
                .bind(SEED_BINDING)
                .bind(&message_id)
                .execute(&mut *tx)
                .await?;
                tx.commit().await
            })
            .with_context(|| format!("seed: cannot commit the processed key of {message_id}"))?;
        consumer
            .commit_message(&message, CommitMode::Sync)
            .with_context(|| format!("seed: cannot commit the offset of {message_id}"))?;
        done += 1;
        last_progress = Instant::now();
    }
    let end = Mark::now();
    let _ = runtime.block_on(connection.close());
    Ok(PhaseFigures::drained(
        messages,
        start.at,
        first.unwrap_or(start),
        end,
    ))
}
