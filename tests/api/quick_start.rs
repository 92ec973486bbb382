//! The README's quick start on a machine whose broker is stopped: `scripts/up` in a copy of the
//! checkout with no `.env` makes one, starts RabbitMQ (a node of this test's own, so the shared
//! broker is untouched) and runs `fbsync up` on the embedded defaults, which then serves
//! webhooks into `DATA_DIR`.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use fbsync_shared::facebook::signature::sign_sha256;
use tokio::time::Instant;

use crate::common::broker::unique_prefix;
use crate::common::broker_node::LocalBrokerNode;
use crate::common::pipeline::{PAGE_ID, PAGE_TOKEN, USER_UUID, ingest_listening_within};
use crate::common::process::FbsyncProcess;
use crate::common::webhook::{message_delivery, webhook_client};

/// The files of the checkout the quick start uses.
const QUICK_START_FILES: [&str; 3] = ["scripts/up", "scripts/lib/services.sh", ".env.example"];

/// `.env.example`'s app secret: deliveries signed with it are accepted on the defaults.
const EXAMPLE_APP_SECRET: &str = "local-development-app-secret";

/// Starting a RabbitMQ node, then fbsync: generous on a busy 2-core machine.
const START_LIMIT: Duration = Duration::from_secs(120);

/// A copy of the quick start's files in `checkout`, and nothing else (no `.env`).
fn copy_checkout(checkout: &Path) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in QUICK_START_FILES {
        let target = checkout.join(file);
        std::fs::create_dir_all(target.parent().expect("a folder")).expect("folder");
        std::fs::copy(source.join(file), &target).expect("copy");
    }
}

/// `bash scripts/up` in `checkout` with only what a fresh shell has and the node's variables.
fn quick_start(checkout: &Path, node: &LocalBrokerNode, data_dir: &Path) -> FbsyncProcess {
    let mut command = tokio::process::Command::new("bash");
    command
        .arg(checkout.join("scripts/up"))
        .current_dir(checkout)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "HOME",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
        )
        .envs(node.env())
        .env("AMQP_URL", node.amqp_url())
        .env("FBSYNC_BIN", env!("CARGO_BIN_EXE_fbsync"))
        .env("DATA_DIR", data_dir)
        .env("INGEST_ADDR", "127.0.0.1:0")
        .env("INGEST_METRICS_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        // Nothing answers there: the test never lets fbsync reach Facebook.
        .env("FACEBOOK_GRAPH_URL", "http://127.0.0.1:9")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    FbsyncProcess::start(command)
}

#[tokio::test]
async fn the_quick_start_starts_a_stopped_broker_and_the_pipeline_serves() {
    let Some(node) = LocalBrokerNode::prepare() else {
        return;
    };
    assert!(!node.is_listening(), "the node must start stopped");
    let checkout = std::env::temp_dir().join(format!("fbsync-quick-start-{}", unique_prefix()));
    copy_checkout(&checkout);
    let data_dir = checkout.join("elsewhere");

    let mut up = quick_start(&checkout, &node, &data_dir);
    let urls = ingest_listening_within(&mut up, START_LIMIT).await;
    assert!(node.is_listening(), "the quick start started the broker");
    assert!(checkout.join(".env").is_file(), ".env was made");

    // The owner's Page, added as the README says, in the same checkout and DATA_DIR.
    let added = tokio::process::Command::new(env!("CARGO_BIN_EXE_fbsync"))
        .args([
            "pages",
            "add",
            "--page-id",
            PAGE_ID,
            "--user-uuid",
            USER_UUID,
        ])
        .args(["--token", PAGE_TOKEN])
        .current_dir(&checkout)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATA_DIR", &data_dir)
        .output()
        .await
        .expect("fbsync runs");
    assert!(
        added.status.success(),
        "pages add: {}",
        String::from_utf8_lossy(&added.stderr)
    );

    let body = message_delivery(
        PAGE_ID,
        "quickstartuser",
        "m_quick_1",
        1_700_000_000_000,
        false,
    );
    let answer = webhook_client()
        .post(&urls.webhook)
        .header("content-type", "application/json")
        .header(
            "x-hub-signature-256",
            sign_sha256(EXAMPLE_APP_SECRET, &body),
        )
        .body(body)
        .send()
        .await
        .expect("ingest answers");
    assert_eq!(answer.status().as_u16(), 200);

    let object = data_dir.join(format!(
        "users/{USER_UUID}/facebook_messenger/{PAGE_ID}/conversations/quickstartuser.json"
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !object.is_file() {
        assert!(
            Instant::now() < deadline,
            "{} never written",
            object.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored = std::fs::read_to_string(&object).expect("object");
    assert!(stored.contains("m_quick_1"), "{stored}");
    assert!(
        data_dir.join("fbsync.db").is_file(),
        "the database follows DATA_DIR"
    );
    up.stop().await;
    let _ = std::fs::remove_dir_all(&checkout);
}
