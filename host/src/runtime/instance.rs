//! Running a handler: instances, invocations, trap classification, and the instance pool.
//!
//! Owns the rules that make an invocation safe to retry: effects count only if `handle`
//! returned `ok` and the host refused nothing; an instance that trapped is never entered again.
//! Knows nothing of where messages come from or where effects go.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use wasmtime::component::{Func, TypedFunc};
use wasmtime::{Store, Trap, UpdateDeadline};

use super::bindings::HandlerPre;
use super::bindings::weir::handler::types as wit;
use super::component::ContentHash;
use super::host::HostState;
use super::invocation::{ErrorKind, Invocation, InvocationContext, Message, Outcome, TrapKind};
use super::lower::Lowered;
use super::{InstancePolicy, RuntimeShared};

/// Why an instance could not be created (the handler never ran).
#[derive(Debug, thiserror::Error)]
pub enum InstantiateError {
    /// Instantiation failed: the pool is exhausted, a limit was hit by the component's start-up,
    /// or its start function trapped.
    #[error("cannot instantiate handler {hash}: {message}")]
    Failed {
        /// The component's hash.
        hash: ContentHash,
        /// wasmtime's explanation.
        message: String,
    },
    /// The handler imports `wasi:http` but its binding grants no outbound HTTP.
    #[error(
        "handler {hash} imports wasi:http/outgoing-handler, but its binding grants no outbound HTTP; set the binding's `http.allow` to the hosts it may call"
    )]
    HttpNotGranted {
        /// The component's hash.
        hash: ContentHash,
    },
}

/// A validated, compiled handler component, ready to instantiate. Cheap to clone.
#[derive(Clone)]
pub struct HandlerComponent {
    pub(crate) shared: Arc<RuntimeShared>,
    /// Linked without `wasi:http`; `None` when the component imports it.
    pub(crate) pre: Option<HandlerPre<HostState>>,
    /// Linked with `wasi:http`.
    pub(crate) pre_http: HandlerPre<HostState>,
    pub(crate) hash: ContentHash,
    pub(crate) size: usize,
}

impl std::fmt::Debug for HandlerComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerComponent")
            .field("hash", &self.hash)
            .field("size", &self.size)
            .finish()
    }
}

impl HandlerComponent {
    /// The SHA-256 of the component's bytes.
    pub fn hash(&self) -> ContentHash {
        self.hash
    }

    /// Size of the component in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether the component imports `wasi:http` (and so runs only where outbound HTTP is
    /// granted).
    pub fn imports_http(&self) -> bool {
        self.pre.is_none()
    }

    /// Create a fresh instance in its own store, with the runtime's limits, linked without
    /// `wasi:http`.
    pub async fn instantiate(&self) -> Result<HandlerInstance, InstantiateError> {
        self.instantiate_with(false).await
    }

    /// Create a fresh instance; `http` links `wasi:http/outgoing-handler` (each request then
    /// goes through the invocation context's gate).
    pub async fn instantiate_with(&self, http: bool) -> Result<HandlerInstance, InstantiateError> {
        let pre = if http {
            &self.pre_http
        } else {
            self.pre
                .as_ref()
                .ok_or(InstantiateError::HttpNotGranted { hash: self.hash })?
        };
        let mut store = Store::new(pre.engine(), HostState::new(self.shared.config.clone()));
        store.limiter(|state| &mut state.limits);
        store.epoch_deadline_callback(|ctx| {
            if Instant::now() >= ctx.data().deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                // Give the executor back to other tasks once per tick while the guest computes.
                Ok(UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(tokio::task::yield_now()),
                ))
            }
        });
        // Start-up code gets the same deadline as an invocation.
        store.data_mut().deadline = Instant::now() + self.shared.config.deadline();
        store.set_epoch_deadline(1);
        let bindings =
            pre.instantiate_async(&mut store)
                .await
                .map_err(|e| InstantiateError::Failed {
                    hash: self.hash,
                    message: format!("{e:#}"),
                })?;
        self.shared.live_instances.fetch_add(1, Ordering::Relaxed);
        let handle = *bindings.func_handle().func();
        Ok(HandlerInstance {
            store,
            handle,
            invocations: 0,
            dead: false,
            hash: self.hash,
            shared: self.shared.clone(),
        })
    }
}

