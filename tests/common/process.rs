//! The real `fbsync` binary as a child process: started with exactly the environment a test
//! gives it, its stderr (JSON log lines) read line by line, stopped with SIGTERM (a clean exit
//! asserted) or killed with SIGKILL.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

/// How long a process may take to exit cleanly after SIGTERM, unless a test says otherwise.
const STOP_LIMIT: Duration = Duration::from_secs(20);

/// `fbsync ARGS` with the given environment and nothing inherited that could configure it
/// (only PATH), in an empty working directory (no stray `.env` is read); stdout and stderr
/// piped, killed if dropped.
pub fn fbsync_command(args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fbsync"));
    command.args(args);
    isolate(command, env)
}

/// `fbsync ARGS` under `strace -f`, recording the system calls `syscalls` (with file paths) to
/// `trace`; otherwise as [`fbsync_command`]. Stop it with [`FbsyncProcess::stop_traced`].
#[allow(dead_code)] // Only the reliability target traces the binary.
pub fn traced_fbsync_command(
    trace: &std::path::Path,
    syscalls: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new("strace");
    command
        .args(["-f", "-qq", "-y", "-e"])
        .arg(format!("trace={syscalls}"))
        .arg("-o")
        .arg(trace)
        .arg(env!("CARGO_BIN_EXE_fbsync"))
        .args(args);
    isolate(command, env)
}

