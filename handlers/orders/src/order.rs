//! The logic of `orders`, shared with its second version (`handlers/fixtures/orders-v2`,
//! which includes this file): validate an order, count it under the message key, announce it.
//! Everything but the payload format and the version mark is the same in both versions, so a
//! binding switched from one to the other keeps counting where it was.

use serde::Serialize;
use serde_json::{Map, Value};
use weir_sdk::{Error, Message, config, emit, log, state};

/// Where accepted orders go when the binding does not set `output-topic`.
const DEFAULT_OUTPUT_TOPIC: &str = "orders.accepted";

/// Keyed-state name of the per-key order counter.
const COUNTER: &str = "orders";

/// A validated order.
pub struct Order {
    /// Non-empty order id.
    pub order_id: String,
    /// The customer it belongs to.
    pub customer: String,
    /// Amount, greater than 0.
    pub amount_cents: u64,
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
    /// Set by versions after the first, so their events can be told apart.
    #[serde(skip_serializing_if = "Option::is_none")]
    handler_version: Option<u32>,
}

/// Handle `message`: require a key, `parse` the payload, count the order under the key and
/// emit its event (marked with `handler_version`, when given).
pub fn handle(
    message: &Message,
    parse: fn(&Message) -> Result<Order, Error>,
    handler_version: Option<u32>,
) -> Result<(), Error> {
    let Some(key) = message.key() else {
        return Err(Error::permanent(
            "orders: message has no key (the per-key order count needs one; key orders by customer)",
        ));
    };
    let order = parse(message)?;

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
        handler_version,
    };
    emit::json(&topic, Some(key), &event)?;

    log::write(
        log::Level::Info,
        "order accepted",
        &[("order_id", &order.order_id), ("count", &count.to_string())],
    );
    Ok(())
}

/// Validate a JSON payload, naming the first field that is wrong.
pub fn parse_json(message: &Message) -> Result<Order, Error> {
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

/// A permanent error for an invalid order.
pub fn invalid(why: &str) -> Error {
    Error::permanent(format!("invalid order: {why}"))
}
