//! lockctl's exit codes: one table, shown by `--help` and copied in the README (a test keeps
//! the two the same).

use std::process::ExitStatus;

/// The command line is wrong: an unknown flag, a bad duration or URL, a zero TTL, no command
/// (`EX_USAGE`).
pub(crate) const USAGE: u8 = 64;
/// The lock server could not be used: unreachable, silent, wrong password, missing rights
/// (`EX_UNAVAILABLE`).
pub(crate) const UNAVAILABLE: u8 = 69;
/// The operating system refused what lockctl needed to start or watch the command (`EX_OSERR`).
pub(crate) const OS_ERROR: u8 = 71;
/// The default of `--conflict-exit-code`: the lock was held by another holder for all of
/// `--wait` (`EX_TEMPFAIL`: try again later).
pub(crate) const CONFLICT: u8 = 75;
/// The lease was lost while the command ran, and the command was stopped.
pub(crate) const LOST: u8 = 76;
/// Shells' code for a command that was found but could not be executed.
pub(crate) const CANNOT_EXECUTE: u8 = 126;
/// Shells' code for a command that was not found.
pub(crate) const NOT_FOUND: u8 = 127;

/// Every exit code and what it means, in the order `--help` and the README show them.
pub(crate) const TABLE: &[(&str, &str)] = &[
    ("0", "the command succeeded (run); the key was read or deleted (status, release --force)"),
    ("1-255", "run: the command's own exit status, passed through"),
    ("128+N", "run: the command died of signal N (137 for SIGKILL), as shells report it; also lockctl itself, interrupted by signal N while waiting for the lock"),
    ("64", "bad command line: unknown flag, bad duration or URL, zero TTL, no command"),
    ("69", "the lock server could not be used: unreachable, silent, wrong password, missing rights"),
    ("71", "run: the operating system refused to start or watch the command"),
    ("75", "run: another holder kept the lock for all of --wait (change it with --conflict-exit-code)"),
    ("76", "run: the lease was lost while the command ran: the command got SIGTERM, then SIGKILL after --kill-after"),
    ("126", "run: the command was found but could not be executed"),
    ("127", "run: the command was not found"),
];

/// The widest line of `--help` (clap's `max_term_width`): the table is wrapped to it here, with
/// a hanging indent, so that clap has nothing left to wrap.
pub(crate) const HELP_WIDTH: usize = 100;

/// The table as `--help` prints it, after the options.
pub(crate) fn help_table() -> String {
    let width = TABLE.iter().map(|(code, _)| code.len()).max().unwrap_or(0);
    let indent = " ".repeat(2 + width + 2);
    let mut text = String::from("Exit codes:\n");
    for (code, meaning) in TABLE {
        let mut line = format!("  {code:<width$} ");
        for word in meaning.split(' ') {
            if line.len() + 1 + word.len() > HELP_WIDTH {
                text.push_str(&line);
                text.push('\n');
                line = indent.clone();
                line.push_str(word);
            } else {
                line.push(' ');
                line.push_str(word);
            }
        }
        text.push_str(&line);
        text.push('\n');
    }
    text
}

/// The code lockctl exits with for a command that ended with `status`: its exit code, or
/// 128 + the signal that killed it.
pub(crate) fn of_status(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        // Exit codes are 0-255 on Unix; the fallback never happens.
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => of_signal(signal),
        (None, None) => 1,
    }
}

/// 128 + `signal`, as shells report a death by signal.
pub(crate) fn of_signal(signal: i32) -> u8 {
    u8::try_from(128 + signal).unwrap_or(u8::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn statuses_pass_through_as_shells_report_them() {
        assert_eq!(of_status(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(of_status(ExitStatus::from_raw(0)), 0);
        assert_eq!(of_status(ExitStatus::from_raw(9)), 137, "SIGKILL");
        assert_eq!(of_status(ExitStatus::from_raw(15)), 143, "SIGTERM");
    }

    #[test]
    fn the_help_table_fits_the_help_width() {
        let table = help_table();
        assert!(
            table.lines().all(|line| line.len() <= HELP_WIDTH),
            "{table}"
        );
        assert!(
            table.contains("\n  76     run: the lease was lost"),
            "{table}"
        );
    }

    #[test]
    fn the_codes_named_here_are_in_the_table() {
        for code in [
            USAGE,
            UNAVAILABLE,
            OS_ERROR,
            CONFLICT,
            LOST,
            CANNOT_EXECUTE,
            NOT_FOUND,
        ] {
            assert!(
                TABLE.iter().any(|(row, _)| *row == code.to_string()),
                "{code} is not in the table"
            );
        }
    }

    /// The README's "Command line" section carries the same table, row for row.
    #[test]
    fn the_readme_shows_the_same_table() {
        let readme = include_str!("../../README.md");
        for (code, meaning) in TABLE {
            let row = format!("| {code} | {meaning} |");
            assert!(readme.contains(&row), "README.md lacks the row\n{row}");
        }
    }
}
