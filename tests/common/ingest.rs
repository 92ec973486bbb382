//! The ingest service running inside the test process, on port 0, with its own queue prefix:
//! for tests of the webhook itself that read the test's queues back. (It shares the process's
//! metrics recorder with every other in-process test: tests that read `/metrics` run the
//! `fbsync ingest` binary instead, with `Pipeline::spawn_ingest`.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fbsync_shared::config::Settings;
use fbsync_shared::facebook::event::EventMessage;
use fbsync_shared::jobs::JobKind;
use fbsync_shared::queue::{Publisher, Topology};
use fbsync_shared::telemetry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::broker::{delete_topology, drain_queue, drain_queue_bodies, unique_prefix};
use super::webhook::{APP_SECRET, VERIFY_TOKEN, post_signed};

/// An ingest service running in this process.
pub struct InProcessIngest {
    pub addr: SocketAddr,
    pub prefix: String,
    pub shutdown: CancellationToken,
    pub client: reqwest::Client,
}

/// Starts ingest in this process against `amqp_url` (the real broker, or a proxy in front of
/// it) with a prefix of its own, and waits until it is connected.
pub async fn spawn_ingest_in_process(amqp_url: &str) -> InProcessIngest {
    spawn_ingest_in_process_with(amqp_url, &[]).await
}

/// As [`spawn_ingest_in_process`], with more settings.
pub async fn spawn_ingest_in_process_with(
    amqp_url: &str,
    settings: &[(&str, &str)],
) -> InProcessIngest {
    let prefix = unique_prefix();
    let vars: HashMap<String, String> = [
        ("FACEBOOK_APP_SECRET", APP_SECRET),
        ("FACEBOOK_VERIFY_TOKEN", VERIFY_TOKEN),
        ("AMQP_URL", amqp_url),
        ("QUEUE_PREFIX", prefix.as_str()),
        ("INGEST_PUBLISH_TIMEOUT_MS", "2000"),
    ]
    .into_iter()
    .chain(settings.iter().copied())
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
        shutdown.clone(),
    ));
    InProcessIngest {
        addr,
        prefix,
        shutdown,
        client: reqwest::Client::new(),
    }
}

impl InProcessIngest {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs `body` to the webhook signed with the test app secret; returns the status.
    pub async fn post_signed(&self, body: &[u8]) -> u16 {
        post_signed(&self.client, &self.url("/facebook/webhook"), body).await
    }

    /// Takes every message waiting in this test's queue of `kind`.
    pub async fn drain(&self, kind: JobKind) -> Vec<EventMessage> {
        drain_queue(&Topology::new(&self.prefix).queue(kind)).await
    }

    /// Takes every job ready on the queue of `kind`.
    pub async fn drain_jobs(&self, kind: JobKind) -> Vec<fbsync_shared::jobs::Job> {
        drain_queue_bodies(&Topology::new(&self.prefix).queue(kind))
            .await
            .iter()
            .map(|body| fbsync_shared::jobs::Job::decode(kind, body).expect("a job"))
            .collect()
    }

    /// Stops ingest and deletes the test's queues and exchanges.
    pub async fn cleanup(self) {
        self.shutdown.cancel();
        delete_topology(&self.prefix).await;
    }
}
