//! The deployment files users get, checked without a Docker engine: `docker-compose.yml`
//! (services, health checks, ports bound to loopback, volumes, dependencies, and every `WEIR_*`
//! variable it sets is a real Weir configuration key that loads), the `Dockerfile` (multi-stage,
//! non-root), Prometheus's scrape configuration, and Grafana's provisioning and dashboard
//! (every metric a panel queries is one the host exports).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;

use serde_yaml::Value;
use weir_acceptance::repo_root;

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join(path)).unwrap();
    let mut value: Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    value.apply_merge().unwrap();
    value
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose["services"]
        .get(name)
        .unwrap_or_else(|| panic!("service {name} missing"))
}

#[test]
fn the_compose_cluster_is_complete_and_safe() {
    let compose = yaml("docker-compose.yml");
    let services: BTreeSet<&str> = compose["services"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    let expected: BTreeSet<&str> = [
        "kafka-1",
        "kafka-2",
        "kafka-3",
        "postgres",
        "weir",
        "prometheus",
        "grafana",
    ]
    .into();
    assert_eq!(services, expected);

    for name in &services {
        let s = service(&compose, name);
        assert!(
            s["healthcheck"]["test"].is_sequence(),
            "{name} has no health check"
        );
        assert!(s["image"].is_string(), "{name} has no image");
        // Published ports are bound to loopback only.
        for port in s["ports"].as_sequence().into_iter().flatten() {
            let port = port.as_str().unwrap();
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name} publishes {port} beyond loopback"
            );
        }
        // Named volumes are declared; bind mounts point at files in the repository.
        for volume in s["volumes"].as_sequence().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if let Some(relative) = source.strip_prefix("./") {
                assert!(
                    repo_root().join(relative).exists(),
                    "{name} mounts {source}, which is not in the repository"
                );
            } else {
                assert!(
                    compose["volumes"].get(source).is_some(),
                    "{name} uses volume {source}, which is not declared"
                );
            }
        }
    }

    // Three KRaft brokers, each a voter, with replication that survives one broker down.
    for n in 1..=3 {
        let env = &service(&compose, &format!("kafka-{n}"))["environment"];
        assert_eq!(env["KAFKA_NODE_ID"].as_u64(), Some(n));
        assert_eq!(
            env["KAFKA_PROCESS_ROLES"].as_str(),
            Some("broker,controller")
        );
        assert_eq!(
            env["KAFKA_CONTROLLER_QUORUM_VOTERS"].as_str(),
            Some("1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093")
        );
        assert_eq!(env["KAFKA_MIN_INSYNC_REPLICAS"].as_u64(), Some(2));
        let cluster = env["CLUSTER_ID"].as_str().unwrap();
        assert!(
            cluster.len() == 22
                && cluster
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "CLUSTER_ID {cluster:?} is not 16 bytes in base64url, as `kafka-storage.sh format` needs"
        );
        assert!(
            service(&compose, &format!("kafka-{n}"))["image"]
                .as_str()
                .unwrap()
                .starts_with("apache/kafka:")
        );
    }

    // Weir waits for healthy dependencies, is built from the Dockerfile, and every variable
    // it gets is a real configuration key whose value loads.
    let weir = service(&compose, "weir");
    assert_eq!(weir["build"].as_str(), Some("."));
    for dependency in ["postgres", "kafka-1", "kafka-2", "kafka-3"] {
        assert_eq!(
            weir["depends_on"][dependency]["condition"].as_str(),
            Some("service_healthy")
        );
    }
    let env: Vec<(String, String)> = weir["environment"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let value = v.as_str().unwrap();
            // `${VAR:?…}` is filled by the user at `docker compose up`; stand in a valid one.
            let value = if value.starts_with("${") {
                "a-token-of-the-right-length".to_owned()
            } else {
                value.to_owned()
            };
            (k.as_str().unwrap().to_owned(), value)
        })
        .collect();
    assert!(env.iter().all(|(k, _)| k.starts_with("WEIR_")));
    let config = weir::config::WeirConfig::load(None, env.clone())
        .unwrap_or_else(|e| panic!("the compose's Weir environment does not load: {e}"));
    assert_eq!(
        config.kafka.bootstrap_servers,
        "kafka-1:9092,kafka-2:9092,kafka-3:9092"
    );
    assert!(
        config
            .store
            .url
            .starts_with("postgres://weir:weir@postgres:5432/")
    );
    assert_eq!(config.server.listen.port(), 8080);
    assert!(config.server.admin_token.is_some());
    // Each variable matters: dropping any one changes the configuration (so none is ignored).
    for skip in 0..env.len() {
        let fewer: Vec<(String, String)> = env
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, kv)| kv.clone())
            .collect();
        if env[skip].0 == "WEIR_LOG" {
            continue; // the log filter is read by the binary, not the configuration
        }
        let other = weir::config::WeirConfig::load(None, fewer).unwrap();
        assert_ne!(
            format!("{other:?}"),
            format!("{config:?}"),
            "{} has no effect on the configuration",
            env[skip].0
        );
    }
}

#[test]
fn the_image_builds_in_two_stages_and_runs_as_a_user() {
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let stages = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert_eq!(stages, 2, "{dockerfile}");
    assert!(dockerfile.contains("COPY --from=build"));
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("no USER line");
    assert_ne!(user.trim(), "root");
    assert_ne!(user.trim(), "0");
    assert!(dockerfile.contains("-p weir"));
    assert!(repo_root().join(".dockerignore").is_file());
}

/// Metric names the host registers (the names in `host/src/metrics.rs`).
fn exported_metrics() -> BTreeSet<String> {
    let source = std::fs::read_to_string(repo_root().join("host/src/metrics.rs")).unwrap();
    source
        .split('"')
        .filter(|s| {
            s.starts_with("weir_") && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn prometheus_scrapes_weir_and_every_panel_queries_a_real_metric() {
    let prometheus = yaml("deploy/prometheus.yml");
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(job["metrics_path"].as_str(), Some("/metrics"));
    assert_eq!(
        job["static_configs"][0]["targets"][0].as_str(),
        Some("weir:8080")
    );

    let datasource = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(
        datasource["datasources"][0]["url"].as_str(),
        Some("http://prometheus:9090")
    );
    let provider = yaml("deploy/grafana/provisioning/dashboards/weir.yml");
    assert_eq!(
        provider["providers"][0]["options"]["path"].as_str(),
        Some("/var/lib/grafana/dashboards")
    );

    let path = repo_root().join("deploy/grafana/dashboards/weir.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let exported = exported_metrics();
    assert!(exported.len() >= 10, "{exported:?}");
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(name) = word.strip_prefix("weir_").map(|_| word) {
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|suffix| name.strip_suffix(suffix))
                        .unwrap_or(name);
                    assert!(
                        exported.contains(base),
                        "panel {:?} queries {name}, which the host does not export",
                        panel["title"]
                    );
                    queried.insert(base.to_owned());
                }
            }
        }
    }
    // The panels the platform team asked for: throughput, latency, lag, DLQ, breakers, outbox.
    for needed in [
        "weir_messages_processed_total",
        "weir_end_to_end_latency_seconds",
        "weir_consumer_lag",
        "weir_dlq_pending",
        "weir_breaker_state",
        "weir_outbox_pending",
    ] {
        assert!(queried.contains(needed), "no panel shows {needed}");
    }
    assert!(Path::new(&path).is_file());
}
