//! `orders`: validates JSON orders, counts them per key and announces each accepted one.
//!
//! The payload is `{"order_id": string (non-empty), "customer": string, "amount_cents":
//! integer > 0, "items": optional array}`; other fields are ignored. Malformed JSON and invalid
//! fields are permanent errors naming the field. The message key (normally the customer) is
//! required: it addresses the keyed state `orders`, a JSON number counting the key's accepted
//! orders. Each accepted order is emitted with the message key to the topic in setting
//! `output-topic` (default `orders.accepted`) as
//! `{"type": "order-accepted", "order_id", "customer", "amount_cents",
//! "customer_order_count", "source_message_id"}`.

use serde::Serialize;
use serde_json::{Map, Value};
use weir_sdk::{Error, Message, config, emit, log, state};

/// Where accepted orders go when the binding does not set `output-topic`.
const DEFAULT_OUTPUT_TOPIC: &str = "orders.accepted";

/// Keyed-state name of the per-key order counter.
const COUNTER: &str = "orders";

/// A validated order.
struct Order {
    order_id: String,
    customer: String,
    amount_cents: u64,
}

/// The event emitted for an accepted order.
#[derive(Serialize)]
struct OrderAccepted<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    order_id: &'a str,
    customer: &'a str,
    amount_cents: u64,
    customer_order_count: u64,
    source_message_id: &'a str,
}

fn handle(message: Message) -> Result<(), Error> {
    let Some(key) = message.key() else {
        return Err(Error::permanent(
            "orders: message has no key (the per-key order count needs one; key orders by customer)",
        ));
    };
    let order = parse(&message)?;

    let count = state::get_json::<u64>(COUNTER)?
        .unwrap_or(0)
        .saturating_add(1);
    state::set_json(COUNTER, &count)?;

    let topic = config::get("output-topic").unwrap_or_else(|| DEFAULT_OUTPUT_TOPIC.to_owned());
    let event = OrderAccepted {
        kind: "order-accepted",
        order_id: &order.order_id,
        customer: &order.customer,
        amount_cents: order.amount_cents,
        customer_order_count: count,
        source_message_id: message.id(),
    };
    emit::json(&topic, Some(key), &event)?;

    log::write(
        log::Level::Info,
        "order accepted",
        &[("order_id", &order.order_id), ("count", &count.to_string())],
    );
    Ok(())
}

/// Validate the payload, naming the first field that is wrong.
fn parse(message: &Message) -> Result<Order, Error> {
    let value: Value = message.json()?;
    let Value::Object(fields) = value else {
        return Err(invalid("payload must be a JSON object"));
    };

    let order_id = string_field(&fields, "order_id")?;
    if order_id.is_empty() {
        return Err(invalid("field `order_id` must not be empty"));
    }
    let customer = string_field(&fields, "customer")?;
    let amount_cents = match fields.get("amount_cents") {
        None => return Err(invalid("missing field `amount_cents`")),
        Some(amount) => amount
            .as_u64()
            .filter(|&cents| cents > 0)
            .ok_or_else(|| invalid("field `amount_cents` must be an integer greater than 0"))?,
    };
    match fields.get("items") {
        None | Some(Value::Null | Value::Array(_)) => {}
        Some(_) => return Err(invalid("field `items` must be an array")),
    }

    Ok(Order {
        order_id,
        customer,
        amount_cents,
    })
}

fn string_field(fields: &Map<String, Value>, name: &str) -> Result<String, Error> {
    match fields.get(name) {
        None => Err(invalid(&format!("missing field `{name}`"))),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(_) => Err(invalid(&format!("field `{name}` must be a string"))),
    }
}

fn invalid(why: &str) -> Error {
    Error::permanent(format!("invalid order: {why}"))
}

weir_sdk::export!(handle);
