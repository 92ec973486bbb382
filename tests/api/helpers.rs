//! What the tests share: an ingest on port 0 with its own queue prefix, signed posts, reading
//! the test's queues back, a TCP proxy that cuts the test's own path to the broker, and the real
//! `fbsync` binary.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fbsync_shared::config::Settings;
use fbsync_shared::facebook::event::{EventMessage, JobKind};
use fbsync_shared::facebook::signature::sign_sha256;
use fbsync_shared::queue::{Publisher, Topology, connect};
use fbsync_shared::telemetry;
use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const APP_SECRET: &str = "test-app-secret";
pub const VERIFY_TOKEN: &str = "test-verify-token";

/// A queue prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("test-{}", uuid::Uuid::new_v4().simple())
}

/// A fixture from ../shared/fixtures/messenger, byte for byte.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../shared/fixtures/messenger/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

pub fn fixture_names() -> Vec<String> {
    let dir = format!(
        "{}/../shared/fixtures/messenger",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".json"))
        .collect();
    names.sort();
    names
}

/// An ingest service running in this process, on port 0, with its own prefix.
pub struct TestIngest {
    pub addr: SocketAddr,
    pub prefix: String,
    pub shutdown: CancellationToken,
    pub client: reqwest::Client,
}

/// Starts ingest against `amqp_url` (the real broker, or a proxy in front of it) and waits
/// until it is connected.
pub async fn spawn_ingest(amqp_url: &str) -> TestIngest {
    let prefix = unique_prefix();
    let vars: HashMap<String, String> = [
        ("FACEBOOK_APP_SECRET", APP_SECRET),
        ("FACEBOOK_VERIFY_TOKEN", VERIFY_TOKEN),
        ("AMQP_URL", amqp_url),
        ("QUEUE_PREFIX", prefix.as_str()),
        ("INGEST_PUBLISH_TIMEOUT_MS", "2000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let settings = Settings::from_map(&vars).expect("test settings are valid");
    let shutdown = CancellationToken::new();
    let publisher = Publisher::start(
        settings.broker.amqp_url.clone(),
        Topology::new(&prefix),
        "fbsync-test".into(),
        shutdown.clone(),
    );
    assert!(
        publisher.wait_ready(Duration::from_secs(10)).await,
        "ingest could not reach the broker"
    );
    let secrets = settings.webhook_secrets().expect("webhook secrets");
    let state =
        fbsync_ingest::IngestState::new(&settings, secrets, publisher, telemetry::metrics_handle());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(fbsync_ingest::run(
        listener,
        Arc::new(state),
        settings.ingest.body_limit_bytes,
        shutdown.clone(),
    ));
    TestIngest {
        addr,
        prefix,
        shutdown,
        client: reqwest::Client::new(),
    }
}

impl TestIngest {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs `body` signed with the test app secret.
    pub async fn post_signed(&self, body: &[u8]) -> reqwest::Response {
        self.client
            .post(self.url("/facebook/webhook"))
            .header("content-type", "application/json")
            .header("x-hub-signature-256", sign_sha256(APP_SECRET, body))
            .body(body.to_vec())
            .send()
            .await
            .expect("ingest answers")
    }

    /// Takes every message waiting in this test's queue of `kind`.
    pub async fn drain(&self, kind: JobKind) -> Vec<EventMessage> {
        drain_queue(&Topology::new(&self.prefix).queue(kind)).await
    }

    /// Stops ingest and deletes the test's queues and exchanges.
    pub async fn cleanup(self) {
        self.shutdown.cancel();
        delete_topology(&self.prefix).await;
    }
}

/// Takes every message waiting in `queue`.
pub async fn drain_queue(queue: &str) -> Vec<EventMessage> {
    let connection = connect(&AMQP_URL.into(), "fbsync-test-drain")
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    let mut messages = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        let event: EventMessage =
            serde_json::from_slice(&message.delivery.data).expect("an event message");
        messages.push(event);
    }
    let _ = connection.close(200, "done".into()).await;
    messages
}

/// Deletes the exchanges and queues of `prefix` (best effort).
pub async fn delete_topology(prefix: &str) {
    let topology = Topology::new(prefix);
    let Ok(connection) = connect(&AMQP_URL.into(), "fbsync-test-cleanup").await else {
        return;
    };
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    for kind in JobKind::ALL {
        let _ = channel
            .queue_delete(topology.queue(kind).into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel
        .queue_delete(topology.dead().into(), QueueDeleteOptions::default())
        .await;
    for exchange in [topology.events_exchange(), topology.dead()] {
        let _ = channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "done".into()).await;
}

/// A TCP proxy in front of one target that the test can cut and restore: the test's own path to
/// the broker, so other tests keep theirs.
pub struct TcpProxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (accept_cut, accept_connections) = (cut.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if accept_cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                accept_connections.lock().expect("lock").push(task);
            }
        });
        Self {
            addr,
            cut,
            connections,
        }
    }

    /// Drops every open connection and refuses new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for task in self.connections.lock().expect("lock").drain(..) {
            task.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}

/// The real `fbsync` binary, running with the given environment (and nothing inherited that
/// could configure it), its stderr read line by line.
pub struct FbsyncProcess {
    pub child: tokio::process::Child,
    pub lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

pub fn fbsync_command(args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fbsync"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    // An empty working directory (one per test process): no stray .env is read.
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

impl FbsyncProcess {
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = fbsync_command(args, env).spawn().expect("run fbsync");
        let (sender, lines) = tokio::sync::mpsc::unbounded_channel();
        let stderr = child.stderr.take().expect("stderr piped");
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Waits for a JSON log line whose message is `message`; returns the line.
    pub async fn wait_for_log(&mut self, message: &str, limit: Duration) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no log {message:?} within {limit:?}"))
                .unwrap_or_else(|| panic!("fbsync exited before logging {message:?}"));
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line)
                && value["fields"]["message"] == message
            {
                return value;
            }
        }
    }

    /// Waits for a JSON log line whose text contains `needle`; returns the line.
    pub async fn wait_for_log_containing(
        &mut self,
        needle: &str,
        limit: Duration,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no log containing {needle:?} within {limit:?}"))
                .unwrap_or_else(|| panic!("fbsync exited before logging {needle:?}"));
            if line.contains(needle) {
                return serde_json::from_str(&line).unwrap_or(serde_json::Value::String(line));
            }
        }
    }

    /// Counts the log lines received so far (not yet read) that contain `needle`.
    pub fn count_logs_containing(&mut self, needle: &str) -> usize {
        let mut count = 0;
        while let Ok(line) = self.lines.try_recv() {
            count += usize::from(line.contains(needle));
        }
        count
    }

    /// Sends SIGTERM and asserts a clean exit (status 0) within 20 s.
    pub async fn stop(&mut self) {
        self.terminate();
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("fbsync did not stop within 20 s of SIGTERM")
            .expect("exit status");
        assert!(status.success(), "fbsync exited with {status}");
    }

    pub fn terminate(&self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
}
