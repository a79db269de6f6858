//! `weir produce <topic>` and `weir message status <id>`: publish messages through the admin
//! API's ingest endpoint (written to the outbox and answered at once; the relay publishes) and
//! follow one until it is sent.
//!
//! Presentation only: which topics a tenant may publish to and how messages reach Kafka are the
//! API's and the relay's business.

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::PathBuf;

use base64::Engine as _;
use clap::{ArgGroup, Args};
use reqwest::Method;

use super::api::{ApiArgs, Body, Client, query, segment};
use super::common::{Failure, or_dash, parse_pair, print, table};
use crate::admin::ingest::{
    Accepted, IngestAnswer, IngestBatch, IngestMessage, MAX_BATCH, MessageStatus,
};

/// Messages sent in one request with `--lines`: half the API's batch limit.
const LINES_PER_REQUEST: usize = MAX_BATCH / 2;
/// Payload bytes sent in one request with `--lines`: 2 MiB, half the API's JSON body limit
/// (`admin::error::MAX_JSON_BYTES`), leaving room for the JSON around them.
const BYTES_PER_REQUEST: usize = 2 * 1024 * 1024;

/// Flags of `weir produce`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("payload").required(true).args(["value", "value_file", "lines"])))]
pub struct ProduceArgs {
    /// The topic (one a binding of the tenant consumes or emits to).
    pub topic: String,
    /// The record key (UTF-8).
    #[arg(long)]
    pub key: Option<String>,
    /// The payload, a JSON document (published as its compact text).
    #[arg(long, value_name = "JSON")]
    pub value: Option<String>,
    /// The payload: the bytes of this file, as they are.
    #[arg(long, value_name = "FILE")]
    pub value_file: Option<PathBuf>,
    /// One message per line of standard input, each a JSON document (empty lines skipped);
    /// `--key` and `--header` apply to every one.
    #[arg(long, conflicts_with = "message_id")]
    pub lines: bool,
    /// A record header, `name=value` (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_pair)]
    pub headers: Vec<(String, String)>,
    /// A stable id for the message (its `message-id` header): sending the same id twice
    /// publishes once. Default: a new random id.
    #[arg(long, value_name = "ID")]
    pub message_id: Option<String>,
    /// The tenant the messages are filed under (only with the admin token; a tenant token
    /// always publishes as its own tenant).
    #[arg(long)]
    pub tenant: Option<String>,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Flags of `weir message status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The message id (as `weir produce` printed it).
    pub id: String,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Run `weir produce`; returns the exit code.
pub fn produce(args: ProduceArgs) -> u8 {
    let output = args.api.output;
    execute(&args)
        .map(|answer| print(output, &answer, |a| answer_human(&a.messages)))
        .unwrap_or_else(|failure| failure.report(output))
}

/// A message with `payload` and the flags' key and headers.
fn message(args: &ProduceArgs, payload: Payload) -> IngestMessage {
    let (value, value_base64) = match payload {
        // `null` as `value` would read as "no value": send its bytes instead.
        Payload::Json(serde_json::Value::Null) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(b"null")),
        ),
        Payload::Json(value) => (Some(value), None),
        Payload::Bytes(bytes) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    };
    IngestMessage {
        key: args.key.clone(),
        value,
        value_base64,
        headers: args.headers.iter().cloned().collect::<BTreeMap<_, _>>(),
        message_id: args.message_id.clone(),
    }
}

enum Payload {
    Json(serde_json::Value),
    Bytes(Vec<u8>),
}

fn execute(args: &ProduceArgs) -> Result<IngestAnswer, Failure> {
    // Read and check the input before connecting: a typo is a usage error whatever the server.
    let single = if let Some(value) = &args.value {
        let json = serde_json::from_str(value).map_err(|e| {
            Failure::usage(format!(
                "--value is not a JSON document ({e}); quote a string as '\"text\"', or send \
                 raw bytes with --value-file"
            ))
        })?;
        Some(Payload::Json(json))
    } else if let Some(file) = &args.value_file {
        let bytes = std::fs::read(file).map_err(|e| {
            Failure::other(
                "unreadable-file",
                format!("cannot read {}: {e}", file.display()),
            )
        })?;
        Some(Payload::Bytes(bytes))
    } else {
        None
    };
    let client = Client::new(&args.api.server)?;
    let path = format!(
        "/v1/topics/{}/messages{}",
        segment(&args.topic),
        query(&[("tenant", args.tenant.clone())])
    );
    let send = |messages: Vec<IngestMessage>| -> Result<IngestAnswer, Failure> {
        client.call(Method::POST, &path, Body::Json(&IngestBatch { messages }))
    };
    if let Some(payload) = single {
        return send(vec![message(args, payload)]);
    }
    // --lines: batches as they fill, so a large input streams.
    let mut accepted: Vec<Accepted> = Vec::new();
    let mut batch: Vec<IngestMessage> = Vec::new();
    let mut batch_bytes = 0;
    let stdin = std::io::stdin();
    let flush = |batch: &mut Vec<IngestMessage>, accepted: &mut Vec<Accepted>| {
        if batch.is_empty() {
            return Ok(());
        }
        let answer = send(std::mem::take(batch)).map_err(|mut failure| {
            failure.message = format!(
                "{} ({} earlier messages were accepted)",
                failure.message,
                accepted.len()
            );
            failure
        })?;
        accepted.extend(answer.messages);
        Ok::<_, Failure>(())
    };
    for (index, line) in stdin.lock().lines().enumerate() {
        let line = line.map_err(|e| {
            Failure::other(
                "unreadable-input",
                format!("cannot read standard input: {e}"),
            )
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(&line).map_err(|e| {
            Failure::usage(format!(
                "line {} of standard input is not a JSON document ({e}); {} earlier messages \
                 were accepted",
                index + 1,
                accepted.len()
            ))
        })?;
        if batch.len() >= LINES_PER_REQUEST || batch_bytes + line.len() > BYTES_PER_REQUEST {
            flush(&mut batch, &mut accepted)?;
            batch_bytes = 0;
        }
        batch_bytes += line.len();
        batch.push(message(args, Payload::Json(value)));
    }
    flush(&mut batch, &mut accepted)?;
    if accepted.is_empty() {
        return Err(Failure::usage(
            "standard input held no message (one JSON document per line)",
        ));
    }
    Ok(IngestAnswer { messages: accepted })
}

fn answer_human(messages: &[Accepted]) -> String {
    let rows: Vec<[String; 3]> = messages
        .iter()
        .map(|m| {
            [
                m.id.clone(),
                m.state.clone(),
                if m.duplicate { "yes" } else { "no" }.to_owned(),
            ]
        })
        .collect();
    table(["MESSAGE ID", "STATE", "DUPLICATE"], &rows)
}

/// Run `weir message status`; returns the exit code.
pub fn status(args: StatusArgs) -> u8 {
    let output = args.api.output;
    Client::new(&args.api.server)
        .and_then(|client| {
            let status: MessageStatus =
                client.get(&format!("/v1/messages/{}", segment(&args.id)))?;
            Ok(print(output, &status, |s| {
                let mut out = format!("message   {}\n", s.id);
                out.push_str(&format!("topic     {}\n", s.topic));
                out.push_str(&format!("state     {}\n", s.state));
                out.push_str(&format!(
                    "accepted  {}\n",
                    s.created_at.format("%Y-%m-%d %H:%M:%SZ")
                ));
                out.push_str(&format!(
                    "sent      {}\n",
                    or_dash(s.sent_at.map(|t| t.format("%Y-%m-%d %H:%M:%SZ")))
                ));
                if s.attempts > 0 || s.last_error.is_some() {
                    out.push_str(&format!(
                        "failures  {} (last: {})\n",
                        s.attempts,
                        or_dash(s.last_error.as_deref())
                    ));
                }
                out
            }))
        })
        .unwrap_or_else(|failure| failure.report(output))
}
