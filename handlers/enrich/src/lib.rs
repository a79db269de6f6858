//! `enrich`: adds the customer's profile to each order, fetched from a customer service over
//! HTTP — the example of outbound HTTP through the host.
//!
//! The payload is `{"order_id": string, "customer": string, …}`. For each order the handler
//! calls `GET <customers-url>/customers/<customer>` (setting `customers-url`, e.g.
//! `http://customers.internal:8080`; its host must be in the binding's `http.allow`) and emits
//! the order with the answer under `"customer_profile"` to the topic in setting `output-topic`
//! (default `orders.enriched`), keyed like the input.
//!
//! Failures are classified by the SDK: a service that is down, slow, answering 5xx or whose
//! breaker is open is retryable; a customer the service does not know (404) and a malformed
//! order are permanent; a destination outside the allowlist is permanent too. The call is a
//! read, so repeating it on a retry is harmless.

use serde::Deserialize;
use serde_json::{Map, Value};
use weir_sdk::{Error, Message, config, emit, http};

#[derive(Deserialize)]
struct Order {
    order_id: String,
    customer: String,
}

fn handle(message: Message) -> Result<(), Error> {
    let mut order: Map<String, Value> = message.json()?;
    let Order { order_id, customer } = serde_json::from_value(Value::Object(order.clone()))
        .map_err(|e| Error::permanent(format!("invalid order: {e}")))?;
    if customer.is_empty()
        || !customer
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::permanent(format!(
            "order {order_id}: customer `{customer}` is not a valid customer id"
        )));
    }
    let base = config::require("customers-url")?;
    let output = config::get("output-topic").unwrap_or_else(|| "orders.enriched".to_owned());
    let response = http::Request::get(format!(
        "{}/customers/{customer}",
        base.trim_end_matches('/')
    ))
    .header("accept", "application/json")
    .send()?;
    if response.status == 404 {
        return Err(Error::permanent(format!(
            "order {order_id}: customer `{customer}` is unknown to the customer service"
        )));
    }
    let profile: Value = response.error_for_status()?.json()?;
    order.insert("customer_profile".to_owned(), profile);
    emit::json(&output, message.key(), &Value::Object(order))?;
    Ok(())
}

weir_sdk::export!(handle);
