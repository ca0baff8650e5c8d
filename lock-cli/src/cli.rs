//! The command line: what each subcommand and flag means, parsed by clap.

use std::ffi::OsString;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::exit;

/// Where `--redis` comes from when it is not given.
pub(crate) const REDIS_URL_ENV: &str = "LOCK_REDIS_URL";
/// The server used when neither `--redis` nor `LOCK_REDIS_URL` names one.
pub(crate) const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Run a command under a lock held in Redis: a distributed flock.
///
/// The lock is a lease with a TTL, renewed while the command runs and released when it exits, so
/// a crashed host frees it by itself. The command gets LOCK_KEY and LOCK_FENCE in its
/// environment: the fence strictly increases from one holder to the next, so the systems it
/// writes to can refuse a stale holder. If the lease is lost (the server is unreachable past the
/// TTL, or an operator forced it free), the command is stopped at once: SIGTERM to its process
/// group, SIGKILL after --kill-after.
#[derive(Debug, Parser)]
#[command(name = "lockctl", version, max_term_width = exit::HELP_WIDTH)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) server: ServerArgs,

    /// Print no progress line while waiting for the lock (errors and warnings still print).
    #[arg(short, long, global = true)]
    pub(crate) quiet: bool,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Which servers hold the locks, and how long each call may take.
#[derive(Debug, Args)]
#[command(next_help_heading = "Servers")]
pub(crate) struct ServerArgs {
    /// The Redis server that holds the locks (the help text spells out the URL forms).
    #[arg(
        long,
        global = true,
        value_name = "URL",
        conflicts_with = "redlock",
        help = "The Redis server that holds the locks: redis://[USER][:PASSWORD@]HOST[:PORT][/DB] \
                or unix:///PATH/redis.sock [default: $LOCK_REDIS_URL, else \
                redis://127.0.0.1:6379]. Passwords are never printed"
    )]
    pub(crate) redis: Option<String>,

    /// Redlock instead: hold each lock on a majority of these independent Redis masters
    /// (comma-separated URLs, three or five of them), so one node's failure neither loses nor
    /// blocks it.
    #[arg(long, global = true, value_name = "URL,URL,...", value_delimiter = ',')]
    pub(crate) redlock: Vec<String>,

    /// The prefix of every Redis key lockctl writes: the lock KEY is stored as PREFIX{KEY}.
    #[arg(long, global = true, value_name = "PREFIX", default_value = "lock:")]
    pub(crate) prefix: String,

    /// The longest one call to a server may take (connect, connection checkout, command)
    /// [default: 2s per step on Redis, 250ms per node on Redlock].
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) timeout: Option<Duration>,
}

/// lockctl's subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Acquire KEY, run COMMAND while the lease is renewed, release it when COMMAND exits, and
    /// exit with COMMAND's status.
    Run(RunArgs),
    /// Say whether KEY is held, for how much longer, and its current fence.
    Status(StatusArgs),
    /// Delete KEY whatever holds it (for operators freeing a stuck lock). Its holder finds out
    /// at its next renewal; the next holder still gets a higher fence.
    Release(ReleaseArgs),
}

/// What `lockctl run --help` shows before the exit codes.
const RUN_EXAMPLES: &str = "Examples:
  lockctl run nightly-report --ttl 1m -- ./report.sh --all
  lockctl run deploy --wait forever -- make deploy
  lockctl run backup --no-wait -q -- pg_dump -f /backup/db.sql db
";