/// Exactly `env` (and PATH), an empty working directory, pipes, killed if dropped.
fn isolate(mut command: tokio::process::Command, env: &[(&str, &str)]) -> tokio::process::Command {
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    // One empty directory per test process.
    static EMPTY_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let dir = EMPTY_DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fbsync-test-cwd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    });
    command.current_dir(dir);
    for (key, value) in env {
        command.env(key, value);
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// A running `fbsync` process and its stderr lines, in order.
pub struct FbsyncProcess {
    pub child: tokio::process::Child,
    pub lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// The task that reads stderr into `lines` (it holds the pipe's reading end).
    reader: tokio::task::JoinHandle<()>,
}

impl FbsyncProcess {
    /// Starts `fbsync ARGS` (see [`fbsync_command`]).
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start(fbsync_command(args, env))
    }

    /// Starts a prepared command ([`fbsync_command`], [`traced_fbsync_command`]).
    pub fn start(mut command: tokio::process::Command) -> Self {
        let mut child = command.spawn().expect("run fbsync");
        let (sender, lines) = tokio::sync::mpsc::unbounded_channel();
        let stderr = child.stderr.take().expect("stderr piped");
        let reader = tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            reader,
        }
    }

    /// Closes the reading ends of the process's stdout and stderr, as a log shipper that died
    /// would: its next log line meets a broken pipe.
    #[allow(dead_code)] // Only the api target breaks the log pipe.
    pub fn close_output(&mut self) {
        self.reader.abort();
        drop(self.child.stdout.take());
    }

    /// Reads log lines until one is JSON and satisfies `wanted`; returns it. Panics after
    /// `limit`, or when the process exits first, naming `what` it waited for.
    pub async fn wait_for_line(
        &mut self,
        what: &str,
        limit: Duration,
        wanted: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no log line {what} within {limit:?}"))
                .unwrap_or_else(|| panic!("fbsync exited before logging {what}"));
            if let Ok(value) = serde_json::from_str::<Value>(&line)
                && wanted(&value)
            {
                return value;
            }
        }
    }

    /// Waits for a JSON log line whose message is `message`; returns the line.
    #[allow(dead_code)] // Only the api target waits for a particular message.
    pub async fn wait_for_log(&mut self, message: &str, limit: Duration) -> Value {
        self.wait_for_line(&format!("{message:?}"), limit, |line| {
            line["fields"]["message"] == message
        })
        .await
    }

    /// Every log line received so far and not yet read.
    pub fn take_lines(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.try_recv() {
            lines.push(line);
        }
        lines
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }

    /// Sends SIGTERM; returns the exit status if the process exits within `limit`, None if it
    /// is still running then.
    pub async fn terminate_and_wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.terminate();
        let exited = tokio::time::timeout(limit, self.child.wait()).await.ok()?;
        Some(exited.expect("exit status"))
    }

    /// Sends SIGTERM and asserts a clean exit (status 0) within `limit`.
    pub async fn stop_within(&mut self, limit: Duration) {
        let status = self
            .terminate_and_wait(limit)
            .await
            .unwrap_or_else(|| panic!("fbsync did not stop within {limit:?} of SIGTERM"));
        assert!(
            status.success(),
            "fbsync exited with {status} after SIGTERM"
        );
    }

    /// Sends SIGTERM and asserts a clean exit (status 0) within 20 s.
    pub async fn stop(&mut self) {
        self.stop_within(STOP_LIMIT).await;
    }

    /// Sends SIGKILL and waits for the process to die of it.
    #[allow(dead_code)] // Only the reliability target kills processes.
    pub async fn kill_hard(&mut self) {
        use std::os::unix::process::ExitStatusExt;
        let pid = self.child.id().expect("the process is running");
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(killed.success());
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("a killed process exits")
            .expect("status");
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }

    /// Stops a process started with [`traced_fbsync_command`]: SIGTERM to the traced `fbsync`
    /// (strace would only detach on its own SIGTERM), then waits for strace to finish writing.
    #[allow(dead_code)] // Only the reliability target traces the binary.
    pub async fn stop_traced(&mut self) {
        let strace = self.child.id().expect("strace is running");
        let children = std::fs::read_to_string(format!("/proc/{strace}/task/{strace}/children"))
            .expect("strace's children");
        let traced = children
            .split_whitespace()
            .next()
            .expect("the traced fbsync");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", traced])
            .status()
            .expect("kill runs");
        assert!(sent.success());
        let status = tokio::time::timeout(STOP_LIMIT, self.child.wait())
            .await
            .expect("fbsync stops on SIGTERM")
            .expect("status");
        assert!(status.success(), "fbsync under strace exited with {status}");
    }

    /// Freezes the process (SIGSTOP), as a stalled host or a long GC pause would.
    #[allow(dead_code)] // Only the reliability target stalls processes.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused process run again (SIGCONT).
    #[allow(dead_code)] // Only the reliability target stalls processes.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("the process is running");
        let sent = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill {signal} {pid}");
    }

    /// The process's peak resident memory (VmHWM), in KiB; 0 when it cannot be read.
    #[allow(dead_code)] // Only the benchmarks in the reliability target measure memory.
    pub fn peak_rss_kib(&self) -> u64 {
        let pid = self.child.id().unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// CPU time the process's live threads have used, in nanoseconds (the first field of each
    /// thread's schedstat: nanosecond resolution, where the process's stat counts 10 ms ticks).
    #[allow(dead_code)] // Only the benchmarks in the reliability target measure CPU.
    pub fn cpu_time_ns(&self) -> u64 {
        let pid = self.child.id().unwrap_or_default();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return 0;
        };
        tasks
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
            .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    /// True while the process has not exited.
    #[allow(dead_code)] // Only the reliability target checks processes ride through faults.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Warning and error lines, counted by level and message, one `N × LEVEL message` a line: the
/// part of a process's log worth printing when an assertion fails.
pub fn log_summary(lines: &[String]) -> String {
    let mut counts: std::collections::BTreeMap<(String, String), usize> = Default::default();
    for line in lines {
        let Ok(value) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let level = value["level"].as_str().unwrap_or_default().to_string();
        if level == "WARN" || level == "ERROR" {
            let message = value["fields"]["message"].as_str().unwrap_or_default();
            let error = value["fields"]["error"].as_str().unwrap_or_default();
            *counts
                .entry((level, format!("{message} {error}")))
                .or_default() += 1;
        }
    }
    counts
        .iter()
        .map(|((level, message), count)| format!("{count} × {level} {message}"))
        .collect::<Vec<_>>()
        .join("\n")
}
