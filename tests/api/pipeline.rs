//! A whole pipeline for one test: the real `fbsync` binary with its own queue prefix, database
//! (an SQLite file or a fresh PostgreSQL database) and store (a local directory or a fresh
//! bucket on the S3 test server, optionally behind the Spaces-limit layer).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use sqlx::Connection;

use crate::helpers::{
    APP_SECRET, FbsyncProcess, VERIFY_TOKEN, delete_topology, fbsync_command, unique_prefix,
};
use crate::spaces_limits::{create_bucket, read_object, s3_endpoint, unique_bucket};

/// 32 bytes, base64: the tests' token key.
pub const TEST_KEY: &str = "dGVzdC1rZXktdGVzdC1rZXktdGVzdC1rZXktMzJieXQ=";
pub const PAGE_ID: &str = "510249619162304";
pub const USER_UUID: &str = "6f1c2a7e-3b7d-4c1e-9d2a-0c8e5b1f4a11";
pub const PAGE_TOKEN: &str = "EAAB-test-page-token-never-stored";

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
                    format!("postgres://postgres@127.0.0.1:5432/{name}"),
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
            ("LOG_FORMAT".to_string(), "json".to_string()),
            ("WORKER_FLUSH_INTERVAL_MS".to_string(), "50".to_string()),
            ("WORKER_RETRY_BASE_MS".to_string(), "50".to_string()),
            ("WORKER_RETRY_MAX_MS".to_string(), "1000".to_string()),
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

    /// Sets (or overrides) a variable.
    pub fn set(&mut self, key: &str, value: &str) {
        self.vars.retain(|(k, _)| k != key);
        self.vars.push((key.to_string(), value.to_string()));
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

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

    /// Registers the test Page.
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

    /// Starts `fbsync up` and returns it with the webhook URL.
    pub async fn up(&self) -> (FbsyncProcess, String) {
        let mut process = self.spawn(&["up"]);
        let line = process
            .wait_for_log("ingest listening", Duration::from_secs(30))
            .await;
        let addr = line["fields"]["addr"].as_str().expect("addr").to_string();
        (process, format!("http://{addr}/facebook/webhook"))
    }

    /// The stored conversation of `user_psid` on `page_id`, parsed.
    pub async fn conversation(&self, page_id: &str, user_psid: &str) -> Option<Vec<Value>> {
        let key = format!(
            "users/{USER_UUID}/facebook_messenger/{page_id}/conversations/{user_psid}.json"
        );
        let bytes = self.object(&key).await?;
        Some(serde_json::from_slice(&bytes).expect("a conversation is a JSON array"))
    }

    /// Any stored object's bytes.
    pub async fn object(&self, key: &str) -> Option<Vec<u8>> {
        match &self.bucket {
            Some(bucket) => read_object(&s3_endpoint(), bucket, key).await,
            None => std::fs::read(self.data_dir.join(key)).ok(),
        }
    }

    /// Waits until the conversation holds `count` events (or panics after `limit`).
    pub async fn wait_for_conversation(
        &self,
        page_id: &str,
        user_psid: &str,
        count: usize,
        limit: Duration,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let current = self.conversation(page_id, user_psid).await;
            if current.as_ref().is_some_and(|events| events.len() >= count) {
                return current.unwrap_or_default();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "conversation {user_psid} has {:?} events, expected {count}",
                current.map(|e| e.len())
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

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

/// Posts a signed body; returns the status.
pub async fn post_signed(client: &reqwest::Client, url: &str, body: &[u8]) -> u16 {
    client
        .post(url)
        .header(
            "x-hub-signature-256",
            fbsync_shared::facebook::signature::sign_sha256(APP_SECRET, body),
        )
        .body(body.to_vec())
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Posts every body, `concurrency` at a time; returns how many were answered 200.
pub async fn post_all(
    client: &reqwest::Client,
    url: &str,
    bodies: &[Vec<u8>],
    concurrency: usize,
) -> usize {
    let per_task = bodies.len().div_ceil(concurrency.max(1)).max(1);
    let tasks = bodies.chunks(per_task).map(|chunk| async move {
        let mut accepted = 0;
        for body in chunk {
            accepted += usize::from(post_signed(client, url, body).await == 200);
        }
        accepted
    });
    futures::future::join_all(tasks).await.into_iter().sum()
}

/// A delivery of one text message from `user` to `page` (or, with `echo`, from the page).
pub fn message_delivery(
    page_id: &str,
    user_psid: &str,
    mid: &str,
    timestamp: i64,
    echo: bool,
) -> Vec<u8> {
    let (sender, recipient, echo_field) = if echo {
        (page_id, user_psid, r#""is_echo":true,"#)
    } else {
        (user_psid, page_id, "")
    };
    format!(
        r#"{{"object":"page","entry":[{{"id":"{page_id}","time":{timestamp},"messaging":[{{"sender":{{"id":"{sender}"}},"recipient":{{"id":"{recipient}"}},"timestamp":{timestamp},"message":{{{echo_field}"mid":"{mid}","text":"text {mid}"}}}}]}}]}}"#
    )
    .into_bytes()
}

/// The mids of a stored conversation, in file order.
pub fn mids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["message"]["mid"].as_str().map(str::to_string))
        .collect()
}

/// True when the events are sorted by timestamp.
pub fn sorted_by_timestamp(events: &[Value]) -> bool {
    events
        .windows(2)
        .all(|w| w[0]["timestamp"].as_i64() <= w[1]["timestamp"].as_i64())
}
