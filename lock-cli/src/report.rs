//! How lockctl reports: a [`Failure`] is one line on stderr and an exit code.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use crate::exit;

/// Why lockctl stops: the exit code, and one line for stderr (without the `lockctl: ` prefix).
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line, whatever a server put in its messages.
        f.write_str(&self.message.replace(['\n', '\r'], " "))
    }
}

/// `error`'s message and those of its sources, joined by `": "` on one line. The libraries'
/// messages contain no password and do not repeat their source, but a Redis error can repeat
/// itself as its own source: a cause whose message the line already ends with is left out.
pub(crate) fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.ends_with(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

/// The exit code for a library error: a usage error for bad input (an empty key, a TTL out of
/// range, a bad setting), otherwise the server could not be used.
pub(crate) fn code_of(error: &lock_core::Error) -> u8 {
    if error.is_invalid_input() {
        exit::USAGE
    } else {
        exit::UNAVAILABLE
    }
}

/// A duration as people read it in a one-line message: `12.3s`, or `250ms` under a second.
pub(crate) fn human(duration: Duration) -> String {
    if duration < Duration::from_secs(1) {
        format!("{}ms", duration.as_millis())
    } else {
        format!("{:.1}s", duration.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(human(Duration::from_millis(250)), "250ms");
        assert_eq!(human(Duration::from_millis(12_340)), "12.3s");
    }

    #[test]
    fn failures_print_on_one_line() {
        let failure = Failure::new(exit::UNAVAILABLE, "first\nsecond");
        assert_eq!(failure.to_string(), "first second");
    }

    #[test]
    fn chains_show_every_cause_once() {
        let cause = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let error = lock_core::Error::Backend(lock_core::BackendError::transient(cause));
        assert_eq!(chain(&error), "transient backend error: refused");
        assert_eq!(code_of(&error), exit::UNAVAILABLE);
    }

    #[test]
    fn a_cause_that_repeats_the_line_is_left_out() {
        #[derive(Debug)]
        struct Echo(Option<Box<Echo>>);
        impl fmt::Display for Echo {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("NOAUTH: Authentication required.")
            }
        }
        impl StdError for Echo {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                self.0
                    .as_deref()
                    .map(|echo| echo as &(dyn StdError + 'static))
            }
        }
        let error = Echo(Some(Box::new(Echo(None))));
        assert_eq!(chain(&error), "NOAUTH: Authentication required.");
    }
}