/// `lockctl run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The lock's name: every lockctl that names the same KEY on the same servers excludes the
    /// others.
    pub(crate) key: String,

    /// The lease's time to live: how long a lockctl that dies without releasing (a crashed
    /// host) keeps others out. Renewed every third of it while COMMAND runs.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub(crate) ttl: Duration,

    /// How long to wait for the lock while another holder has it: a duration, or `forever`.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_wait)]
    pub(crate) wait: Duration,

    /// Do not wait: fail at once if another holder has the lock (same as --wait 0s).
    #[arg(long, conflicts_with = "wait")]
    pub(crate) no_wait: bool,

    /// When the lease is lost: how long COMMAND has to exit after SIGTERM before its process
    /// group gets SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub(crate) kill_after: Duration,

    /// The exit code when the lock could not be had within --wait.
    #[arg(long, value_name = "CODE", default_value_t = exit::CONFLICT)]
    pub(crate) conflict_exit_code: u8,

    /// The command to run and its arguments (after `--` if an argument starts with `-`). It
    /// gets LOCK_KEY and LOCK_FENCE in its environment and runs in a process group of its own.
    #[arg(value_name = "COMMAND", required = true, trailing_var_arg = true)]
    pub(crate) command: Vec<OsString>,
}

impl RunArgs {
    /// How long to wait for the lock: `Duration::ZERO` with `--no-wait`, `Duration::MAX` for
    /// `--wait forever`.
    pub(crate) fn wait(&self) -> Duration {
        if self.no_wait {
            Duration::ZERO
        } else {
            self.wait
        }
    }
}

/// `lockctl status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The lock's name.
    pub(crate) key: String,

    /// Print one JSON object for scripts: {"key", "held", "remaining_ms", "fence"}.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `lockctl release`.
#[derive(Debug, Args)]
pub(crate) struct ReleaseArgs {
    /// The lock's name.
    pub(crate) key: String,

    /// Required: confirms that the lock is to be deleted whatever holds it. Its holder may work
    /// unprotected until its next renewal finds the lease lost.
    #[arg(long, required = true)]
    pub(crate) force: bool,
}

/// What the command line asks for, or what to print and the code to exit with instead (help,
/// version, or a usage error).
pub(crate) enum Parsed {
    Cli(Cli),
    Exit {
        code: u8,
        stdout: String,
        stderr: String,
    },
}

/// Parses `args` (the program name first). Help and version go to stdout with code 0; a usage
/// error is one line on stderr, with code [`exit::USAGE`].
pub(crate) fn parse(args: impl IntoIterator<Item = OsString>) -> Parsed {
    let command = Cli::command()
        .after_help(exit::help_table())
        .mut_subcommand("run", |run| {
            run.after_help(format!("{RUN_EXAMPLES}\n{}", exit::help_table()))
        });
    let error = match command
        .try_get_matches_from(args)
        .and_then(|matches| Cli::from_arg_matches(&matches))
    {
        Ok(cli) => return Parsed::Cli(cli),
        Err(error) => error,
    };
    let rendered = error.render().to_string();
    if !error.use_stderr() {
        // --help or --version.
        return Parsed::Exit {
            code: 0,
            stdout: rendered,
            stderr: String::new(),
        };
    }
    let what = redact_urls(&first_paragraph(&rendered));
    Parsed::Exit {
        code: exit::USAGE,
        stdout: String::new(),
        stderr: format!("lockctl: {what} (see lockctl --help)\n"),
    }
}

/// `text` with the password of every URL in it redacted: clap echoes a misplaced argument, and
/// that may be a URL with a password.
fn redact_urls(text: &str) -> String {
    let words: Vec<String> = text
        .split(' ')
        .map(|word| {
            if !word.contains("://") {
                return word.to_owned();
            }
            let quotes: &[char] = &['\'', '"'];
            let url = word.trim_matches(quotes);
            word.replace(url, &lock_redis::redact_url(url))
        })
        .collect();
    words.join(" ")
}

/// What clap says is wrong, on one line: the first paragraph of its message (the usage and tips
/// after it are what `--help` shows), without its `error: ` prefix.
fn first_paragraph(rendered: &str) -> String {
    let words: Vec<&str> = rendered
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .flat_map(str::split_whitespace)
        .collect();
    let text = words.join(" ");
    match text.strip_prefix("error: ") {
        Some(what) => what.to_owned(),
        None => text,
    }
}

/// A duration such as `500ms`, `30s`, `5m` or `1h 30m` (humantime's syntax).
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|error| error.to_string())
}

