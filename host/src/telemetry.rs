//! The host's own log: `tracing` to standard error, readable (`log.format = "human"`) or one
//! JSON object per line (`"json"`), filtered by `WEIR_LOG` when set, else by `log.level`.
//!
//! Owns the subscriber set up once per process. In the JSON format each event carries the
//! fields of the span it happened in — for everything a message causes, the per-message span
//! of the pipeline (`weir::message`: tenant, handler, binding, topic, partition, offset,
//! message id, attempt, trace and span id) — so a log collector can join a handler's log lines
//! (`weir::handler`) to their message and trace. Knows nothing of what is logged.
//!
//! With the cargo feature `otlp` and `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, Weir's spans are also exported over OTLP/HTTP
//! (protobuf), in batches from a thread of their own; [`link`] makes a message's span continue
//! the trace its record carried, and the `traceparent` Weir writes on the records the message
//! emits then names that exported span. Without the feature [`link`] changes nothing.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{LogConfig, LogFormat};
use crate::pipeline::trace::TraceContext;

/// The filter: `WEIR_LOG` when set and valid, else `level`, else `fallback`.
pub fn filter(level: &str, fallback: &str) -> EnvFilter {
    EnvFilter::try_from_env("WEIR_LOG")
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new(fallback))
}

/// Install the process's subscriber per `log` (a second call does nothing).
pub fn init(log: &LogConfig) {
    let filter = filter(&log.level, "info");
    #[cfg(feature = "otlp")]
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(otlp::from_env());
    #[cfg(not(feature = "otlp"))]
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match log.format {
        LogFormat::Human => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
}

/// The subscriber of the commands that are not the host (the CLI): human, `warn` unless
/// `WEIR_LOG` says otherwise.
pub fn init_cli() {
    init(&LogConfig {
        format: LogFormat::Human,
        level: "warn".to_owned(),
    });
}

/// Make `span` (a message's, just created) continue `trace`: with OTLP export on, its parent
/// becomes the span the record's `traceparent` named, and the answer carries the ids the
/// exported span has (so the records the message emits name it). Otherwise `trace` unchanged.
pub fn link(span: &tracing::Span, trace: TraceContext) -> TraceContext {
    #[cfg(feature = "otlp")]
    {
        otlp::link(span, trace)
    }
    #[cfg(not(feature = "otlp"))]
    {
        let _ = span;
        trace
    }
}

/// Whether spans are exported over OTLP (feature `otlp`, an endpoint configured).
pub fn exporting() -> bool {
    #[cfg(feature = "otlp")]
    {
        otlp::exporting()
    }
    #[cfg(not(feature = "otlp"))]
    {
        false
    }
}

/// Flush the spans not yet exported (at the end of `weir serve`).
pub fn shutdown() {
    #[cfg(feature = "otlp")]
    otlp::shutdown();
}

#[cfg(feature = "otlp")]
pub mod otlp {
    //! OTLP/HTTP export of Weir's spans (feature `otlp`).

    use std::sync::OnceLock;

    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        TracerProvider as _,
    };
    use opentelemetry_otlp::WithExportConfig as _;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing::Subscriber;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    use tracing_subscriber::Layer;
    use tracing_subscriber::registry::LookupSpan;

    use crate::pipeline::trace::TraceContext;

    static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

    /// The export layer, if `OTEL_EXPORTER_OTLP_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (a failure to build the exporter is printed
    /// and export stays off).
    pub fn from_env<S>() -> Option<impl Layer<S>>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let configured = [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
        if !configured {
            return None;
        }
        match layer(None) {
            Ok(layer) => Some(layer),
            Err(e) => {
                eprintln!("weir: OTLP export is off: {e}");
                None
            }
        }
    }

    /// The export layer sending to `endpoint` (the collector's base URL, e.g.
    /// `http://127.0.0.1:4318`), or to the environment's endpoint when `None`. Installs the
    /// process's tracer provider (the first one built wins).
    pub fn layer<S>(endpoint: Option<&str>) -> Result<impl Layer<S>, String>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
        if let Some(endpoint) = endpoint {
            builder =
                builder.with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')));
        }
        let exporter = builder.build().map_err(|e| e.to_string())?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name("weir").build())
            .build();
        let tracer = provider.tracer("weir");
        let _ = PROVIDER.set(provider);
        Ok(tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.target().starts_with("weir")
            })))
    }

    /// See [`super::exporting`].
    pub fn exporting() -> bool {
        PROVIDER.get().is_some()
    }

    /// See [`super::link`].
    pub fn link(span: &tracing::Span, trace: TraceContext) -> TraceContext {
        if PROVIDER.get().is_none() || span.is_disabled() {
            return trace;
        }
        if let Some(parent) = trace.parent_id {
            let remote = SpanContext::new(
                TraceId::from_bytes(trace.trace_id),
                SpanId::from_bytes(parent),
                TraceFlags::new(trace.flags),
                true,
                TraceState::default(),
            );
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
        }
        let context = span.context();
        let exported = context.span().span_context().clone();
        if !exported.is_valid() {
            return trace;
        }
        TraceContext {
            trace_id: exported.trace_id().to_bytes(),
            span_id: exported.span_id().to_bytes(),
            parent_id: trace.parent_id,
            flags: trace.flags,
        }
    }

    /// Export what is buffered and stop the exporter.
    pub fn shutdown() {
        if let Some(provider) = PROVIDER.get() {
            let _ = provider.force_flush();
            let _ = provider.shutdown();
        }
    }

    /// Export what is buffered now.
    pub fn flush() {
        if let Some(provider) = PROVIDER.get() {
            let _ = provider.force_flush();
        }
    }
}

