//! `weir dev`: the whole host on a laptop with nothing installed — librdkafka's in-process mock
//! cluster for Kafka, SQLite under a local folder for the store — with the example `orders`
//! handler deployed, and with `--demo`, sample traffic and a running summary.
//!
//! The admin API is served too, on the same address: with an admin token (generated at each
//! start unless `WEIR_SERVER__ADMIN_TOKEN` sets one) and a token of the tenant that owns the
//! example handler, both printed, so that `weir dlq list`, `weir produce`, `weir handler deploy`
//! work against it with nothing installed.
//!
//! The mock cluster is for development and fault-injection tests only; acceptance tests use a
//! real broker. Everything else is the production code path: [`crate::serve::serve`] runs the
//! bindings, the relay, the admin API and the health endpoints.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use clap::Args;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use super::common::Failure;
use super::{OutputFormat, exit};
use crate::admin::auth::{new_token, token_hash};
use crate::config::{Secret, WeirConfig};
use crate::pipeline::BindingSpec;
use crate::store::{NewTenant, NewToken, Store, StoreError};

/// The tenant that owns the example handler; the token printed at start-up acts for it.
const TENANT: &str = "dev";
const HANDLER: &str = "orders";
const INPUT: &str = "orders";
const OUTPUT: &str = "orders.accepted";
const DLQ: &str = "orders.dlq";
/// The variable that chooses the admin token (the same override `weir serve` reads).
const ADMIN_TOKEN_ENV: &str = "WEIR_SERVER__ADMIN_TOKEN";

/// Flags of `weir dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Address of `/health` and the admin API (loopback by default).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Folder for the SQLite store.
    #[arg(long, default_value = ".weir")]
    data_dir: PathBuf,
    /// The handler component to deploy (default: the example `orders` handler as built by
    /// `cargo build --release --target wasm32-wasip2 -p weir-handler-orders`).
    #[arg(long)]
    component: Option<PathBuf>,
    /// Produce sample orders (one in 25 malformed) and print a running summary.
    #[arg(long)]
    demo: bool,
    /// Demo orders per second.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    rate: u32,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long = "for", value_name = "SECONDS")]
    run_for: Option<u64>,
}

fn default_component() -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    target.join("wasm32-wasip2/release/weir_handler_orders.wasm")
}

/// Run the command; returns the exit code.
pub fn run(args: DevArgs) -> u8 {
    match execute(args) {
        Ok(()) => exit::OK,
        Err(failure) => failure.report(OutputFormat::Human),
    }
}

