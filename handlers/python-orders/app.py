"""Weir `orders` handler, ported to Python (built with componentize-py).

The component implements the world `handler` of `weir:handler@0.1.0` (see `wit/handler.wit`).
componentize-py generates the `wit_world` package on the fly at build time; nothing generated
is kept in the repository.

For each message it:
  1. refuses messages without a key (permanent error: there is no keyed state without a key);
  2. parses the payload as a JSON order and validates its fields (permanent error naming the
     field on failure);
  3. reads keyed state "orders" (a JSON number), adds one, and writes it back;
  4. emits an `order-accepted` event to the binding's `output-topic` setting (default
     "orders.accepted"), keyed with the message key;
  5. logs one info line (fields `order_id`, `count`) and prints one line to stdout.

Error convention (componentize-py 0.25): an exported function whose WIT result is
`result<_, handler-error>` returns `None` for `ok` and raises
`componentize_py_types.Err(<HandlerError_* value>)` for `err`. Imported functions returning a
`result` raise `Err(<their error variant>)` in the same way. Any other exception escaping
`handle` traps the component, which the host treats like a permanent error.
"""

import json

from componentize_py_types import Err
import wit_world
from wit_world.imports import config, emit, log, state
from wit_world.imports.types import (
    HandlerError_Permanent,
    HandlerError_Retryable,
    Message,
)

DEFAULT_OUTPUT_TOPIC = "orders.accepted"
STATE_NAME = "orders"
_I64_MAX = 2**63 - 1


def _permanent(reason: str) -> Err:
    return Err(HandlerError_Permanent(reason))


def _retryable(reason: str) -> Err:
    return Err(HandlerError_Retryable(reason))


def _parse_order(payload: bytes) -> dict:
    """Parse and validate the order; raise a permanent error naming the offending field."""
    try:
        order = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _permanent(f"invalid order: payload is not UTF-8: {e}")
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise _permanent(f"invalid order: payload is not valid JSON: {e}")
    if not isinstance(order, dict):
        raise _permanent("invalid order: payload must be a JSON object")

    order_id = order.get("order_id")
    if not isinstance(order_id, str) or order_id == "":
        raise _permanent("invalid order: field `order_id` must be a non-empty string")

    customer = order.get("customer")
    if not isinstance(customer, str):
        raise _permanent("invalid order: field `customer` must be a string")

    amount = order.get("amount_cents")
    # bool is a subclass of int in Python; JSON true/false is not an amount.
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise _permanent("invalid order: field `amount_cents` must be an integer")
    if amount <= 0:
        raise _permanent("invalid order: field `amount_cents` must be greater than 0")
    if amount > _I64_MAX:  # Python ints are unbounded; keep to the i64 range other ports use
        raise _permanent("invalid order: field `amount_cents` is out of range")

    items = order.get("items")
    if items is not None and not isinstance(items, list):
        raise _permanent("invalid order: field `items` must be a list when present")

    return {"order_id": order_id, "customer": customer, "amount_cents": amount}


def _state_error(op: str, err) -> Err:
    """Map a `state-error` to a handler error: `unavailable` is worth retrying, the rest not."""
    kind = type(err).__name__.removeprefix("StateError_")
    detail = getattr(err, "value", None)
    reason = f"state {op} {STATE_NAME!r} failed: {kind}" + (f": {detail}" if detail else "")
    if isinstance(err, state.StateError_Unavailable):
        return _retryable(reason)
    return _permanent(reason)


def _read_count() -> int:
    try:
        raw = state.get(STATE_NAME)
    except Err as e:
        raise _state_error("get", e.value)
    if raw is None:
        return 0
    try:
        count = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _permanent(f"state {STATE_NAME!r} is not a JSON number: {raw[:64]!r}")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise _permanent(f"state {STATE_NAME!r} is not a non-negative integer: {raw[:64]!r}")
    return count


class WitWorld(wit_world.WitWorld):
    """The exported world: componentize-py calls `WitWorld().handle(message)`."""

    def handle(self, message: Message) -> None:
        if message.key is None:
            raise _permanent("message has no key: orders are counted per customer key")

        order = _parse_order(message.payload)

        count = _read_count() + 1
        try:
            state.set(STATE_NAME, json.dumps(count).encode("utf-8"))
        except Err as e:
            raise _state_error("set", e.value)

        topic = config.get("output-topic")
        if topic is None:
            topic = DEFAULT_OUTPUT_TOPIC
        event = {
            "type": "order-accepted",
            "order_id": order["order_id"],
            "customer": order["customer"],
            "amount_cents": order["amount_cents"],
            "customer_order_count": count,
            "source_message_id": message.id,
        }
        try:
            emit.send(topic, message.key, json.dumps(event).encode("utf-8"), [])
        except Err as e:
            err = e.value
            kind = type(err).__name__.removeprefix("EmitError_")
            raise _permanent(f"emit to {topic!r} refused: {kind}: {err.value}")

        log.write(
            log.Level.INFO,
            "order accepted",
            [
                log.Field(name="order_id", value=order["order_id"]),
                log.Field(name="count", value=str(count)),
            ],
        )
        # Deliberately on stdout: checks that the host routes WASI stdout to the handler log.
        print(f"python-orders: accepted order {order['order_id']} (customer order #{count})")
