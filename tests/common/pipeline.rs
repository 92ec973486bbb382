//! A whole pipeline for one test: the real `fbsync` binary with its own queue prefix, database
//! (an SQLite file or a fresh PostgreSQL database) and store (a local directory or a fresh
//! bucket on the S3 test server, optionally behind the Spaces-limit layer); its commands and
//! processes; the store read back, and waits until a conversation has settled.

use std::path::PathBuf;
use std::time::Duration;

use fbsync_shared::jobs::JobKind;
use fbsync_shared::queue::Topology;
use serde_json::Value;
use sqlx::Connection;
use tokio::time::Instant;

use super::broker::{TcpProxy, delete_topology, queue_depth, unique_prefix};
use super::process::{FbsyncProcess, fbsync_command, traced_fbsync_command};
use super::spaces_limits::{
    SpacesLimitLayer, SpacesLimits, create_bucket, read_object, s3_endpoint, unique_bucket,
};
use super::webhook::{APP_SECRET, VERIFY_TOKEN};

/// 32 bytes, base64: the tests' token key.
pub const TEST_KEY: &str = "dGVzdC1rZXktdGVzdC1rZXktdGVzdC1rZXktMzJieXQ=";
pub const PAGE_ID: &str = "510249619162304";
pub const USER_UUID: &str = "6f1c2a7e-3b7d-4c1e-9d2a-0c8e5b1f4a11";
/// The shared PostgreSQL server.
const POSTGRES_ADDR: &str = "127.0.0.1:5432";
pub const PAGE_TOKEN: &str = "EAAB-test-page-token-never-stored";

/// How long a conversation must stay the same, with nothing staged or waiting on the queue,
/// to count as settled: many flush intervals (the tests flush every 50 ms).
const SETTLE: Duration = Duration::from_millis(500);

/// How long a process may take to start listening or consuming.
const START_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone)]
pub enum StoreKind {
    Local,
    /// A fresh bucket; `endpoint` overrides the S3 server (e.g. the limit layer in front of it).
    S3 {
        endpoint: Option<String>,
    },
}

/// Where a running ingest answers.
#[derive(Debug, Clone)]
pub struct IngestUrls {
    /// The webhook on the public listener: `http://ADDR/facebook/webhook`.
    pub webhook: String,
    /// The public listener: `http://ADDR`.
    #[allow(dead_code)] // Only the api target checks the health routes.
    pub public: String,
    /// The operators' listener (`/metrics`, `/healthz`, `/readyz`): `http://ADDR`.
    #[allow(dead_code)] // Only the api target reads /metrics.
    pub operator: String,
}

/// The object key of a conversation, in the seed's layout.
pub fn conversation_key(page_id: &str, user_psid: &str) -> String {
    format!("users/{USER_UUID}/facebook_messenger/{page_id}/conversations/{user_psid}.json")
}

/// One test's environment for the binary.
pub struct Pipeline {
    pub prefix: String,
    pub data_dir: PathBuf,
    /// The PostgreSQL database to drop at cleanup.
    pg_database: Option<String>,
    /// The bucket, when the store is S3.
    pub bucket: Option<String>,
    /// Extra or overriding variables.
    pub vars: Vec<(String, String)>,
}