fn execute(args: DevArgs) -> Result<(), Failure> {
    let component = args.component.clone().unwrap_or_else(default_component);
    let bytes = std::fs::read(&component).map_err(|e| {
        Failure::other(
            "missing-component",
            format!(
                "cannot read {}: {e}; build the example handler first: cargo build --release --target wasm32-wasip2 -p weir-handler-orders",
                component.display()
            ),
        )
    })?;
    std::fs::create_dir_all(&args.data_dir).map_err(|e| {
        Failure::other(
            "data-dir",
            format!("cannot create {}: {e}", args.data_dir.display()),
        )
    })?;

    // The in-process Kafka starts empty every time, so offsets (and the message ids derived from
    // them) start over: a store kept from an earlier run would take every new message for a
    // duplicate. Each run starts with a fresh store.
    for suffix in ["", "-wal", "-shm"] {
        let path = args.data_dir.join(format!("weir.db{suffix}"));
        if path.exists() {
            std::fs::remove_file(&path).map_err(|e| {
                Failure::other("data-dir", format!("cannot remove {}: {e}", path.display()))
            })?;
        }
    }

    // The mock cluster lives on this thread for the whole run (it is not Send).
    let mock = MockCluster::new(1).map_err(|e| {
        Failure::other(
            "mock-cluster",
            format!("cannot start the mock Kafka cluster: {e}"),
        )
    })?;
    for (topic, partitions) in [(INPUT, 6), (OUTPUT, 3), (DLQ, 1)] {
        mock.create_topic(topic, partitions, 1).map_err(|e| {
            Failure::other("mock-cluster", format!("cannot create topic {topic}: {e}"))
        })?;
    }
    let bootstrap = mock.bootstrap_servers();

    let mut config = WeirConfig::default();
    config.store.url = format!("sqlite://{}/weir.db", args.data_dir.display());
    config.kafka.bootstrap_servers.clone_from(&bootstrap);
    config.server.listen = args.listen;
    config.pipeline.reconcile_every_ms = 500;
    // Everything runs on this machine: handlers may call services on it.
    config.pipeline.http_allow_private_networks = true;
    let (admin_token, admin_from_env) = admin_token()?;
    config.server.admin_token = Some(Secret::new(admin_token.clone()));
    config
        .validate()
        .map_err(|e| Failure::other("invalid-configuration", e.to_string()))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::other("internal", format!("cannot start the async runtime: {e}")))?;
    let result = runtime.block_on(async move {
        let store = config
            .store
            .connect()
            .await
            .map_err(|e| Failure::other("store", format!("cannot open {}: {e}", config.store.url)))?;
        let version = store
            .put_handler_version(TENANT, HANDLER, &bytes, &crate::store::Quota::default())
            .await
            .map_err(|e| Failure::other("store", e.to_string()))?;
        store.activate(TENANT, HANDLER, version.version).await.map_err(|e| Failure::other("store", e.to_string()))?;
        let mut spec = BindingSpec::new(TENANT, HANDLER, vec![INPUT.to_owned()]);
        spec.output_topics = vec![OUTPUT.to_owned()];
        spec.config.insert("output-topic".to_owned(), OUTPUT.to_owned());
        spec.dlq_topic = Some(DLQ.to_owned());
        let spec_json = serde_json::to_value(&spec).map_err(|e| Failure::other("internal", e.to_string()))?;
        store
            .put_binding("dev.orders", TENANT, HANDLER, &spec_json)
            .await
            .map_err(|e| Failure::other("store", e.to_string()))?;
        let tenant_token = tenant_token(store.as_ref()).await;
        store.close().await;
        let tenant_token = tenant_token?;

        println!("weir dev");
        println!("  kafka    in-process mock cluster at {bootstrap} (topics {INPUT}, {OUTPUT}, {DLQ})");
        println!("  store    {} (fresh each run, like the in-process Kafka)", config.store.url);
        println!("  handler  {TENANT}/{HANDLER} version {} ({}), bound to topic {INPUT}", version.version, component.display());
        println!("  health   http://{}/health", config.server.listen);
        let server = server_url(config.server.listen);
        println!("  api      {server}/v1 (routes: {server}/v1/openapi.json)");
        if admin_from_env {
            println!("  admin    token from {ADMIN_TOKEN_ENV}");
        } else {
            println!("  admin    token {admin_token} (new each run; set {ADMIN_TOKEN_ENV} to choose it)");
        }
        println!("  tenant   {TENANT}, token {tenant_token}");
        println!("  try      export WEIR_SERVER={server} WEIR_TOKEN={tenant_token}");
        println!("           weir dlq list    (in this checkout: cargo run -q -- dlq list)");
        if !args.demo {
            println!(
                "  produce to {INPUT} on {bootstrap}, or with `weir produce {INPUT} --key c-1 --value '{{\"order_id\":\"o-1\",\"customer\":\"c-1\",\"amount_cents\":100}}'`, or run with --demo for sample traffic; Ctrl-C stops"
            );
        }

        let shutdown = CancellationToken::new();
        let host = tokio::spawn(crate::serve::serve(config, shutdown.clone()));
        if args.demo {
            tokio::spawn(demo(bootstrap.clone(), args.rate, shutdown.clone()));
        }
        let stop = shutdown.clone();
        tokio::spawn(async move {
            match args.run_for {
                Some(seconds) => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(seconds)) => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                }
                None => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
            stop.cancel();
        });
        match host.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Failure::other("serve-failed", e.to_string())),
            Err(e) => Err(Failure::other("internal", e.to_string())),
        }
    });
    // Close every Kafka client (the demo's included) before the mock cluster they talk to.
    runtime.shutdown_timeout(Duration::from_secs(5));
    drop(mock);
    result
}

