//! The one-line progress shown on a terminal while lockctl waits for a lock.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use crate::report::human;

/// Rewrites one stderr line while lockctl waits; silent when stderr is not a terminal or with
/// `-q`.
pub(crate) struct Progress {
    enabled: bool,
    shown: bool,
}

impl Progress {
    pub(crate) fn new(quiet: bool) -> Progress {
        Progress {
            enabled: !quiet && std::io::stderr().is_terminal(),
            shown: false,
        }
    }

    /// Shows how long lockctl has waited for `key`, and why it still waits.
    pub(crate) fn waiting(
        &mut self,
        key: &str,
        waited: Duration,
        holder_remaining: Option<Duration>,
        server_failing: bool,
    ) {
        if !self.enabled {
            return;
        }
        let why = match (server_failing, holder_remaining) {
            (true, _) => "the server does not answer".to_owned(),
            (false, Some(left)) => format!("held for {} more", human(left)),
            (false, None) => "held by another".to_owned(),
        };
        let waited = waited.as_secs();
        // \r: back to the start of the line; \x1b[K: erase what the last line left.
        eprint!("\rlockctl: waiting for {key:?}: {why} (waited {waited}s)\x1b[K");
        let _ = std::io::stderr().flush();
        self.shown = true;
    }

    /// Erases the progress line, if one is shown.
    pub(crate) fn clear(&mut self) {
        if std::mem::take(&mut self.shown) {
            eprint!("\r\x1b[K");
            let _ = std::io::stderr().flush();
        }
    }
}
