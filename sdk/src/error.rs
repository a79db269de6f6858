//! [`Error`]: a handler's answer when it did not handle a message.

use std::fmt;

use crate::bindings::HandlerError;
use crate::bindings::weir::handler::emit::EmitError;
use crate::bindings::weir::handler::state::StateError;

/// Why a handler did not handle a message, and whether trying again could help.
///
/// Returning an error discards everything the invocation emitted or wrote. A
/// [retryable](Error::retryable) error is retried with the binding's backoff (only this
/// message's key waits) and dead-lettered after the last attempt; a
/// [permanent](Error::permanent) one is dead-lettered at once. The message is kept in logs and
/// in the dead-letter entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    retryable: bool,
    message: String,
}

impl Error {
    /// A transient failure, e.g. a dependency that is down: the message is worth trying again.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            retryable: true,
            message: message.into(),
        }
    }

    /// A failure that no retry can fix, e.g. a malformed message.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            retryable: false,
            message: message.into(),
        }
    }

    /// Whether the host should retry the message.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// Whether the message goes to the dead-letter topic at once.
    pub fn is_permanent(&self) -> bool {
        !self.retryable
    }

    /// What went wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<Error> for HandlerError {
    fn from(error: Error) -> Self {
        if error.retryable {
            HandlerError::Retryable(error.message)
        } else {
            HandlerError::Permanent(error.message)
        }
    }
}

/// A refused emit is permanent: the host fails the invocation whatever the handler returns.
impl From<EmitError> for Error {
    fn from(error: EmitError) -> Self {
        Error::permanent(match error {
            EmitError::TopicNotAllowed(why) => format!("emit refused, topic not allowed: {why}"),
            EmitError::TooLarge(why) => format!("emit refused, message too large: {why}"),
            EmitError::LimitExceeded(why) => format!("emit refused, limit exceeded: {why}"),
        })
    }
}

/// A refused state operation is permanent; an unavailable state store is retryable.
impl From<StateError> for Error {
    fn from(error: StateError) -> Self {
        match error {
            StateError::NoKey => {
                Error::permanent("state refused: the message has no key, so it has no keyed state")
            }
            StateError::TooLarge(why) => {
                Error::permanent(format!("state refused, too large: {why}"))
            }
            StateError::LimitExceeded(why) => {
                Error::permanent(format!("state refused, limit exceeded: {why}"))
            }
            StateError::Unavailable(why) => Error::retryable(format!("state unavailable: {why}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_reach_the_host_unchanged() {
        let retry = HandlerError::from(Error::retryable("db down"));
        assert!(matches!(retry, HandlerError::Retryable(m) if m == "db down"));
        let perm = HandlerError::from(Error::permanent("bad"));
        assert!(matches!(perm, HandlerError::Permanent(m) if m == "bad"));
    }

    #[test]
    fn refused_effects_are_permanent_and_unavailable_state_is_retryable() {
        assert!(Error::from(EmitError::TooLarge("2 MiB > 1 MiB".into())).is_permanent());
        assert!(Error::from(StateError::NoKey).is_permanent());
        assert!(Error::from(StateError::LimitExceeded("x".into())).is_permanent());
        let unavailable = Error::from(StateError::Unavailable("timeout".into()));
        assert!(unavailable.is_retryable());
        assert_eq!(unavailable.to_string(), "state unavailable: timeout");
    }
}
