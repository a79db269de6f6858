//! The admin API against the real PostgreSQL store, over real HTTP: every route's happy path,
//! the cross-tenant matrix (another tenant's token gets 404 or 403, never data), the bad-input
//! matrix (4xx with a clear, field-naming error and no residue in the store), authentication
//! (missing, wrong, revoked, expired tokens), quotas, and the OpenAPI document.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use weir::admin::{AdminState, router};
use weir::config::{Secret, ServerConfig};
use weir::runtime::{Runtime, RuntimeConfig};
use weir::store::{DlqEntryInsert, DlqErrorKind, Store};
use weir_acceptance::{component, services, unique_name};

const ADMIN: &str = "admin-token-for-the-tests-0123456789";
const MAX_UPLOAD: u64 = 4 * 1024 * 1024;

struct Api {
    base: String,
    http: reqwest::Client,
    store: Arc<dyn Store>,
}

impl Api {
    async fn start() -> Self {
        let store = weir::store::connect(&services().database_url)
            .await
            .unwrap();
        let runtime = Arc::new(Runtime::new(RuntimeConfig::default()).unwrap());
        let server = ServerConfig {
            admin_token: Some(Secret::new(ADMIN)),
            max_upload_bytes: MAX_UPLOAD,
            ..ServerConfig::default()
        };
        let app = router(Arc::new(AdminState::new(store.clone(), runtime, &server)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            base,
            http: reqwest::Client::new(),
            store,
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON: {text}"))
        };
        (status, value)
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        token: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let response = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn upload(
        &self,
        tenant: &str,
        name: &str,
        token: &str,
        wasm: &str,
    ) -> (StatusCode, Value) {
        let bytes = std::fs::read(component(wasm)).unwrap();
        self.raw(
            Method::POST,
            &format!("/v1/tenants/{tenant}/handlers/{name}/versions?activate=true"),
            token,
            "application/wasm",
            bytes,
        )
        .await
    }

    /// A tenant and a token for it.
    async fn tenant(&self, prefix: &str, body: Value) -> (String, String) {
        let id = unique_name(prefix).to_lowercase();
        let mut body = body;
        body["id"] = json!(id);
        let (status, value) = self
            .call(Method::POST, "/v1/tenants", Some(ADMIN), Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{value}");
        let (status, value) = self
            .call(
                Method::POST,
                &format!("/v1/tenants/{id}/tokens"),
                Some(ADMIN),
                Some(json!({"label": "tests"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{value}");
        (id, value["token"].as_str().unwrap().to_owned())
    }
}

fn code(value: &Value) -> &str {
    value["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error shape: {value}"))
}

fn field(value: &Value) -> &str {
    value["error"]["field"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_works_for_its_owner() {
    let api = Api::start().await;
    let (acme, token) = api.tenant("acme", json!({})).await;
    let topic = unique_name("admin_in");
    let output = format!("{topic}.accepted");

    let (status, me) = api
        .call(Method::GET, "/v1/whoami", Some(&token), None)
        .await;
    assert_eq!(
        (status, me["role"].as_str(), me["tenant"].as_str()),
        (StatusCode::OK, Some("tenant"), Some(acme.as_str()))
    );

    // Handlers: upload (validated, stored, activated), the same bytes again, a second version.
    let (status, v1) = api
        .upload(&acme, "orders", &token, "weir_handler_orders")
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v1}");
    assert_eq!(
        (v1["version"].as_i64(), v1["active"].as_bool()),
        (Some(1), Some(true))
    );
    let (_, again) = api
        .upload(&acme, "orders", &token, "weir_handler_orders")
        .await;
    assert_eq!(again["version"], json!(1), "same bytes, same version");
    let (status, v2) = api
        .upload(&acme, "orders", &token, "weir_fixture_orders_v2")
        .await;
    assert_eq!(
        (status, v2["version"].as_i64()),
        (StatusCode::CREATED, Some(2))
    );
    let (_, list) = api
        .call(
            Method::GET,
            &format!("/v1/tenants/{acme}/handlers"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["active_version"], json!(2));
    let (_, shown) = api
        .call(
            Method::GET,
            &format!("/v1/tenants/{acme}/handlers/orders"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(shown["versions"].as_array().unwrap().len(), 2, "{shown}");
    let (status, rolled) = api
        .call(
            Method::POST,
            &format!("/v1/tenants/{acme}/handlers/orders/rollback"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(
        (status, rolled["active_version"].as_i64()),
        (StatusCode::OK, Some(1)),
        "{rolled}"
    );
    let (status, activated) = api
        .call(
            Method::POST,
            &format!("/v1/tenants/{acme}/handlers/orders/activate"),
            Some(&token),
            Some(json!({"version": 2})),
        )
        .await;
    assert_eq!(
        (status, activated["active_version"].as_i64()),
        (StatusCode::OK, Some(2))
    );

    // Bindings.
    let binding = json!({
        "handler": "orders", "topics": [topic], "output_topics": [output],
        "config": {"output-topic": output}, "retry": {"max_attempts": 3, "backoff_ms": [100, 200]},
    });
    let (status, created) = api
        .call(
            Method::POST,
            &format!("/v1/tenants/{acme}/bindings"),
            Some(&token),
            Some(binding.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(id, format!("{acme}.orders"));
    assert_eq!(created["revision"], json!(1));
    let (status, dup) = api
        .call(
            Method::POST,
            &format!("/v1/tenants/{acme}/bindings"),
            Some(&token),
            Some(binding.clone()),
        )
        .await;
    assert_eq!((status, code(&dup)), (StatusCode::CONFLICT, "conflict"));
    let mut changed = binding.clone();
    changed["max_in_flight"] = json!(8);
    let (status, put) = api
        .call(
            Method::PUT,
            &format!("/v1/tenants/{acme}/bindings/{id}"),
            Some(&token),
            Some(changed),
        )
        .await;
    assert_eq!(
        (
            status,
            put["revision"].as_i64(),
            put["spec"]["max_in_flight"].as_i64()
        ),
        (StatusCode::OK, Some(2), Some(8)),
        "{put}"
    );
    let (_, bindings) = api
        .call(
            Method::GET,
            &format!("/v1/tenants/{acme}/bindings"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(bindings.as_array().unwrap().len(), 1);
    let (status, _) = api
        .call(
            Method::GET,
            &format!("/v1/tenants/{acme}/bindings/{id}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    // Ingest: accepted at once as pending, to the binding's topic only.
    let (status, accepted) = api
        .call(Method::POST, &format!("/v1/topics/{topic}/messages"), Some(&token),
            Some(json!({"messages": [{"key": "c-1", "value": {"order_id": "o-1"}, "message_id": format!("{acme}-m1")}, {"key": "c-2", "value_base64": "aGk="}]})))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["messages"][0]["state"], json!("pending"));
    let (_, again) = api
        .call(Method::POST, &format!("/v1/topics/{topic}/messages"), Some(&token),
            Some(json!({"key": "c-1", "value": {"order_id": "o-1"}, "message_id": format!("{acme}-m1")})))
        .await;
    assert_eq!(again["messages"][0]["duplicate"], json!(true), "{again}");
    let (status, status_body) = api
        .call(
            Method::GET,
            &format!("/v1/messages/{acme}-m1"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(
        (status, status_body["topic"].as_str()),
        (StatusCode::OK, Some(topic.as_str())),
        "{status_body}"
    );
    let (status, refused) = api
        .call(
            Method::POST,
            "/v1/topics/somebody-elses-topic/messages",
            Some(&token),
            Some(json!({"value": 1})),
        )
        .await;
    assert_eq!(
        (status, code(&refused)),
        (StatusCode::FORBIDDEN, "forbidden")
    );

    // DLQ: list with filters, show, replay (twice: the second is refused), discard, bulk.
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(
            api.store
                .dlq_insert(&dlq_entry(&acme, &id, &topic, i))
                .await
                .unwrap(),
        );
    }
    let (_, page) = api
        .call(
            Method::GET,
            &format!("/v1/tenants/{acme}/dlq?error_kind=permanent&limit=2"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(page["entries"].as_array().unwrap().len(), 2, "{page}");
    let after = page["next_after"].as_i64().unwrap();
    let (_, rest) = api
        .call(
            Method::GET,
            &format!("/v1/tenants/{acme}/dlq?error_kind=permanent&after={after}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(rest["entries"].as_array().unwrap().len(), 2, "{rest}");
    let (_, shown) = api
        .call(
            Method::GET,
            &format!("/v1/tenants/{acme}/dlq/{}", ids[0]),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(shown["payload"]["text"], json!("not json 0"), "{shown}");
    assert_eq!(shown["headers"][0]["key"], json!("message-id"));
    let (status, replayed) = api
        .call(
            Method::POST,
            &format!("/v1/tenants/{acme}/dlq/{}/replay", ids[0]),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(
        (status, replayed["state"].as_str()),
        (StatusCode::OK, Some("replaying")),
        "{replayed}"
    );
    let (status, twice) = api
        .call(
            Method::POST,
            &format!("/v1/tenants/{acme}/dlq/{}/replay", ids[0]),
            Some(&token),
            None,
        )
        .await;
    assert_eq!((status, code(&twice)), (StatusCode::CONFLICT, "conflict"));
    let (status, discarded) = api
        .call(
            Method::POST,
            &format!("/v1/tenants/{acme}/dlq/{}/discard", ids[1]),
            Some(&token),
            Some(json!({"note": "known bad"})),
        )
        .await;
    assert_eq!(
        (
            status,
            discarded["state"].as_str(),
            discarded["resolution_note"].as_str()
        ),
        (StatusCode::OK, Some("discarded"), Some("known bad"))
    );
    let (status, bulk) = api
        .call(
            Method::POST,
            &format!("/v1/tenants/{acme}/dlq/replay"),
            Some(&token),
            Some(json!({"filter": {"binding": id}})),
        )
        .await;
    assert_eq!(
        (status, bulk["done"].as_u64(), bulk["next_after"].as_i64()),
        (StatusCode::OK, Some(2), None),
        "{bulk}"
    );

    // Keyed state of one key.
    let (status, state) = api
        .call(
            Method::GET,
            &format!("/v1/tenants/{acme}/handlers/orders/state?key=c-1"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(
        (status, state["values"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(0)),
        "{state}"
    );

    // Deleting: the handler is refused while a binding runs it.
    let (status, busy) = api
        .call(
            Method::DELETE,
            &format!("/v1/tenants/{acme}/handlers/orders"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!((status, code(&busy)), (StatusCode::CONFLICT, "conflict"));
    let (status, _) = api
        .call(
            Method::DELETE,
            &format!("/v1/tenants/{acme}/bindings/{id}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = api
        .call(
            Method::DELETE,
            &format!("/v1/tenants/{acme}/handlers/orders"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // Tokens: listed without secrets; a revoked token stops working at once.
    let (_, tokens) = api
        .call(
            Method::GET,
            &format!("/v1/tenants/{acme}/tokens"),
            Some(ADMIN),
            None,
        )
        .await;
    let token_id = tokens[0]["id"].as_str().unwrap().to_owned();
    assert!(
        tokens[0].get("token").is_none(),
        "a listed token shows its secret: {tokens}"
    );
    let (status, revoked) = api
        .call(
            Method::DELETE,
            &format!("/v1/tenants/{acme}/tokens/{token_id}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert!(
        status == StatusCode::OK && revoked["revoked_at"].is_string(),
        "{revoked}"
    );
    let (status, body) = api
        .call(Method::GET, "/v1/whoami", Some(&token), None)
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::UNAUTHORIZED, "invalid-token")
    );
    let (_, tenant) = api
        .call(
            Method::GET,
            &format!("/v1/tenants/{acme}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(
        (tenant["handlers"].as_i64(), tenant["total_bytes"].as_i64()),
        (Some(0), Some(0)),
        "{tenant}"
    );
    let (status, _) = api
        .call(
            Method::DELETE,
            &format!("/v1/tenants/{acme}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

fn dlq_entry(tenant: &str, binding: &str, topic: &str, i: i64) -> DlqEntryInsert {
    let now = chrono::Utc::now();
    DlqEntryInsert {
        tenant: tenant.into(),
        binding_id: binding.into(),
        handler: "orders".into(),
        handler_version: Some(1),
        topic: topic.into(),
        partition: 0,
        offset: i,
        message_id: format!("{tenant}-poison-{i}"),
        key: Some(b"c-9".to_vec()),
        payload: format!("not json {i}").into_bytes(),
        headers: vec![weir::runtime::Header {
            key: "message-id".into(),
            value: format!("{tenant}-poison-{i}").into_bytes(),
        }],
        timestamp_ms: Some(1),
        error_kind: DlqErrorKind::Permanent,
        error_message: "malformed order".into(),
        attempts: 1,
        first_failure_at: now,
        last_failure_at: now,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_token_never_sees_data() {
    let api = Api::start().await;
    let (acme, acme_token) = api.tenant("acme", json!({})).await;
    let (globex, globex_token) = api.tenant("globex", json!({})).await;
    let topic = unique_name("xt_in");
    let (status, _) = api
        .upload(&acme, "orders", &acme_token, "weir_handler_orders")
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, binding) = api
        .call(
            Method::POST,
            &format!("/v1/tenants/{acme}/bindings"),
            Some(&acme_token),
            Some(json!({"handler": "orders", "topics": [topic]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{binding}");
    let bid = binding["id"].as_str().unwrap().to_owned();
    let entry = api
        .store
        .dlq_insert(&dlq_entry(&acme, &bid, &topic, 0))
        .await
        .unwrap();
    let (status, _) = api
        .call(
            Method::POST,
            &format!("/v1/topics/{topic}/messages"),
            Some(&acme_token),
            Some(json!({"value": 1, "message_id": format!("{acme}-x")})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let t = format!("/v1/tenants/{acme}");
    let spec = json!({"handler": "orders", "topics": [topic]});
    // Every tenant-scoped route on acme's objects, with globex's token: 404, never data.
    let tenant_scoped: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, t.clone(), None),
        (Method::GET, format!("{t}/handlers"), None),
        (Method::GET, format!("{t}/handlers/orders"), None),
        (Method::DELETE, format!("{t}/handlers/orders"), None),
        (
            Method::POST,
            format!("{t}/handlers/orders/activate"),
            Some(json!({"version": 1})),
        ),
        (Method::POST, format!("{t}/handlers/orders/rollback"), None),
        (
            Method::GET,
            format!("{t}/handlers/orders/state?key=c-1"),
            None,
        ),
        (Method::GET, format!("{t}/bindings"), None),
        (Method::POST, format!("{t}/bindings"), Some(spec.clone())),
        (Method::GET, format!("{t}/bindings/{bid}"), None),
        (
            Method::PUT,
            format!("{t}/bindings/{bid}"),
            Some(spec.clone()),
        ),
        (Method::DELETE, format!("{t}/bindings/{bid}"), None),
        (Method::GET, format!("{t}/dlq"), None),
        (Method::GET, format!("{t}/dlq/{entry}"), None),
        (Method::POST, format!("{t}/dlq/{entry}/replay"), None),
        (
            Method::POST,
            format!("{t}/dlq/{entry}/discard"),
            Some(json!({})),
        ),
        (Method::POST, format!("{t}/dlq/replay"), Some(json!({}))),
        (Method::POST, format!("{t}/dlq/discard"), Some(json!({}))),
        (Method::GET, format!("/v1/messages/{acme}-x"), None),
        // acme's ids under globex's own paths
        (
            Method::GET,
            format!("/v1/tenants/{globex}/bindings/{bid}"),
            None,
        ),
        (
            Method::PUT,
            format!("/v1/tenants/{globex}/bindings/{bid}"),
            Some(spec.clone()),
        ),
        (
            Method::DELETE,
            format!("/v1/tenants/{globex}/bindings/{bid}"),
            None,
        ),
        (
            Method::GET,
            format!("/v1/tenants/{globex}/dlq/{entry}"),
            None,
        ),
        (
            Method::POST,
            format!("/v1/tenants/{globex}/dlq/{entry}/replay"),
            None,
        ),
        (
            Method::POST,
            format!("/v1/tenants/{globex}/dlq/{entry}/discard"),
            Some(json!({})),
        ),
        (
            Method::GET,
            format!("/v1/tenants/{globex}/handlers/orders"),
            None,
        ),
    ];
    for (method, path, body) in &tenant_scoped {
        let (status, value) = api
            .call(method.clone(), path, Some(&globex_token), body.clone())
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {value}");
        assert!(
            !value.to_string().contains("not json"),
            "{method} {path} leaked: {value}"
        );
    }
    // Admin routes: 403 to any tenant token.
    let admin_only: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, "/v1/tenants".into(), None),
        (
            Method::POST,
            "/v1/tenants".into(),
            Some(json!({"id": "intruder"})),
        ),
        (Method::DELETE, format!("/v1/tenants/{globex}"), None),
        (Method::GET, format!("/v1/tenants/{globex}/tokens"), None),
        (
            Method::POST,
            format!("/v1/tenants/{globex}/tokens"),
            Some(json!({})),
        ),
        (
            Method::DELETE,
            format!("/v1/tenants/{globex}/tokens/x"),
            None,
        ),
    ];
    for (method, path, body) in &admin_only {
        let (status, value) = api
            .call(method.clone(), path, Some(&globex_token), body.clone())
            .await;
        assert_eq!(
            (status, code(&value)),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{method} {path}"
        );
    }
    // Nothing changed for acme.
    let (_, entry_now) = api
        .call(
            Method::GET,
            &format!("{t}/dlq/{entry}"),
            Some(&acme_token),
            None,
        )
        .await;
    assert_eq!(entry_now["state"], json!("pending"));
    let (status, _) = api
        .call(
            Method::GET,
            &format!("{t}/bindings/{bid}"),
            Some(&acme_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // Missing and wrong tokens: 401 everywhere.
    for (method, path, body) in tenant_scoped.iter().chain(admin_only.iter()) {
        let (status, value) = api.call(method.clone(), path, None, body.clone()).await;
        assert_eq!(
            (status, code(&value)),
            (StatusCode::UNAUTHORIZED, "unauthenticated"),
            "{method} {path}"
        );
        let (status, value) = api
            .call(method.clone(), path, Some("weir_nope_nope"), body.clone())
            .await;
        assert_eq!(
            (status, code(&value)),
            (StatusCode::UNAUTHORIZED, "invalid-token"),
            "{method} {path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_leaves_no_residue() {
    let api = Api::start().await;
    let (acme, token) = api.tenant("acme", json!({"max_handlers": 1})).await;
    let handlers = format!("/v1/tenants/{acme}/handlers");
    let upload = format!("{handlers}/orders/versions");
    let usage = || async {
        let (_, t) = api
            .call(
                Method::GET,
                &format!("/v1/tenants/{acme}"),
                Some(ADMIN),
                None,
            )
            .await;
        (
            t["handlers"].as_i64().unwrap(),
            t["total_bytes"].as_i64().unwrap(),
        )
    };

    // Uploads that are not Weir components: refused before anything is stored.
    let other_world = std::fs::read(component("weir_fixture_other_world")).unwrap();
    let core_module = b"\0asm\x01\0\0\0".to_vec();
    for (bytes, content_type, status, expected) in [
        (
            Vec::new(),
            "application/wasm",
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty",
        ),
        (
            b"#!/bin/sh\necho hi\n".to_vec(),
            "application/wasm",
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-wasm",
        ),
        (
            core_module,
            "application/wasm",
            StatusCode::UNPROCESSABLE_ENTITY,
            "core-module",
        ),
        (
            other_world,
            "application/wasm",
            StatusCode::UNPROCESSABLE_ENTITY,
            "wrong-world",
        ),
        (
            vec![0u8; MAX_UPLOAD as usize + 1],
            "application/wasm",
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
        ),
        (
            b"{}".to_vec(),
            "application/json",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
        ),
    ] {
        let (got, value) = api
            .raw(Method::POST, &upload, &token, content_type, bytes)
            .await;
        assert_eq!((got, code(&value)), (status, expected), "{value}");
        assert!(!value["error"]["message"].as_str().unwrap().is_empty());
        assert_eq!(
            usage().await,
            (0, 0),
            "residue after a refused upload ({expected})"
        );
    }
    let (status, value) = api
        .call(
            Method::POST,
            &format!("{handlers}/Bad%20Name/versions"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(
        (status, field(&value)),
        (StatusCode::UNPROCESSABLE_ENTITY, "name"),
        "{value}"
    );

    // Quota: one handler allowed; a second is refused and leaves nothing.
    let (status, _) = api
        .upload(&acme, "orders", &token, "weir_handler_orders")
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let before = usage().await;
    let (status, value) = api.upload(&acme, "echo", &token, "weir_handler_echo").await;
    assert_eq!(
        (status, code(&value)),
        (StatusCode::FORBIDDEN, "quota-exceeded"),
        "{value}"
    );
    assert_eq!(usage().await, before);

    // JSON bodies: malformed, unknown fields, wrong content type, invalid policies.
    let bindings = format!("/v1/tenants/{acme}/bindings");
    let topic = unique_name("bad_in");
    let (status, value) = api
        .raw(
            Method::POST,
            &bindings,
            &token,
            "application/json",
            b"{\"handler\": ".to_vec(),
        )
        .await;
    assert_eq!(
        (status, code(&value)),
        (StatusCode::BAD_REQUEST, "malformed-json")
    );
    let (status, value) = api
        .raw(
            Method::POST,
            &bindings,
            &token,
            "text/plain",
            b"{}".to_vec(),
        )
        .await;
    assert_eq!(
        (status, code(&value)),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type")
    );
    for (body, status, expected_field) in [
        (
            json!({"handler": "orders", "topics": [topic], "colour": "blue"}),
            StatusCode::BAD_REQUEST,
            "colour",
        ),
        (
            json!({"handler": "orders"}),
            StatusCode::BAD_REQUEST,
            "topics",
        ),
        (
            json!({"handler": "orders", "topics": [topic], "retry": {"max_attempts": 0}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "retry.max_attempts",
        ),
        (
            json!({"handler": "orders", "topics": [topic], "retry": {"backoff_ms": [1000, -5]}}),
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            json!({"handler": "orders", "topics": [topic], "max_in_flight": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "max_in_flight",
        ),
        (
            json!({"handler": "orders", "topics": ["bad topic!"]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "topics",
        ),
        (
            json!({"handler": "orders", "topics": [topic], "output_topics": ["a.out"], "config": {"output-topic": "elsewhere"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "config.output-topic",
        ),
        (
            json!({"handler": "orders", "topics": [topic], "http": {"allow": ["https://api.example.com/v1"]}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "http.allow[0]",
        ),
        (
            json!({"handler": "orders", "topics": [topic], "http": {"allow": ["api.example.com"], "timeout_ms": 0}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "http.timeout_ms",
        ),
        (
            json!({"handler": "orders", "topics": [topic], "http": {"allow": ["api.example.com"], "proxy": "x"}}),
            StatusCode::BAD_REQUEST,
            "http.proxy",
        ),
        (
            json!({"handler": "nobody", "topics": [topic]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "handler",
        ),
        (
            json!({"handler": "orders", "topics": [topic], "tenant": "someone-else"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "tenant",
        ),
    ] {
        let (got, value) = api
            .call(Method::POST, &bindings, Some(&token), Some(body.clone()))
            .await;
        assert_eq!(got, status, "{body}: {value}");
        assert!(
            field(&value).starts_with(expected_field),
            "{body}: expected field {expected_field}: {value}"
        );
        let (_, list) = api.call(Method::GET, &bindings, Some(&token), None).await;
        assert_eq!(list, json!([]), "residue after {body}");
    }
    // Tenants and tokens: invalid ids and settings name the field.
    let (status, value) = api
        .call(
            Method::POST,
            "/v1/tenants",
            Some(ADMIN),
            Some(json!({"id": "Has Spaces"})),
        )
        .await;
    assert_eq!(
        (status, field(&value)),
        (StatusCode::UNPROCESSABLE_ENTITY, "id")
    );
    let (status, value) = api
        .call(
            Method::POST,
            "/v1/tenants",
            Some(ADMIN),
            Some(json!({"id": "x", "max_handlers": -1})),
        )
        .await;
    assert_eq!(
        (status, field(&value)),
        (StatusCode::UNPROCESSABLE_ENTITY, "max_handlers")
    );
    let (status, value) = api
        .call(
            Method::POST,
            &format!("/v1/tenants/{acme}/tokens"),
            Some(ADMIN),
            Some(json!({"expires_in_s": 0})),
        )
        .await;
    assert_eq!(
        (status, field(&value)),
        (StatusCode::UNPROCESSABLE_ENTITY, "expires_in_s")
    );
    // Ingest: malformed messages.
    let (status, value) = api
        .call(
            Method::POST,
            &format!("/v1/topics/{topic}/messages"),
            Some(&token),
            Some(json!({"messages": [{"value": 1, "value_base64": "aGk="}]})),
        )
        .await;
    assert!(status.is_client_error(), "{value}");
    let (status, value) = api
        .call(Method::GET, "/v1/no/such/route", Some(&token), None)
        .await;
    assert_eq!((status, code(&value)), (StatusCode::NOT_FOUND, "no-route"));
}

/// A multipart/form-data body with one file part.
fn multipart(part: &str, bytes: &[u8]) -> (String, Vec<u8>) {
    let boundary = "weir-test-boundary-7d1f";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"{part}\"; filename=\"h.wasm\"\r\nContent-Type: application/wasm\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_uploads_as_multipart_too() {
    let api = Api::start().await;
    let (acme, token) = api.tenant("acme", json!({})).await;
    let path = format!("/v1/tenants/{acme}/handlers/echo/versions");
    let bytes = std::fs::read(component("weir_handler_echo")).unwrap();
    let (content_type, body) = multipart("component", &bytes);
    let (status, value) = api
        .raw(Method::POST, &path, &token, &content_type, body)
        .await;
    assert_eq!(
        (status, value["version"].as_i64()),
        (StatusCode::CREATED, Some(1)),
        "{value}"
    );
    assert_eq!(value["size"].as_u64(), Some(bytes.len() as u64));
    // The wrong part name, or not a component: refused, nothing stored.
    let (content_type, body) = multipart("file", &bytes);
    let (status, value) = api
        .raw(Method::POST, &path, &token, &content_type, body)
        .await;
    assert_eq!(
        (status, field(&value)),
        (StatusCode::BAD_REQUEST, "component"),
        "{value}"
    );
    let (content_type, body) = multipart("component", b"not wasm at all");
    let (status, value) = api
        .raw(
            Method::POST,
            &format!("/v1/tenants/{acme}/handlers/other/versions"),
            &token,
            &content_type,
            body,
        )
        .await;
    assert_eq!(
        (status, code(&value)),
        (StatusCode::UNPROCESSABLE_ENTITY, "not-wasm")
    );
    let (_, list) = api
        .call(
            Method::GET,
            &format!("/v1/tenants/{acme}/handlers"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_stops_working() {
    let api = Api::start().await;
    let (acme, _) = api.tenant("acme", json!({})).await;
    let (status, created) = api
        .call(
            Method::POST,
            &format!("/v1/tenants/{acme}/tokens"),
            Some(ADMIN),
            Some(json!({"expires_in_s": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let token = created["token"].as_str().unwrap();
    let (status, _) = api.call(Method::GET, "/v1/whoami", Some(token), None).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, value) = api.call(Method::GET, "/v1/whoami", Some(token), None).await;
    assert_eq!(
        (status, code(&value)),
        (StatusCode::UNAUTHORIZED, "invalid-token")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_rate_limit_is_set_shown_and_removed_by_the_admin_only() {
    let api = Api::start().await;
    let (acme, token) = api.tenant("acme", json!({})).await;
    let path = format!("/v1/tenants/{acme}/rate-limit");
    let (status, view) = api
        .call(
            Method::GET,
            &format!("/v1/tenants/{acme}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(
        (status, &view["rate_limit"]),
        (StatusCode::OK, &Value::Null)
    );

    let limit = json!({"messages_per_second": 200, "burst": 20});
    let (status, view) = api
        .call(Method::PUT, &path, Some(ADMIN), Some(limit.clone()))
        .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["rate_limit"], limit);
    // Shown to the tenant too, and kept in the store.
    let (status, view) = api
        .call(
            Method::GET,
            &format!("/v1/tenants/{acme}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!((status, &view["rate_limit"]), (StatusCode::OK, &limit));
    let stored = api.store.tenant(&acme).await.unwrap().unwrap();
    assert_eq!(
        stored.rate_limit.map(|l| (l.messages_per_second, l.burst)),
        Some((200, 20))
    );

    // A tenant cannot set or remove its own limit.
    let (status, value) = api
        .call(
            Method::PUT,
            &path,
            Some(&token),
            Some(json!({"messages_per_second": 1000, "burst": 1000})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{value}");
    let (status, _) = api.call(Method::DELETE, &path, Some(&token), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Bad bodies name their field and change nothing.
    for (body, expected) in [
        (
            json!({"messages_per_second": 0, "burst": 20}),
            "messages_per_second",
        ),
        (
            json!({"messages_per_second": -5, "burst": 20}),
            "messages_per_second",
        ),
        (json!({"messages_per_second": 200, "burst": 0}), "burst"),
        (
            json!({"messages_per_second": 200, "burst": 5_000_000_000_i64}),
            "burst",
        ),
    ] {
        let (status, value) = api
            .call(Method::PUT, &path, Some(ADMIN), Some(body.clone()))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {value}");
        assert_eq!(field(&value), expected, "{body}: {value}");
    }
    for body in [
        json!({"messages_per_second": 200}),
        json!({"messages_per_second": 200, "burst": 20, "per_host": true}),
        json!({"messages_per_second": 2.5, "burst": 20}),
    ] {
        let (status, value) = api
            .call(Method::PUT, &path, Some(ADMIN), Some(body.clone()))
            .await;
        assert!(status.is_client_error(), "{body}: {status} {value}");
        code(&value);
    }
    let stored = api.store.tenant(&acme).await.unwrap().unwrap();
    assert_eq!(stored.rate_limit.map(|l| l.messages_per_second), Some(200));

    // An unknown tenant is 404; removing the limit shows none.
    let (status, _) = api
        .call(
            Method::PUT,
            "/v1/tenants/no-such-tenant/rate-limit",
            Some(ADMIN),
            Some(limit),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, view) = api.call(Method::DELETE, &path, Some(ADMIN), None).await;
    assert_eq!(
        (status, &view["rate_limit"]),
        (StatusCode::OK, &Value::Null)
    );
    assert_eq!(
        api.store.tenant(&acme).await.unwrap().unwrap().rate_limit,
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_every_route() {
    let api = Api::start().await;
    let (status, doc) = api.call(Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/v1/tenants",
        "/v1/tenants/{tenant}/tokens",
        "/v1/tenants/{tenant}/rate-limit",
        "/v1/tenants/{tenant}/handlers/{name}/versions",
        "/v1/tenants/{tenant}/handlers/{name}/activate",
        "/v1/tenants/{tenant}/bindings/{id}",
        "/v1/tenants/{tenant}/dlq/{id}/replay",
        "/v1/tenants/{tenant}/dlq/replay",
        "/v1/topics/{topic}/messages",
        "/v1/messages/{id}",
        "/v1/whoami",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    assert!(doc["components"]["schemas"]["BindingSpec"].is_object());
}
