//! The pipeline: what happens to a message between Kafka and an exactly-once commit.
//!
//! A binding's messages pass through five stages:
//!
//! 1. **Intake** ([`intake`]) reads the binding's partitions on the consumer's own thread and
//!    hands batches of messages to the worker, which records each received offset in its
//!    [`OffsetTracker`] and pushes the message into the dispatcher. When the dispatcher holds as
//!    many messages as the worker allows (the store is down, the handler is slow), intake pauses
//!    the partitions and keeps polling, so the consumer stays in its group; a [`PauseSwitch`]
//!    pauses it from above.
//! 2. **Dispatch** ([`KeyScheduler`]) decides which messages may run now: one at a time per key
//!    (or per partition), in offset order, up to `max_in_flight` at once.
//! 3. **Invoke** runs the handler in the sandbox ([`crate::runtime`]), on the version in the
//!    binding's [`HandlerSlot`] when the message is dispatched (a version activated meanwhile
//!    is swapped in there, without restarting anything). A failure goes to the binding's
//!    [`RetryPolicy`]: wait and run again while the key stays occupied, or dead-letter. The
//!    binding's [`Breaker`] sees every outcome: after too many consecutive retryable failures it
//!    opens, the partitions pause and failing messages wait without spending attempts. Before
//!    a message is dispatched it takes a token of its tenant's [`rate_limit`] bucket, shared by
//!    the tenant's bindings on this host; without one, dispatch waits and intake pauses by
//!    backpressure.
//! 4. **Group commit** writes many messages' effects and processed keys in one PostgreSQL
//!    transaction (or the DLQ entry), each message all-or-nothing; then the message's dispatch
//!    ticket is finished and its offset completed.
//! 5. **Offsets** stores, per partition, the highest contiguous completed offset
//!    ([`OffsetTracker::committable`]).
//!
//! DLQ entries queued for replay enter at stage 2: the worker claims them from the store and
//! pushes each into the lane of its key on its original partition, so a replay is ordered,
//! retried and committed like any message, except that it has no offset to store.
//!
//! This module holds the pipeline's pure core — [`offsets`], [`dispatch`], [`retry`],
//! [`breaker`], the worker's ticket table [`slots`] and the token bucket of [`rate_limit`]:
//! synchronous data structures, each owned by one task, with no locks, no I/O and no clock.
//! They know nothing of Kafka, PostgreSQL or wasmtime, so they are tested in isolation (with
//! property tests) and cost little on the hot path. The stages that do I/O drive them.

pub mod binding;
pub mod breaker;
pub mod dispatch;
pub mod handler;
pub mod intake;
pub mod offsets;
pub mod rate_limit;
pub mod retry;
pub mod slots;
pub mod trace;
pub mod worker;

pub use binding::{BindingError, BindingSpec};
pub use breaker::{Breaker, BreakerPolicy, BreakerState};
pub use dispatch::{KeyScheduler, Ordering, Ticket};
pub use handler::{ActiveHandler, HandlerSlot};
pub use intake::PauseSwitch;
pub use offsets::{OffsetError, OffsetTracker, PartitionOffsets};
pub use retry::{Decision, FailureKind, JitterRng, RetryPolicy, RetryPolicyError};