/// A duration, or `forever` (no deadline).
fn parse_wait(text: &str) -> Result<Duration, String> {
    match text {
        "forever" => Ok(Duration::MAX),
        text => parse_duration(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(args: &[&str]) -> Cli {
        match parse(args.iter().map(OsString::from)) {
            Parsed::Cli(cli) => cli,
            Parsed::Exit { stderr, .. } => panic!("{args:?}: {stderr}"),
        }
    }

    fn usage_error(args: &[&str]) -> String {
        match parse(args.iter().map(OsString::from)) {
            Parsed::Cli(cli) => panic!("{args:?} parsed as {cli:?}"),
            Parsed::Exit { code, stderr, .. } => {
                assert_eq!(code, exit::USAGE, "{args:?}");
                assert_eq!(stderr.lines().count(), 1, "{stderr}");
                stderr
            }
        }
    }

    #[test]
    fn clap_accepts_the_definition() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_its_command_verbatim_after_the_first_word() {
        let cli = parse_ok(&[
            "lockctl", "run", "k", "--ttl", "500ms", "ls", "-la", "--ttl",
        ]);
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.ttl, Duration::from_millis(500));
        assert_eq!(run.command, ["ls", "-la", "--ttl"]);
        assert_eq!(run.wait(), Duration::from_secs(10));
        let cli = parse_ok(&[
            "lockctl",
            "--redis",
            "redis://h",
            "run",
            "k",
            "--no-wait",
            "--",
            "-x",
        ]);
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.command, ["-x"]);
        assert_eq!(run.wait(), Duration::ZERO);
        assert_eq!(cli.server.redis.as_deref(), Some("redis://h"));
    }

    #[test]
    fn waits_can_be_forever() {
        let cli = parse_ok(&["lockctl", "run", "k", "--wait", "forever", "true"]);
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.wait(), Duration::MAX);
    }

    #[test]
    fn redlock_takes_a_comma_separated_list() {
        let cli = parse_ok(&[
            "lockctl",
            "status",
            "k",
            "--redlock",
            "redis://a,redis://b,redis://c",
        ]);
        assert_eq!(cli.server.redlock, ["redis://a", "redis://b", "redis://c"]);
    }

    #[test]
    fn bad_command_lines_are_one_line_usage_errors() {
        assert!(usage_error(&["lockctl", "run", "k", "--bogus", "--", "true"]).contains("--bogus"));
        assert!(
            usage_error(&["lockctl", "run", "k", "--ttl", "5parsecs", "true"]).contains("--ttl")
        );
        let missing = usage_error(&["lockctl", "run", "k"]);
        assert!(missing.contains("not provided: <COMMAND>..."), "{missing}");
        usage_error(&["lockctl", "run", "k", "--wait", "1s", "--no-wait", "true"]);
        usage_error(&["lockctl", "release", "k"]);
        usage_error(&[
            "lockctl",
            "--redis",
            "redis://a",
            "--redlock",
            "redis://b",
            "status",
            "k",
        ]);
        usage_error(&["lockctl"]);
    }

    #[test]
    fn misplaced_urls_are_echoed_without_their_password() {
        let error = usage_error(&["lockctl", "status", "k", "redis://:hunter2@db:6379"]);
        assert!(!error.contains("hunter2"), "{error}");
        assert!(error.contains("'redis://:***@db:6379'"), "{error}");
    }

    #[test]
    fn help_shows_the_exit_codes_and_version_the_version() {
        let Parsed::Exit { code, stdout, .. } = parse(["lockctl", "--help"].map(OsString::from))
        else {
            panic!("--help parsed as a command")
        };
        assert_eq!(code, 0);
        assert!(
            stdout.contains("Exit codes:") && stdout.contains("76"),
            "{stdout}"
        );
        let Parsed::Exit { stdout, .. } = parse(["lockctl", "--version"].map(OsString::from))
        else {
            panic!("--version parsed as a command")
        };
        assert_eq!(
            stdout.trim(),
            format!("lockctl {}", env!("CARGO_PKG_VERSION"))
        );
    }
}
