//! Visibility with the default lease (60 s): a message accepted by ingest is in the store
//! within seconds. A database error in the middle of a flush (a PostgreSQL deadlock between
//! staging and flushing, a dropped connection) must not hold a conversation back for a whole
//! WORKER_LEASE_MS.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sqlx::Connection;
use tokio::time::Instant;

use crate::common::pipeline::{DbKind, PAGE_ID, Pipeline, StoreKind};
use crate::common::process::log_summary;
use crate::common::tally::{expected_mids, mids};
use crate::common::webhook::{Delivery, accepted, conversation_burst, post_burst, webhook_client};
use crate::shared_services::{live_leases, serial};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_messages_are_visible_within_seconds_with_the_default_lease() {
    let _serial = serial().await;
    let mut pipeline = Pipeline::new(DbKind::Postgres, StoreKind::S3 { endpoint: None }).await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    pipeline.register_page(PAGE_ID).await;
    let (mut ingest, urls) = pipeline.spawn_ingest().await;
    let url = urls.webhook;
    let mut worker = pipeline.spawn_worker().await;
    let client = webhook_client();
    // Three bursts of 3,000 messages over 10 conversations, each visible within 15 s.
    for round in 0..3 {
        let deliveries = Arc::new(conversation_burst(PAGE_ID, &format!("v{round}"), 10, 300));
        let answers = post_burst(
            &client,
            &url,
            &deliveries,
            16,
            Duration::ZERO,
            &Arc::new(AtomicUsize::new(0)),
        )
        .await;
        assert_eq!(accepted(&answers), deliveries.len());
        let missing = missing_after(&pipeline, &deliveries, Duration::from_secs(15)).await;
        assert_eq!(
            missing,
            0,
            "round {round}: {missing} accepted messages still not stored 15 s after the burst; \
             worker warnings:\n{}",
            log_summary(&worker.take_lines())
        );
    }
    worker.stop().await;
    ingest.stop().await;
    pipeline.cleanup().await;
}

/// Accepted messages still missing from the store once they are all there, or after `limit`.
async fn missing_after(pipeline: &Pipeline, deliveries: &[Delivery], limit: Duration) -> usize {
    let posted = Instant::now();
    let expected = expected_mids(deliveries.iter());
    loop {
        let mut missing = 0;
        for ((page, user), wanted) in &expected {
            let events = pipeline.conversation(page, user).await.unwrap_or_default();
            let stored: BTreeSet<String> = mids(&events).into_iter().collect();
            missing += wanted.difference(&stored).count();
        }
        if missing == 0 || posted.elapsed() > limit {
            return missing;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The worker's PostgreSQL connections are dropped three times during a burst (a database
/// failover, a proxy restart): staging retries, and the flusher must give back the
/// conversations it had claimed instead of holding them for a whole lease (60 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_database_connections_delay_no_message_by_a_whole_lease() {
    let _serial = serial().await;
    let mut pipeline = Pipeline::new(DbKind::Postgres, StoreKind::S3 { endpoint: None }).await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    pipeline.register_page(PAGE_ID).await;
    let database_url = pipeline.database_url();
    let database = database_url
        .rsplit('/')
        .next()
        .expect("a PostgreSQL database")
        .to_string();
    let (mut ingest, urls) = pipeline.spawn_ingest().await;
    let url = urls.webhook;
    let mut worker = pipeline.spawn_worker().await;
    let deliveries = Arc::new(conversation_burst(PAGE_ID, "d", 10, 300));
    let answered = Arc::new(AtomicUsize::new(0));
    let client = webhook_client();
    let resets = async {
        let mut dropped = 0;
        for share in [30, 50, 70] {
            while answered.load(Ordering::SeqCst) < deliveries.len() * share / 100 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let mut admin =
                sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/postgres")
                    .await
                    .expect("PostgreSQL");
            dropped += sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            )
            .bind(&database)
            .fetch_all(&mut admin)
            .await
            .expect("pg_terminate_backend")
            .len();
            let _ = admin.close().await;
        }
        dropped
    };
    let (answers, dropped) = tokio::join!(
        post_burst(&client, &url, &deliveries, 16, Duration::ZERO, &answered),
        resets
    );
    assert_eq!(accepted(&answers), deliveries.len());
    assert!(dropped > 0, "the worker's connections were dropped");
    let missing = missing_after(&pipeline, &deliveries, Duration::from_secs(15)).await;
    let now = fbsync_shared::now_ms();
    let held: Vec<String> = live_leases(&database_url)
        .await
        .into_iter()
        .map(|(user, owner, until)| format!("{user} held by {owner} for {} ms more", until - now))
        .collect();
    assert_eq!(
        missing,
        0,
        "{missing} accepted messages still not stored 15 s after the burst ({dropped} database \
         connections dropped); leases still held: {held:?}; worker warnings:\n{}",
        log_summary(&worker.take_lines())
    );
    worker.stop().await;
    ingest.stop().await;
    pipeline.cleanup().await;
}
