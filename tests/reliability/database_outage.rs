//! The database unreachable for far longer than the queue's delivery limit could absorb if
//! every failed staging handed its messages back: the worker holds what it has, takes nothing
//! new, says it is not ready, and when the database is back stores everything once. Nothing is
//! dead-lettered.

use std::time::Duration;

use tokio::time::Instant;

use crate::common::broker::queue_depth;
use crate::common::pipeline::{DbKind, PAGE_ID, Pipeline, StoreKind};
use crate::common::process::log_summary;
use crate::common::tally::{expected_mids, settle_and_tally};
use crate::common::webhook::{conversation_burst, post_signed, webhook_client};
use crate::shared_services::serial;

/// How long the database stays away.
const OUTAGE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_database_outage_delays_but_never_dead_letters() {
    let _serial = serial().await;
    let mut pipeline = Pipeline::new(DbKind::Postgres, StoreKind::Local).await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    // A retry policy this short would spend the quorum queue's delivery limit (20) in well
    // under a second if each exhausted staging handed its batch back to the broker.
    pipeline.set("WORKER_MAX_ATTEMPTS", "2");
    pipeline.set("WORKER_RETRY_BASE_MS", "10");
    pipeline.set("WORKER_RETRY_MAX_MS", "50");
    pipeline.set("WORKER_METRICS_ADDR", "127.0.0.1:0");
    pipeline.register_page(PAGE_ID).await;
    // The worker reaches PostgreSQL through a proxy that the test cuts.
    let database_path = pipeline.database_through_proxy().await;
    let (mut ingest, urls) = pipeline.spawn_ingest().await;
    let (mut worker, operator) = pipeline.spawn_worker_with_operator().await;
    let client = webhook_client();
    let ready = |client: reqwest::Client, operator: String| async move {
        client
            .get(format!("{operator}/readyz"))
            .send()
            .await
            .map(|answer| answer.status().as_u16())
            .unwrap_or(0)
    };
    assert_eq!(ready(client.clone(), operator.clone()).await, 200);

    database_path.cut();
    let cut = Instant::now();
    let deliveries = conversation_burst(PAGE_ID, "db", 5, 20);
    for delivery in &deliveries {
        assert_eq!(
            post_signed(&client, &urls.webhook, &delivery.body).await,
            200
        );
    }
    // The worker meets the outage and stops taking messages.
    let noticed = Instant::now() + Duration::from_secs(10);
    while ready(client.clone(), operator.clone()).await != 503 {
        assert!(
            Instant::now() < noticed,
            "the worker never said it is not ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dead_queue = format!("{}.dead", pipeline.prefix);
    while cut.elapsed() < OUTAGE {
        assert_eq!(
            queue_depth(&dead_queue).await,
            0,
            "nothing is dead-lettered while the database is away"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    database_path.restore();

    let tally = settle_and_tally(
        &pipeline,
        &expected_mids(deliveries.iter()),
        Duration::from_secs(60),
    )
    .await;
    let lines = worker.take_lines();
    assert!(
        tally.is_exact() && tally.stored == deliveries.len(),
        "{tally:?}\n{}",
        log_summary(&lines)
    );
    assert_eq!(queue_depth(&dead_queue).await, 0, "the DLQ stays empty");
    assert_eq!(pipeline.dlq_list(&[]).await.map(|l| l.len()), Ok(0));
    assert_eq!(ready(client.clone(), operator.clone()).await, 200);
    assert!(
        lines
            .iter()
            .any(|line| line.contains("taking no new messages until it is back")),
        "the worker said it paused:\n{}",
        log_summary(&lines)
    );

    worker.stop().await;
    ingest.stop().await;
    pipeline.cleanup().await;
}
