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
//!
//! The logic lives in `order.rs`, which the test fixture `orders-v2` shares.

mod order;

use weir_sdk::{Error, Message};

fn handle(message: Message) -> Result<(), Error> {
    order::handle(&message, order::parse_json, None)
}

weir_sdk::export!(handle);
