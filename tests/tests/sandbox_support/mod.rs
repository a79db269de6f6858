//! What the sandbox tests (`sandbox.rs`, `sandbox_python.rs`) share: a small runtime
//! configuration, loading a built component, a sample message and context, one invocation on a
//! fresh instance.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use weir::runtime::{
    HandlerComponent, Invocation, InvocationContext, Message, Runtime, RuntimeConfig,
};
use weir_acceptance::component;

pub fn config() -> RuntimeConfig {
    RuntimeConfig {
        pool_instances: 8,
        ..RuntimeConfig::default()
    }
}

pub fn load(runtime: &Runtime, name: &str) -> HandlerComponent {
    let bytes = std::fs::read(component(name)).expect("read component");
    runtime
        .load(&bytes)
        .unwrap_or_else(|e| panic!("{name} refused: {e}"))
}

pub fn message(key: Option<&str>, payload: &str) -> Message {
    Message {
        id: "orders/0/7".to_owned(),
        topic: "orders".to_owned(),
        partition: 0,
        offset: 7,
        key: key.map(|k| k.as_bytes().to_vec()),
        payload: payload.as_bytes().to_vec(),
        headers: Vec::new(),
        timestamp_ms: Some(1_700_000_000_000),
        tenant: "acme".to_owned(),
        attempt: 1,
    }
}

pub fn context(config: &[(&str, &str)]) -> InvocationContext {
    InvocationContext {
        config: Arc::new(
            config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..InvocationContext::default()
    }
}

pub async fn run(
    component: &HandlerComponent,
    message: &Message,
    context: &InvocationContext,
) -> Invocation {
    let mut instance = component.instantiate().await.expect("instantiate");
    instance.invoke(message, context).await
}

pub const ORDER: &str = r#"{"order_id":"o-1","customer":"c-42","amount_cents":1250}"#;