/// The admin token: `WEIR_SERVER__ADMIN_TOKEN` when set (then `true`), else a new random one.
fn admin_token() -> Result<(String, bool), Failure> {
    if let Some(token) = std::env::var(ADMIN_TOKEN_ENV)
        .ok()
        .filter(|t| !t.is_empty())
    {
        return Ok((token, true));
    }
    let mut random = [0u8; 32];
    getrandom::fill(&mut random)
        .map_err(|e| Failure::other("internal", format!("cannot generate the admin token: {e}")))?;
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random);
    Ok((format!("weir_admin_{secret}"), false))
}

/// The tenant that owns the example handler (created if missing) and a new token for it.
async fn tenant_token(store: &dyn Store) -> Result<String, Failure> {
    let tenant = NewTenant {
        id: TENANT.to_owned(),
        quota: crate::store::Quota::default(),
    };
    match store.create_tenant(&tenant).await {
        Ok(_) | Err(StoreError::Conflict(_)) => {}
        Err(e) => {
            return Err(Failure::other(
                "store",
                format!("cannot create tenant {TENANT}: {e}"),
            ));
        }
    }
    let (id, secret) = new_token().map_err(|e| {
        Failure::other(
            "internal",
            format!("cannot generate a token: {}", e.detail.message),
        )
    })?;
    store
        .create_token(&NewToken {
            id,
            tenant: TENANT.to_owned(),
            sha256: token_hash(&secret),
            label: Some("weir dev".to_owned()),
            expires_at: None,
        })
        .await
        .map_err(|e| Failure::other("store", format!("cannot create a token for {TENANT}: {e}")))?;
    Ok(secret)
}

/// The URL a client on this machine reaches `listen` at (loopback for a wildcard address).
fn server_url(listen: SocketAddr) -> String {
    let ip = if listen.ip().is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        listen.ip()
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

/// Sample traffic and a running summary: orders in, events out on `orders.accepted`, records on
/// the DLQ topic.
async fn demo(bootstrap: String, rate: u32, shutdown: CancellationToken) {
    let produced = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let dead = Arc::new(AtomicU64::new(0));
    let last_event = Arc::new(std::sync::Mutex::new(String::new()));

    let producer: FutureProducer = match ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
    {
        Ok(producer) => producer,
        Err(e) => return eprintln!("demo: cannot create a producer: {e}"),
    };
    let consumer: StreamConsumer = match ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "weir-dev-demo")
        .set("auto.offset.reset", "earliest")
        .create()
    {
        Ok(consumer) => consumer,
        Err(e) => return eprintln!("demo: cannot create a consumer: {e}"),
    };
    if let Err(e) = consumer.subscribe(&[OUTPUT, DLQ]) {
        return eprintln!("demo: cannot subscribe: {e}");
    }
    {
        let (accepted, dead, last_event, shutdown) = (
            accepted.clone(),
            dead.clone(),
            last_event.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            loop {
                let record = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    record = consumer.recv() => record,
                };
                if let Ok(record) = record {
                    if record.topic() == DLQ {
                        dead.fetch_add(1, Ordering::Relaxed);
                    } else {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        if let Some(payload) = record.payload() {
                            let mut last = last_event
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                            *last = String::from_utf8_lossy(payload).into_owned();
                        }
                    }
                }
            }
        });
    }
    {
        let (produced, shutdown) = (produced.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
            let mut i: u64 = 0;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                i += 1;
                let customer = format!("c-{}", i % 10);
                let payload = if i.is_multiple_of(25) {
                    "{not an order".to_owned()
                } else {
                    format!(
                        r#"{{"order_id":"o-{i}","customer":"{customer}","amount_cents":{}}}"#,
                        100 + i % 900
                    )
                };
                let record = FutureRecord::to(INPUT).key(&customer).payload(&payload);
                if producer.send(record, Duration::from_secs(5)).await.is_ok() {
                    produced.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let mut every = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = every.tick() => {}
        }
        let last = last_event
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        println!(
            "demo: messages in {:>6} | handled and committed, events on {OUTPUT} {:>6} | dead-lettered, on {DLQ} {:>4}",
            produced.load(Ordering::Relaxed),
            accepted.load(Ordering::Relaxed),
            dead.load(Ordering::Relaxed)
        );
        if !last.is_empty() {
            println!("      latest event: {last}");
        }
    }
}