#[cfg(all(test, feature = "otlp"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;
    use crate::runtime::{Header, Message};

    /// A collector stand-in: keeps the bodies POSTed to `/v1/traces`.
    fn collector() -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = bodies.clone();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                listener.set_nonblocking(true).unwrap();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let app = axum::Router::new().route(
                    "/v1/traces",
                    axum::routing::post(move |body: axum::body::Bytes| {
                        let kept = kept.clone();
                        async move {
                            kept.lock().unwrap().push(body.to_vec());
                            ""
                        }
                    }),
                );
                axum::serve(listener, app).await.unwrap();
            });
        });
        (url, bodies)
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn a_message_span_is_exported_in_the_trace_its_record_carried() {
        let (url, bodies) = collector();
        let subscriber = tracing_subscriber::registry().with(otlp::layer(Some(&url)).unwrap());
        let message = Message {
            id: "orders/0/7".to_owned(),
            topic: "orders".to_owned(),
            partition: 0,
            offset: 7,
            key: None,
            payload: Vec::new(),
            headers: vec![Header {
                key: "traceparent".to_owned(),
                value: b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_vec(),
            }],
            timestamp_ms: None,
            tenant: "acme".to_owned(),
            attempt: 1,
        };
        let incoming = TraceContext::for_message("acme.orders", &message);
        let linked = tracing::subscriber::with_default(subscriber, || {
            let span =
                tracing::info_span!(target: "weir::message", "message", binding = "acme.orders");
            let linked = link(&span, incoming);
            span.in_scope(|| tracing::info!(target: "weir::handler", "order accepted"));
            linked
        });
        // The same trace, a span of its own, the record's span as its parent.
        assert_eq!(linked.trace_id, incoming.trace_id);
        assert_ne!(linked.span_id, incoming.parent_id.unwrap());
        otlp::flush();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let bodies = bodies.lock().unwrap().clone();
            let all: Vec<u8> = bodies.concat();
            if contains(&all, &linked.span_id) {
                assert!(contains(&all, &incoming.trace_id), "trace id not exported");
                assert!(
                    contains(&all, &incoming.parent_id.unwrap()),
                    "parent span id not exported"
                );
                assert!(contains(&all, b"order accepted"), "the event is missing");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no span exported: {} bodies",
                bodies.len()
            );
            std::thread::sleep(Duration::from_millis(100));
            otlp::flush();
        }
    }
}
