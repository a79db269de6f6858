//! Trace context through `weir serve`, against the real broker and PostgreSQL: a record that
//! arrives with a W3C `traceparent` leaves, through the handler's emit and the outbox relay, as a
//! record whose `traceparent` continues the same trace with the processing span as its parent;
//! a record without one starts a trace of its own. With `log.format = "json"` the handler's log
//! lines come out as JSON objects carrying the message's span: tenant, handler, binding, topic,
//! partition, offset, message id and the trace id.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod serve_support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use serve_support::Scenario;
use weir_acceptance::{services, unique_name};

const TRACED: usize = 5;
const UNTRACED: usize = 5;

fn traceparent(i: usize) -> (String, String) {
    let trace = format!(
        "{:032x}",
        0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128 + i as u128
    );
    (trace.clone(), format!("00-{trace}-00f067aa0ba902b7-01"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_continues_from_input_to_output_and_logs_carry_the_message_span() {
    let mut run = Scenario::deployed("trace", 1).await;
    run.set_env("WEIR_LOG__FORMAT", "json");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &services().kafka)
        .create()
        .unwrap();
    // Input offsets 0..TRACED carry a traceparent, the rest none.
    let mut expected_trace: HashMap<String, String> = HashMap::new();
    for i in 0..TRACED + UNTRACED {
        let customer = format!("c-{i}");
        let payload =
            format!(r#"{{"order_id":"o-{i}","customer":"{customer}","amount_cents":100}}"#);
        let mut record = FutureRecord::to(&run.input)
            .key(&customer)
            .payload(&payload);
        if i < TRACED {
            let (trace, header) = traceparent(i);
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: "traceparent",
                value: Some(&header),
            }));
            expected_trace.insert(format!("{}/0/{i}", run.input), trace);
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    run.messages = TRACED + UNTRACED;

    let mut host = run.start(1);
    run.wait_for(
        TRACED + UNTRACED,
        &mut [&mut host.0],
        Duration::from_secs(120),
    )
    .await;

    // The output records, read back from Kafka: their traceparent by causing message.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &services().kafka)
        .set("group.id", unique_name("trace_reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&run.output]).unwrap();
    let mut out: HashMap<String, String> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < TRACED + UNTRACED {
        assert!(
            Instant::now() < deadline,
            "only {} outputs: {out:?}",
            out.len()
        );
        let Ok(Ok(record)) = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await
        else {
            continue;
        };
        let headers = record.headers().unwrap();
        let header = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8(v.to_vec()).unwrap())
        };
        let cause = header("causation-id").unwrap();
        let parent = header("traceparent").unwrap_or_else(|| panic!("no traceparent on {cause}"));
        out.insert(cause, parent);
    }
    let mut new_traces = Vec::new();
    for (cause, parent) in &out {
        let parts: Vec<&str> = parent.split('-').collect();
        assert_eq!(parts.len(), 4, "{parent}");
        assert_eq!((parts[0], parts[3]), ("00", "01"), "{parent}");
        assert_eq!((parts[1].len(), parts[2].len()), (32, 16), "{parent}");
        assert_ne!(
            parts[2], "00f067aa0ba902b7",
            "the parent span was copied, not continued"
        );
        match expected_trace.get(cause) {
            Some(trace) => assert_eq!(parts[1], trace, "{cause}: trace not continued"),
            None => new_traces.push(parts[1].to_owned()),
        }
    }
    new_traces.sort();
    new_traces.dedup();
    assert_eq!(
        new_traces.len(),
        UNTRACED,
        "each untraced message starts its own trace"
    );
    println!("outputs: {out:?}");

    run.terminate(&mut host.0);
    // The handler's log lines, as JSON, carry the message span.
    let log = std::fs::read_to_string(run.log(1)).unwrap();
    let mut spans = 0;
    for line in log.lines() {
        let Ok(event) = serde_json::from_str::<Value>(line) else {
            panic!("a log line is not JSON: {line}");
        };
        if event["target"] != "weir::handler" {
            continue;
        }
        let span = &event["span"];
        assert_eq!(span["name"], "message", "{line}");
        assert_eq!(span["binding"], run.binding_id.as_str(), "{line}");
        assert_eq!(span["tenant"], run.tenant.as_str(), "{line}");
        assert_eq!(span["topic"], run.input.as_str(), "{line}");
        assert_eq!(event["message"], "order accepted", "{line}");
        let id = span["message_id"].as_str().unwrap();
        assert_eq!(id, format!("{}/0/{}", run.input, span["offset"]), "{line}");
        if let Some(trace) = expected_trace.get(id) {
            assert_eq!(span["trace_id"], trace.as_str(), "{line}");
        }
        spans += 1;
    }
    assert_eq!(
        spans,
        TRACED + UNTRACED,
        "handler log lines with a span:\n{log}"
    );
}
