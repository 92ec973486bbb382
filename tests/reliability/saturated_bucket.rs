//! A bucket whose write rate is far below what is due: the flusher claims no more per budget
//! window than one window can take, instead of claiming (and reading, and deferring) every due
//! conversation again window after window.

use std::time::Duration;

use crate::common::metrics::{sample, scrape};
use crate::common::pipeline::{DbKind, PAGE_ID, Pipeline, StoreKind};
use crate::common::spaces_limits::s3_endpoint;
use crate::common::webhook::{conversation_burst, post_signed, webhook_client};
use crate::shared_services::serial;

/// Conversations due at once: many times what the bucket writes in the test's seconds.
const CONVERSATIONS: usize = 200;
/// How long the flusher works against the saturated bucket.
const WATCHED: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_bucket_is_not_churned_by_claims_it_cannot_write() {
    let _serial = serial().await;
    let mut pipeline = Pipeline::new(
        DbKind::Sqlite,
        StoreKind::S3 {
            endpoint: Some(s3_endpoint()),
        },
    )
    .await;
    // 2 writes and 4 operations a second: the budget takes 1 write a second, in 1 s windows
    // of at most 2 claims each.
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    pipeline.set("SPACES_WRITES_PER_SEC", "2");
    pipeline.set("SPACES_OPS_PER_SEC", "4");
    pipeline.set("WORKER_METRICS_ADDR", "127.0.0.1:0");
    pipeline.register_page(PAGE_ID).await;
    let (mut ingest, urls) = pipeline.spawn_ingest().await;
    let (mut worker, operator) = pipeline.spawn_worker_with_operator().await;
    let client = webhook_client();
    for delivery in conversation_burst(PAGE_ID, "saturated", CONVERSATIONS, 1) {
        assert_eq!(
            post_signed(&client, &urls.webhook, &delivery.body).await,
            200
        );
    }
    tokio::time::sleep(WATCHED).await;
    let page = scrape(&client, &format!("{operator}/metrics")).await;
    let series = |outcome: &str| {
        sample(
            &page,
            &format!("fbsync_flushes_total{{outcome=\"{outcome}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let (written, deferred) = (series("written"), series("deferred"));
    println!("{written} written, {deferred} deferred in {WATCHED:?}");
    assert!(written >= 1.0, "the flusher writes at the bucket's rate");
    // The first round claims a batch (64) before any refusal; after it, at most 2 claims a
    // window (1 s). Claiming every due conversation each window defers about 200 a second.
    let bound = 64.0 + 2.0 * (WATCHED.as_secs_f64() + 2.0);
    assert!(
        deferred <= bound,
        "{deferred} flushes deferred in {WATCHED:?} (at most {bound}): due conversations are claimed again and again"
    );

    worker.stop().await;
    ingest.stop().await;
    pipeline.cleanup().await;
}
