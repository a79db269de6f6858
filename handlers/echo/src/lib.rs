//! `echo`: forwards each message — payload, key and headers — to the topic named by the
//! binding's `output-topic` setting.
//!
//! A binding without `output-topic` fails every message permanently, naming the setting.

use weir_sdk::{Error, Message, config, emit};

/// Forward `message` unchanged to `output-topic`.
fn handle(message: Message) -> Result<(), Error> {
    let topic = config::require("output-topic")?;
    let headers: Vec<(&str, &[u8])> = message
        .headers()
        .iter()
        .map(|header| (header.key.as_str(), header.value.as_slice()))
        .collect();
    emit::send_with_headers(&topic, message.key(), message.payload(), &headers)
}

weir_sdk::export!(handle);
