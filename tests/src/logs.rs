//! What the libraries log through `tracing`, captured for tests that check it.
//!
//! [`captured_logs`] installs, once per process, a global subscriber that keeps every event at
//! `INFO` level or above as one line of text. Tests running in parallel in one process (`cargo
//! test`) share it, so a test looks only at the lines that name something of its own, such as
//! its server's port.

use std::io;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use tracing_subscriber::fmt::MakeWriter;

/// The text logged by this process since [`captured_logs`] was first called.
#[derive(Debug, Clone)]
pub struct CapturedLogs {
    text: Arc<Mutex<Vec<u8>>>,
}

impl CapturedLogs {
    /// The logged lines that contain `needle`.
    pub fn lines_containing(&self, needle: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.text.lock())
            .lines()
            .filter(|line| line.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

impl io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.text.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;

    fn make_writer(&'a self) -> CapturedLogs {
        self.clone()
    }
}

/// The process's log capture, installed on first use.
///
/// # Panics
///
/// If another global `tracing` subscriber was installed first.
pub fn captured_logs() -> CapturedLogs {
    static LOGS: OnceLock<CapturedLogs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = CapturedLogs {
            text: Arc::new(Mutex::new(Vec::new())),
        };
        tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
            .try_init()
            .expect("no other global tracing subscriber is installed");
        logs
    })
    .clone()
}
