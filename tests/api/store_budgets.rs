//! The store's budgets as they are in force, through the real binary: a local directory has
//! none (a busy conversation is written every write gap, even with an old per-object setting);
//! a bucket whose real limit is below the configured rate is found by its SlowDown answers and
//! then kept to; a worker verifies conditional writes at start and, on a store that ignores
//! them, says so and runs on its claims alone, or refuses to start when they are required.

use std::sync::Arc;
use std::time::Duration;

use fbsync_shared::telemetry::{BUCKET_RATE_IN_FORCE, CONDITIONAL_WRITES_HONOURED};
use tokio::time::Instant;

use crate::common::metrics::{sample, scrape};
use crate::common::pipeline::{DbKind, PAGE_ID, Pipeline, StoreKind};
use crate::common::spaces_limits::SpacesLimits;
use crate::common::tally::expected_mids;
use crate::common::webhook::{
    accepted, conversation_burst, message_delivery, post_burst, post_signed, webhook_client,
};

/// How long a worker may take to start, probe included.
const START_LIMIT: Duration = Duration::from_secs(30);

/// With a per-object window of 5 PUTs per 300 s (set in an old `.env`), the sixth write of a
/// conversation on Spaces would wait minutes; a local directory has no such window, so every
/// message of a busy conversation is visible within a few write gaps.
#[tokio::test]
async fn a_busy_conversation_on_the_local_directory_is_written_every_write_gap_whatever_the_object_window()
 {
    let mut pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "5");
    pipeline.set("WORKER_OBJECT_WRITE_GAP_MS", "300");
    pipeline.register_page(PAGE_ID).await;
    let (mut process, ingest) = pipeline.up().await;
    let client = webhook_client();
    let psid = "u-busy";
    for n in 1..=8 {
        let delivery = message_delivery(PAGE_ID, psid, &format!("m_busy_{n}"), n, false);
        assert_eq!(post_signed(&client, &ingest.webhook, &delivery).await, 200);
        let posted = Instant::now();
        loop {
            let stored = pipeline
                .conversation(PAGE_ID, psid)
                .await
                .map_or(0, |events| events.len());
            if stored == n as usize {
                break;
            }
            assert!(
                posted.elapsed() < Duration::from_secs(10),
                "message {n} not stored within 10 s: {stored} stored (an object window on a disk?)"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    process.stop().await;
    pipeline.cleanup().await;
}

/// A bucket that takes 40 writes a second under a configured 300: the first SlowDown answers
/// lower the shared rate, and after the first 10 s fewer than 5% of the requests are refused;
/// every message is stored.
#[tokio::test]
async fn a_bucket_slower_than_configured_is_found_by_its_slow_downs_and_then_kept_to() {
    let limits = SpacesLimits {
        bucket_writes_per_second: 40,
        ..SpacesLimits::default()
    };
    let (mut pipeline, layer) = Pipeline::behind_spaces_limits(DbKind::Sqlite, limits).await;
    pipeline.set("WORKER_METRICS_ADDR", "127.0.0.1:0");
    pipeline.register_page(PAGE_ID).await;
    let (mut ingest, urls) = pipeline.spawn_ingest().await;
    let (mut worker, operator) = pipeline.spawn_worker_with_operator().await;
    let started = Instant::now();
    let (conversations, per_conversation) = (400, 3);
    let deliveries = Arc::new(conversation_burst(
        PAGE_ID,
        "slow",
        conversations,
        per_conversation,
    ));
    let answers = post_burst(
        &webhook_client(),
        &urls.webhook,
        &deliveries,
        16,
        Duration::from_millis(5),
        &Arc::default(),
    )
    .await;
    assert_eq!(accepted(&answers), deliveries.len());
    let mut lowest_rate = f64::MAX;
    let client = reqwest::Client::new();
    let (mut forwarded_at_10s, mut throttled_at_10s) = (None, None);
    for (page_id, user) in expected_mids(deliveries.iter()).into_keys() {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if started.elapsed() >= Duration::from_secs(10) && forwarded_at_10s.is_none() {
                forwarded_at_10s = Some(layer.forwarded());
                throttled_at_10s = Some(layer.throttled());
            }
            let page = scrape(&client, &format!("{operator}/metrics")).await;
            let series = format!("{BUCKET_RATE_IN_FORCE}{{class=\"writes\"}}");
            if let Some(rate) = sample(&page, &series) {
                lowest_rate = lowest_rate.min(rate);
            }
            let stored = pipeline.conversation(&page_id, &user).await;
            if stored.is_some_and(|events| events.len() == per_conversation) {
                break;
            }
            assert!(Instant::now() < deadline, "{user} not stored");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed > Duration::from_secs(12),
        "the burst is long enough to see the rate kept to ({elapsed:?})"
    );
    let after_10s = |now: u64, at_10s: Option<u64>| now - at_10s.expect("10 s passed");
    let (forwarded, throttled) = (
        after_10s(layer.forwarded(), forwarded_at_10s),
        after_10s(layer.throttled(), throttled_at_10s),
    );
    assert!(layer.throttled() > 0, "the bucket's real limit was reached");
    assert!(
        (throttled as f64) < 0.05 * (forwarded + throttled) as f64,
        "after the first 10 s, {throttled} of {} requests were refused",
        forwarded + throttled
    );
    assert!(
        lowest_rate < 40.0,
        "the rate in force went below the bucket's real limit (lowest seen: {lowest_rate})"
    );
    ingest.stop().await;
    worker.stop().await;
    pipeline.cleanup().await;
}

/// On a store that ignores `If-Match` / `If-None-Match`, a worker logs what that means, exports
/// it, and stores every event all the same (reading before each write).
#[tokio::test]
async fn a_worker_on_a_store_that_ignores_conditional_writes_says_so_and_stores_everything() {
    let (mut pipeline, layer) =
        Pipeline::behind_spaces_limits(DbKind::Sqlite, SpacesLimits::default()).await;
    layer.set_ignore_write_conditions(true);
    pipeline.set("WORKER_METRICS_ADDR", "127.0.0.1:0");
    pipeline.register_page(PAGE_ID).await;
    let mut worker = pipeline.spawn(&["worker"]);
    let warned = worker
        .wait_for_line("conditional writes ignored", START_LIMIT, |line| {
            line["level"] == "WARN"
                && line["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("conditional writes ignored"))
        })
        .await;
    assert!(
        warned["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("claims alone")),
        "{warned}"
    );
    let listening = worker
        .wait_for_log("worker metrics listening", START_LIMIT)
        .await;
    let operator = format!(
        "http://{}",
        listening["fields"]["addr"].as_str().expect("address")
    );
    pipeline.wait_for_consuming(&mut worker, START_LIMIT).await;
    let page = scrape(&reqwest::Client::new(), &format!("{operator}/metrics")).await;
    assert_eq!(sample(&page, CONDITIONAL_WRITES_HONOURED), Some(0.0));
    let (mut ingest, urls) = pipeline.spawn_ingest().await;
    let client = webhook_client();
    for n in 1..=3 {
        let delivery = message_delivery(PAGE_ID, "u-plain", &format!("m_plain_{n}"), n, false);
        assert_eq!(post_signed(&client, &urls.webhook, &delivery).await, 200);
    }
    let stored = pipeline
        .wait_for_conversation(PAGE_ID, "u-plain", 3, Duration::from_secs(60))
        .await;
    assert_eq!(stored.len(), 3);
    assert!(
        layer.gets_for("u-plain.json") >= 1,
        "a new conversation is read before it is written: no If-None-Match to rely on"
    );
    ingest.stop().await;
    worker.stop().await;
    pipeline.cleanup().await;
}

/// SPACES_CONDITIONAL_WRITES=required: a worker refuses to start on a store that ignores them,
/// saying why; the same worker starts on a store that honours them.
#[tokio::test]
async fn with_conditional_writes_required_a_worker_refuses_a_store_that_ignores_them() {
    let (mut pipeline, layer) =
        Pipeline::behind_spaces_limits(DbKind::Sqlite, SpacesLimits::default()).await;
    pipeline.set("SPACES_CONDITIONAL_WRITES", "required");
    pipeline.register_page(PAGE_ID).await;
    layer.set_ignore_write_conditions(true);
    let (code, stdout, stderr) = tokio::time::timeout(START_LIMIT, pipeline.run(&["worker"]))
        .await
        .expect("the worker exits");
    assert_ne!(code, 0, "{stdout}{stderr}");
    assert!(
        stderr.contains("conditional writes ignored"),
        "{stdout}{stderr}"
    );
    layer.set_ignore_write_conditions(false);
    let mut worker = pipeline.spawn_worker().await;
    worker.stop().await;
    pipeline.cleanup().await;
}