/// What `handle` returns, as wasmtime lifts it.
type HandleResult = (Result<(), wit::HandlerError>,);

/// One live instance of a handler, with its own store. Serves invocations one at a time.
pub struct HandlerInstance {
    store: Store<HostState>,
    /// The component's `handle` export, type-checked against the contract at instantiation.
    handle: Func,
    invocations: u32,
    dead: bool,
    hash: ContentHash,
    shared: Arc<RuntimeShared>,
}

impl Drop for HandlerInstance {
    fn drop(&mut self) {
        self.shared.live_instances.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HandlerInstance {
    /// The component this instance runs.
    pub fn hash(&self) -> ContentHash {
        self.hash
    }

    /// Whether the instance may serve another invocation (false after a trap).
    pub fn is_alive(&self) -> bool {
        !self.dead
    }

    /// Invocations served so far.
    pub fn invocations(&self) -> u32 {
        self.invocations
    }

    /// Run `handle` for `message`. Never panics on anything the guest does: every failure is an
    /// [`Outcome`]. After a trap the instance is dead; use a new one.
    pub async fn invoke(&mut self, message: &Message, context: &InvocationContext) -> Invocation {
        let started = Instant::now();
        if self.dead {
            return Invocation {
                outcome: Outcome::Trap {
                    kind: TrapKind::Other,
                    message: "instance already trapped and cannot be entered again".to_owned(),
                },
                effects: Default::default(),
                logs: Vec::new(),
                logs_dropped: 0,
                duration: started.elapsed(),
            };
        }
        self.invocations += 1;
        let deadline = context
            .deadline
            .unwrap_or_else(|| self.store.data().config().deadline());
        {
            let data = self.store.data_mut();
            data.begin(message.key.as_deref(), context.clone());
            data.deadline = started + deadline;
            data.set_http_deadline(started + deadline);
        }
        self.store.set_epoch_deadline(1);
        // The epoch interrupts a guest that computes; one that waits in a host call (outbound
        // HTTP, a clock) is cut off here, a little after the epoch would have fired.
        let grace = self.store.data().config().epoch_tick() * 2;
        // SAFETY: `bindgen!` type-checked `handle` with `(&Message,)` for its parameters at
        // instantiation, and `Lowered`'s type is `Message`'s (its `typecheck` is `Message`'s).
        #[allow(unsafe_code)]
        let handle =
            unsafe { TypedFunc::<(Lowered<'_>,), HandleResult>::new_unchecked(self.handle) };
        let result = match (CutOff {
            call: std::pin::pin!(handle.call_async(&mut self.store, (Lowered(message),))),
            at: started + deadline + grace,
            timer: None,
        })
        .await
        {
            Some(result) => result.map(|(result,)| result),
            None => Err(wasmtime::Error::from(Trap::Interrupt)),
        };
        let duration = started.elapsed();
        let call = self.store.data_mut().finish();
        let outcome = match result {
            // A refusal wins over whatever the handler answered: it may have ignored the error.
            Ok(_) if call.refused.is_some() => Outcome::Refused {
                message: call.refused.unwrap_or_default(),
            },
            Ok(Ok(())) => Outcome::Ok,
            Ok(Err(wit::HandlerError::Retryable(message))) => Outcome::HandlerError {
                kind: ErrorKind::Retryable,
                message,
            },
            Ok(Err(wit::HandlerError::Permanent(message))) => Outcome::HandlerError {
                kind: ErrorKind::Permanent,
                message,
            },
            Err(error) => {
                self.dead = true;
                let kind = classify_trap(&error);
                let message = match kind {
                    TrapKind::Deadline => {
                        format!("deadline of {} ms exceeded", deadline.as_millis())
                    }
                    _ => format!("{error:?}"),
                };
                Outcome::Trap { kind, message }
            }
        };
        let effects = if outcome.is_ok() {
            call.effects
        } else {
            Default::default()
        };
        Invocation {
            outcome,
            effects,
            logs: call.logs,
            logs_dropped: call.logs_dropped,
            duration,
        }
    }
}

/// A guest call cut off at `at` (`None` then). The timer is armed only when the call first
/// waits (a guest in a host call that waits on I/O): a call that computes and returns in one
/// poll — most handlers — registers no timer at all, which is a good part of an invocation's
/// cost.
struct CutOff<F> {
    call: F,
    at: Instant,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<F: std::future::Future + Unpin> std::future::Future for CutOff<F> {
    type Output = Option<F::Output>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = &mut *self;
        if let Poll::Ready(output) = std::pin::Pin::new(&mut this.call).poll(cx) {
            return Poll::Ready(Some(output));
        }
        let at = this.at;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at.into())));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// What kind of trap `error` is.
fn classify_trap(error: &wasmtime::Error) -> TrapKind {
    if let Some(trap) = error.downcast_ref::<Trap>() {
        return match trap {
            Trap::Interrupt => TrapKind::Deadline,
            Trap::StackOverflow => TrapKind::StackOverflow,
            Trap::UnreachableCodeReached => TrapKind::Unreachable,
            Trap::AllocationTooLarge => TrapKind::Memory,
            _ => TrapKind::Other,
        };
    }
    // `StoreLimits` with `trap_on_grow_failure` reports refused growth as a plain error.
    let text = format!("{error:#}");
    let refused_growth = [
        "forcing trap when growing memory",
        "forcing a memory growth failure",
        "growing table",
    ];
    if refused_growth.iter().any(|needle| text.contains(needle)) {
        TrapKind::Memory
    } else {
        TrapKind::Other
    }
}

/// Instances of one component, handed out one per invocation.
///
/// With [`InstancePolicy::Reuse`] an instance goes back to the pool after an invocation that
/// did not trap, until it has served `max_invocations_per_instance`; with
/// [`InstancePolicy::Fresh`] every invocation gets a new instance. Idle instances are bounded.
/// A pool whose version was replaced is [retired](Self::retire): it keeps no idle instances,
/// so the instance slots it held go to the version that replaced it.
pub struct HandlerPool {
    component: HandlerComponent,
    http: bool,
    idle: Mutex<Vec<HandlerInstance>>,
    max_idle: usize,
    retired: AtomicBool,
}

impl HandlerPool {
    /// A pool for `component` keeping at most `max_idle` idle instances.
    pub fn new(component: HandlerComponent, max_idle: usize) -> Self {
        Self {
            component,
            http: false,
            idle: Mutex::new(Vec::new()),
            max_idle,
            retired: AtomicBool::new(false),
        }
    }

    /// Link `wasi:http/outgoing-handler` into the pool's instances: for a binding that grants
    /// outbound HTTP (its requests go through the invocation context's gate).
    pub fn granting_http(mut self) -> Self {
        self.http = true;
        self
    }

    /// Keep no idle instances any more: drop those held now, and let each running
    /// invocation's instance go when it ends. For a version that was swapped out: invocations
    /// still running on it finish, while its instance slots (bounded across all handlers by the
    /// pooling allocator) are freed for the version that replaced it.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        // The flag is checked under this lock, so no instance is put back after this.
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        drop(idle);
    }

    /// The component the pool runs.
    pub fn component(&self) -> &HandlerComponent {
        &self.component
    }

    /// Run one invocation on an idle instance, or a fresh one.
    pub async fn invoke(
        &self,
        message: &Message,
        context: &InvocationContext,
    ) -> Result<Invocation, InstantiateError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut instance = match idle {
            Some(instance) => instance,
            None => self.component.instantiate_with(self.http).await?,
        };
        let invocation = instance.invoke(message, context).await;
        let config = &self.component.shared.config;
        if config.instance_policy == InstancePolicy::Reuse
            && instance.is_alive()
            && instance.invocations() < config.max_invocations_per_instance
        {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < self.max_idle && !self.retired.load(Ordering::Relaxed) {
                idle.push(instance);
            }
        }
        Ok(invocation)
    }

    /// Idle instances held right now.
    pub fn idle(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}
