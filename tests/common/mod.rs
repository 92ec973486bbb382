//! The test harness shared by the `api` and `reliability` targets (each declares it once with
//! `#[path = "../common/mod.rs"] mod common;`).
//!
//! What it offers:
//! - [`pipeline`]: one test's whole environment for the real `fbsync` binary (queue prefix,
//!   database, store), running its commands and processes, reading the store back and waiting
//!   until a conversation has settled;
//! - [`process`]: a running `fbsync` process: its JSON log lines, stopping it (SIGTERM, clean
//!   exit asserted) or killing it (SIGKILL);
//! - [`webhook`]: signed deliveries as Facebook sends them, bursts of them from concurrent
//!   senders, and the retries of refused ones;
//! - [`tally`]: what a conversation file holds compared with what was delivered;
//! - [`broker`]: the shared RabbitMQ: unique prefixes, reading and deleting a test's queues, a
//!   TCP proxy that cuts one test's own path to it;
//! - [`broker_node`]: a RabbitMQ node of one test's own, to start and stop beside the shared one;
//! - [`spaces_limits`]: DigitalOcean Spaces' request limits (and an outage) in front of the S3
//!   test server, and an S3 client configured like the app's;
//! - [`fake_graph`]: a fake Facebook Graph API with scripted failures, and Facebook Login;
//! - [`fake_shopify`], [`fake_dialog`]: a fake Shopify (OAuth) and Facebook Login dialog;
//! - [`ingest`]: the ingest service running inside the test process;
//! - [`fixtures`]: the captured webhook payloads of `tests/fixtures/messenger/`;
//! - [`metrics`]: reading values out of a `/metrics` page.
//!
//! Every test isolates itself, so tests run in parallel against the one broker, PostgreSQL
//! server and S3 server: it has its own queue prefix (its own exchanges and queues), its own
//! bucket, its own database (an SQLite file in its own directory, or a fresh PostgreSQL
//! database) and its own local store directory, and removes them when it cleans up. A process
//! it starts inherits nothing from the environment that could configure it.

pub mod broker;

/// Serves `app` on 127.0.0.1:0 in the background: the address and the server's task (abort it
/// to stop serving). The local fakes of what tests cannot reach start this way.
pub async fn serve_on_loopback(
    app: axum::Router,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let addr = listener.local_addr().expect("local addr");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, server)
}
pub mod pipeline;
pub mod process;
pub mod spaces_limits;
pub mod tally;
pub mod webhook;

// The reliability target runs no fake Graph API, no in-process ingest, posts no fixture and
// reads no `/metrics`: these modules are used by the api target only.
#[allow(dead_code)]
pub mod broker_node;
#[allow(dead_code)]
pub mod fake_dialog;
#[allow(dead_code)]
pub mod fake_graph;
#[allow(dead_code)]
pub mod fake_shopify;
#[allow(dead_code)]
pub mod fixtures;
#[allow(dead_code)]
pub mod ingest;
#[allow(dead_code)]
pub mod metrics;
