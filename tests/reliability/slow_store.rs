//! A store that answers slowly: every request reaches the bucket in the budget window it was
//! counted in, because the window is charged right before each request is sent, not when the
//! flush starts. Spaces' limits layer sees no request over the bucket's rates.

use std::time::Duration;

use crate::common::pipeline::{DbKind, PAGE_ID, Pipeline, StoreKind};
use crate::common::process::log_summary;
use crate::common::spaces_limits::{SpacesLimitLayer, SpacesLimits, s3_endpoint};
use crate::common::tally::{expected_mids, settle_and_tally};
use crate::common::webhook::{conversation_burst, post_signed, webhook_client};
use crate::shared_services::serial;

/// The bucket's rates, scaled down so that a small burst meets them.
const WRITES_PER_SECOND: usize = 10;
const OPERATIONS_PER_SECOND: usize = 16;
/// How long the store takes to answer each request: unevenly, up to seconds.
const SLOW_ANSWERS: std::ops::Range<Duration> =
    Duration::from_millis(100)..Duration::from_millis(1_500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushes_through_a_slow_store_stay_within_the_bucket_rates() {
    let _serial = serial().await;
    let layer = SpacesLimitLayer::start(
        &s3_endpoint(),
        SpacesLimits {
            object_puts: usize::MAX,
            bucket_writes_per_second: WRITES_PER_SECOND,
            bucket_operations_per_second: OPERATIONS_PER_SECOND,
            ..SpacesLimits::default()
        },
    )
    .await;
    layer.set_delay_between(SLOW_ANSWERS);
    let mut pipeline = Pipeline::new(
        DbKind::Postgres,
        StoreKind::S3 {
            endpoint: Some(layer.endpoint()),
        },
    )
    .await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    pipeline.set("SPACES_WRITES_PER_SEC", &WRITES_PER_SECOND.to_string());
    pipeline.set("SPACES_OPS_PER_SEC", &OPERATIONS_PER_SECOND.to_string());
    pipeline.register_page(PAGE_ID).await;
    let (mut ingest, urls) = pipeline.spawn_ingest().await;
    let mut workers = [pipeline.spawn_worker().await, pipeline.spawn_worker().await];
    let client = webhook_client();
    // 40 conversations, a message each a second for 8 s: more due than the bucket's rates let
    // through, so every window is used while slow answers are still coming back.
    let deliveries = conversation_burst(PAGE_ID, "slow", 40, 8);
    for wave in deliveries.chunks(40) {
        for delivery in wave {
            assert_eq!(
                post_signed(&client, &urls.webhook, &delivery.body).await,
                200
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let tally = settle_and_tally(
        &pipeline,
        &expected_mids(deliveries.iter()),
        Duration::from_secs(120),
    )
    .await;
    let lines: Vec<String> = workers.iter_mut().flat_map(|w| w.take_lines()).collect();
    println!(
        "{} requests forwarded through a store answering in {SLOW_ANSWERS:?}, {} over a limit",
        layer.forwarded(),
        layer.throttled()
    );
    assert!(
        tally.is_exact() && tally.stored == deliveries.len(),
        "{tally:?}\n{}",
        log_summary(&lines)
    );
    assert_eq!(
        layer.throttled(),
        0,
        "no request over the bucket's rates: {:?}",
        layer.violations()
    );

    for worker in &mut workers {
        worker.stop().await;
    }
    ingest.stop().await;
    pipeline.cleanup().await;
}