impl Pipeline {
    pub async fn new(db: DbKind, store: StoreKind) -> Self {
        let prefix = unique_prefix();
        let data_dir = std::env::temp_dir().join(format!("fbsync-{prefix}"));
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let (database_url, pg_database) = match db {
            DbKind::Sqlite => (format!("sqlite://{}/fbsync.db", data_dir.display()), None),
            DbKind::Postgres => {
                let name = format!("fbsync_{}", prefix.replace('-', "_"));
                let mut admin =
                    sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/postgres")
                        .await
                        .expect("PostgreSQL at 127.0.0.1:5432");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut admin)
                    .await
                    .expect("create database");
                (
                    format!("postgres://postgres@{POSTGRES_ADDR}/{name}"),
                    Some(name),
                )
            }
        };
        let mut vars = vec![
            ("FACEBOOK_APP_SECRET".to_string(), APP_SECRET.to_string()),
            (
                "FACEBOOK_VERIFY_TOKEN".to_string(),
                VERIFY_TOKEN.to_string(),
            ),
            ("QUEUE_PREFIX".to_string(), prefix.clone()),
            ("DATA_DIR".to_string(), data_dir.display().to_string()),
            ("DATABASE_URL".to_string(), database_url.clone()),
            ("TOKEN_ENCRYPTION_KEY".to_string(), TEST_KEY.to_string()),
            ("INGEST_ADDR".to_string(), "127.0.0.1:0".to_string()),
            ("INGEST_METRICS_ADDR".to_string(), "127.0.0.1:0".to_string()),
            ("LOG_FORMAT".to_string(), "json".to_string()),
            ("WORKER_FLUSH_INTERVAL_MS".to_string(), "50".to_string()),
            ("WORKER_RETRY_BASE_MS".to_string(), "50".to_string()),
            ("WORKER_RETRY_MAX_MS".to_string(), "1000".to_string()),
            // The scheduler's subscription checks spread over 30 days: none comes during a test
            // (it would take a Graph failure the test set up for something else) unless the
            // test sets a short interval of its own.
            ("SUBSCRIPTION_CHECK_INTERVAL".to_string(), "30d".to_string()),
        ];
        let bucket = match store {
            StoreKind::Local => None,
            StoreKind::S3 { endpoint } => {
                let bucket = unique_bucket();
                create_bucket(&s3_endpoint(), &bucket).await;
                vars.extend([
                    (
                        "SPACES_ENDPOINT".to_string(),
                        endpoint.unwrap_or_else(s3_endpoint),
                    ),
                    ("SPACES_BUCKET".to_string(), bucket.clone()),
                    ("SPACES_REGION".to_string(), "us-east-1".to_string()),
                    ("SPACES_API_KEY".to_string(), "test".to_string()),
                    ("SPACES_API_SECRET".to_string(), "test".to_string()),
                ]);
                Some(bucket)
            }
        };
        Self {
            prefix,
            data_dir,
            pg_database,
            bucket,
            vars,
        }
    }

    /// A pipeline whose S3 store sits behind the tests' Spaces-limits layer, which counts every
    /// request and refuses those over `limits`; the layer comes with it.
    pub async fn behind_spaces_limits(
        db: DbKind,
        limits: SpacesLimits,
    ) -> (Self, SpacesLimitLayer) {
        let layer = SpacesLimitLayer::start(&s3_endpoint(), limits).await;
        let pipeline = Self::new(
            db,
            StoreKind::S3 {
                endpoint: Some(layer.endpoint()),
            },
        )
        .await;
        (pipeline, layer)
    }

    /// Sets (or overrides) a variable.
    pub fn set(&mut self, key: &str, value: &str) {
        self.vars.retain(|(k, _)| k != key);
        self.vars.push((key.to_string(), value.to_string()));
    }

    /// The value of a variable.
    pub fn var(&self, key: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    // --- Commands and processes ----------------------------------------------------------

    /// Runs `fbsync ARGS` to completion; returns (exit code, stdout, stderr).
    pub async fn run(&self, args: &[&str]) -> (i32, String, String) {
        let output = fbsync_command(args, &self.env())
            .output()
            .await
            .expect("fbsync runs");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Registers `page_id` for [`USER_UUID`] with [`PAGE_TOKEN`].
    pub async fn register_page(&self, page_id: &str) {
        let (code, _, stderr) = self
            .run(&[
                "pages",
                "add",
                "--page-id",
                page_id,
                "--user-uuid",
                USER_UUID,
                "--token",
                PAGE_TOKEN,
            ])
            .await;
        assert_eq!(code, 0, "pages add failed: {stderr}");
    }

    /// Starts `fbsync ARGS` in the background.
    pub fn spawn(&self, args: &[&str]) -> FbsyncProcess {
        FbsyncProcess::spawn(args, &self.env())
    }

    /// Starts `fbsync up` under strace, recording `syscalls` to `trace` (see
    /// [`traced_fbsync_command`]); returns it once ingest listens.
    #[allow(dead_code)] // Only the reliability target traces the binary.
    pub async fn up_traced(
        &self,
        trace: &std::path::Path,
        syscalls: &str,
    ) -> (FbsyncProcess, IngestUrls) {
        let command = traced_fbsync_command(trace, syscalls, &["up"], &self.env());
        let mut process = FbsyncProcess::start(command);
        let urls = ingest_listening(&mut process).await;
        (process, urls)
    }

    /// Starts `fbsync up` (ingest and a worker in one process); returns it once ingest listens.
    #[allow(dead_code)] // The reliability target runs ingest and workers as separate processes.
    pub async fn up(&self) -> (FbsyncProcess, IngestUrls) {
        let mut process = self.spawn(&["up"]);
        let urls = ingest_listening(&mut process).await;
        (process, urls)
    }

    /// Starts `fbsync ingest`; returns it once it listens.
    pub async fn spawn_ingest(&self) -> (FbsyncProcess, IngestUrls) {
        let mut ingest = self.spawn(&["ingest"]);
        let urls = ingest_listening(&mut ingest).await;
        (ingest, urls)
    }

    /// Starts `fbsync worker`; returns it once it consumes the conversation queue.
    pub async fn spawn_worker(&self) -> FbsyncProcess {
        let mut worker = self.spawn(&["worker"]);
        self.wait_for_consuming(&mut worker, START_LIMIT).await;
        worker
    }

    /// Starts `fbsync worker` (set `WORKER_METRICS_ADDR` to `127.0.0.1:0` first); returns it
    /// once it consumes, with the URL of its operator listener (`/metrics`, `/readyz`).
    #[allow(dead_code)] // Only the reliability target asks a worker's operator listener.
    pub async fn spawn_worker_with_operator(&self) -> (FbsyncProcess, String) {
        let mut worker = self.spawn(&["worker"]);
        let listening = worker
            .wait_for_log("worker metrics listening", START_LIMIT)
            .await;
        let operator = format!(
            "http://{}",
            listening["fields"]["addr"]
                .as_str()
                .expect("metrics address")
        );
        self.wait_for_consuming(&mut worker, START_LIMIT).await;
        (worker, operator)
    }

    /// Waits for the worker's next `consuming` line for this pipeline's conversation queue
    /// (at start, and again after it reconnected to the broker).
    pub async fn wait_for_consuming(&self, worker: &mut FbsyncProcess, limit: Duration) {
        let queue = Topology::new(&self.prefix).queue(JobKind::Conversation);
        worker
            .wait_for_line(&format!("consuming {queue}"), limit, |line| {
                line["fields"]["message"] == "consuming" && line["fields"]["queue"] == queue
            })
            .await;
    }

    /// Routes every process started from now on (and the test's own database reads) to
    /// PostgreSQL through a proxy the test can cut: a database outage of this pipeline only.
    #[allow(dead_code)] // Only the reliability target cuts the database.
    pub async fn database_through_proxy(&mut self) -> TcpProxy {
        let proxy = TcpProxy::start(POSTGRES_ADDR.parse().expect("address")).await;
        let url = self
            .database_url()
            .replace(POSTGRES_ADDR, &proxy.addr.to_string());
        self.set("DATABASE_URL", &url);
        proxy
    }

    /// The pipeline's DATABASE_URL.
    #[allow(dead_code)] // Only the reliability target looks into the database.
    pub fn database_url(&self) -> String {
        self.var("DATABASE_URL").expect("DATABASE_URL").to_string()
    }

    /// Events staged and not yet stored for `pages`, from `fbsync pages list --json`.
    pub async fn staged_events(&self, pages: &[&str]) -> i64 {
        let (code, stdout, stderr) = self.run(&["pages", "list", "--json"]).await;
        assert_eq!(code, 0, "pages list: {stderr}");
        stdout
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|page| page["page_id"].as_str().is_some_and(|p| pages.contains(&p)))
            .map(|page| page["staged"].as_i64().unwrap_or(0))
            .sum()
    }

    /// `fbsync COMMAND FILTERS`: its stdout when it exits 0, or what went wrong.
    async fn run_ok(&self, command: &[&str], filters: &[&str]) -> Result<String, String> {
        let args = [command, filters].concat();
        let (code, stdout, stderr) = self.run(&args).await;
        if code != 0 {
            return Err(format!("fbsync {} exited {code}: {stderr}", args.join(" ")));
        }
        // A run that succeeds prints no error or warning.
        if let Some(line) = stderr
            .lines()
            .find(|line| line.contains("ERROR") || line.contains("WARN"))
        {
            return Err(format!(
                "fbsync {} succeeded but logged: {line}",
                args.join(" ")
            ));
        }
        Ok(stdout)
    }

    /// `fbsync dlq list --json FILTERS`: one JSON object per letter, or what went wrong.
    pub async fn dlq_list(&self, filters: &[&str]) -> Result<Vec<Value>, String> {
        self.run_ok(&["dlq", "list", "--json"], filters)
            .await?
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| serde_json::from_str(line).map_err(|e| format!("{line:?}: {e}")))
            .collect()
    }

    /// The dead letters matching `filters` (as `fbsync dlq list --json` shows them), once at
    /// least `count` are there; panics when fewer come within `limit`, or when more than
    /// `count` do.
    #[allow(dead_code)] // Only the api target waits for dead letters.
    pub async fn dead_letters(
        &self,
        filters: &[&str],
        count: usize,
        limit: Duration,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let letters = self
                .dlq_list(filters)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            if letters.len() >= count {
                assert_eq!(letters.len(), count, "{letters:?}");
                return letters;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} dead letters within {limit:?}, expected {count}: {letters:?}",
                letters.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `fbsync dlq replay FILTERS`: the N of its final line `replayed N`, or what went wrong.
    pub async fn dlq_replay(&self, filters: &[&str]) -> Result<usize, String> {
        let stdout = self.run_ok(&["dlq", "replay"], filters).await?;
        stdout
            .lines()
            .rev()
            .find_map(|line| line.trim().strip_prefix("replayed "))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| format!("no final `replayed N` line in {stdout:?}"))
    }

    // --- The store -----------------------------------------------------------------------

    /// The stored conversation of `user_psid` on `page_id`, parsed.
    pub async fn conversation(&self, page_id: &str, user_psid: &str) -> Option<Vec<Value>> {
        let bytes = self.object(&conversation_key(page_id, user_psid)).await?;
        Some(serde_json::from_slice(&bytes).expect("a conversation is a JSON array"))
    }

    /// Any stored object's bytes.
    pub async fn object(&self, key: &str) -> Option<Vec<u8>> {
        match &self.bucket {
            Some(bucket) => read_object(&s3_endpoint(), bucket, key).await,
            None => std::fs::read(self.data_dir.join(key)).ok(),
        }
    }

    /// Waits until the conversation holds at least `count` events and has settled (see
    /// [`has_settled`](Self::has_settled)): a duplicate still on its way would have been
    /// stored by then. Returns the events; the caller asserts the exact count. Panics when the
    /// count is not reached and settled within `limit`.
    #[allow(dead_code)] // The reliability target tallies all conversations at once instead.
    pub async fn wait_for_conversation(
        &self,
        page_id: &str,
        user_psid: &str,
        count: usize,
        limit: Duration,
    ) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        let conversation = [(page_id.to_string(), user_psid.to_string())];
        loop {
            let current = self.conversation(page_id, user_psid).await;
            let reached = current.as_ref().is_some_and(|events| events.len() >= count);
            if reached && self.has_settled(&conversation).await {
                // Read again: the settled object, not the one before the settle period.
                return self
                    .conversation(page_id, user_psid)
                    .await
                    .unwrap_or_default();
            }
            assert!(
                Instant::now() < deadline,
                "conversation {user_psid} has {:?} events, expected {count}{}",
                current.map(|e| e.len()),
                if reached { ", and has not settled" } else { "" }
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// True when the pipeline has settled for `conversations` (page id, user psid): nothing
    /// waits on the conversation queue and nothing of their Pages is staged, both before and
    /// after [`SETTLE`], and their stored objects did not change in between.
    pub async fn has_settled(&self, conversations: &[(String, String)]) -> bool {
        let queue = Topology::new(&self.prefix).queue(JobKind::Conversation);
        let pages: Vec<&str> = conversations
            .iter()
            .map(|(page, _)| page.as_str())
            .collect();
        let mut before = Vec::new();
        for (page_id, user_psid) in conversations {
            before.push(self.object(&conversation_key(page_id, user_psid)).await);
        }
        if !self.is_idle(&queue, &pages).await {
            return false;
        }
        tokio::time::sleep(SETTLE).await;
        if !self.is_idle(&queue, &pages).await {
            return false;
        }
        for ((page_id, user_psid), before) in conversations.iter().zip(before) {
            if self.object(&conversation_key(page_id, user_psid)).await != before {
                return false;
            }
        }
        true
    }

    /// Nothing ready on `queue`, nothing of `pages` staged.
    async fn is_idle(&self, queue: &str, pages: &[&str]) -> bool {
        queue_depth(queue).await == 0 && self.staged_events(pages).await == 0
    }

    /// Deletes the queues, the PostgreSQL database and the data directory (best effort).
    pub async fn cleanup(self) {
        delete_topology(&self.prefix).await;
        if let Some(name) = &self.pg_database
            && let Ok(mut admin) =
                sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/postgres").await
        {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut admin)
                .await;
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// Reads an ingest's start-up lines until it has said where it listens, publicly and for
/// operators (in either order).
async fn ingest_listening(process: &mut FbsyncProcess) -> IngestUrls {
    ingest_listening_within(process, START_LIMIT).await
}

/// Waits up to `limit` for a process's ingest to log both its listeners; their URLs.
pub async fn ingest_listening_within(process: &mut FbsyncProcess, limit: Duration) -> IngestUrls {
    let (mut public, mut operator) = (None, None);
    while public.is_none() || operator.is_none() {
        let line = process
            .wait_for_line("ingest listening", limit, |line| {
                let message = &line["fields"]["message"];
                message == "ingest listening" || message == "ingest metrics listening"
            })
            .await;
        let addr = line["fields"]["addr"].as_str().expect("addr");
        let base = Some(format!("http://{addr}"));
        if line["fields"]["message"] == "ingest listening" {
            public = base;
        } else {
            operator = base;
        }
    }
    let public = public.expect("public listener");
    IngestUrls {
        webhook: format!("{public}/facebook/webhook"),
        public,
        operator: operator.expect("operators' listener"),
    }
}
