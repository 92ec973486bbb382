//! The broker restarted in the middle of a burst: ingest answers 503 while it is away and 200
//! again once it is back, without a restart of its own; every delivery that got a 200 is stored
//! exactly once, and so is every refused one that is delivered again (as Facebook retries); the
//! worker reconnects and resumes consuming by itself.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::common::pipeline::{DbKind, PAGE_ID, Pipeline, StoreKind};
use crate::common::process::log_summary;
use crate::common::tally::{expected_mids, mids, settle_and_tally};
use crate::common::webhook::{conversation_burst, post_burst, retry_refused, webhook_client};
use crate::shared_services::{BrokerOutage, serial};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_burst_loses_no_accepted_delivery() {
    let _serial = serial().await;
    let started = Instant::now();
    let mut pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    pipeline.register_page(PAGE_ID).await;
    let (mut ingest, urls) = pipeline.spawn_ingest().await;
    let url = urls.webhook;
    let ingest_pid = ingest.child.id();
    let mut worker = pipeline.spawn_worker().await;

    let deliveries = Arc::new(conversation_burst(PAGE_ID, "b", 10, 200));
    let answered = Arc::new(AtomicUsize::new(0));
    let client = webhook_client();
    // A tenth into the burst the broker stops for 2 s, then starts again.
    let restart = async {
        while answered.load(Ordering::SeqCst) < deliveries.len() / 10 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let stopping = Instant::now();
        let outage = BrokerOutage::stop().await;
        let stopped = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        outage.start().await;
        (stopping, stopped, Instant::now())
    };
    let (answers, (stopping, stopped, restarted)) = tokio::join!(
        post_burst(
            &client,
            &url,
            &deliveries,
            8,
            Duration::from_millis(20),
            &answered
        ),
        restart
    );
    let retries = retry_refused(
        &client,
        &url,
        &deliveries,
        &answers,
        Duration::from_secs(60),
    )
    .await;

    // What ingest answered, and when.
    let all: Vec<_> = answers.iter().chain(&retries).collect();
    let odd: Vec<_> = all
        .iter()
        .filter(|a| a.status != 200 && a.status != 503)
        .collect();
    assert!(
        odd.is_empty(),
        "only 200 or 503 expected: {:?}",
        &odd[..odd.len().min(5)]
    );
    let refused_in_gap = answers
        .iter()
        .filter(|a| a.status == 503 && a.at > stopping && a.at <= restarted)
        .count();
    assert!(
        refused_in_gap > 0,
        "ingest answered 503 while the broker was stopped (burst answered {} of {} by then)",
        answers.iter().filter(|a| a.at <= stopping).count(),
        deliveries.len()
    );
    let slowest_503 = all
        .iter()
        .filter(|a| a.status == 503)
        .map(|a| a.took)
        .max()
        .unwrap_or_default();
    assert!(
        slowest_503 < Duration::from_secs(5),
        "a 503 came after {slowest_503:?}: Facebook waits about 5 s"
    );
    let accepted_after = all
        .iter()
        .filter(|a| a.status == 200 && a.at > restarted)
        .count();
    assert!(accepted_after > 0, "ingest accepted deliveries again");
    assert!(ingest.is_running(), "ingest rode through the outage");
    assert_eq!(ingest.child.id(), ingest_pid);
    let accepted_first_time: BTreeSet<usize> = answers
        .iter()
        .filter(|a| a.status == 200)
        .map(|a| a.index)
        .collect();
    let refused: BTreeSet<usize> = answers
        .iter()
        .filter(|a| a.status != 200)
        .map(|a| a.index)
        .collect();

    // The worker reconnects on its own.
    pipeline
        .wait_for_consuming(&mut worker, Duration::from_secs(30))
        .await;

    // Every delivery that got a 200 (the first time or on a retry) is stored exactly once.
    let expected = expected_mids(deliveries.iter());
    let tally = settle_and_tally(&pipeline, &expected, Duration::from_secs(60)).await;
    let mut lost_accepted = Vec::new();
    for index in &accepted_first_time {
        let delivery = &deliveries[*index];
        let stored = pipeline
            .conversation(&delivery.page_id, &delivery.user)
            .await
            .unwrap_or_default();
        if !mids(&stored).contains(&delivery.mid) {
            lost_accepted.push(delivery.mid.clone());
        }
    }
    println!(
        "broker stop_app took {:.1} s, down 2 s, start_app {:.1} s; {} deliveries: {} accepted \
         at once, {} refused (503; {} while stopped, slowest 503 {:?}) then accepted on retry \
         ({} retries); run {:.1} s: {tally:?}",
        (stopped - stopping).as_secs_f64(),
        (restarted - stopped).as_secs_f64() - 2.0,
        deliveries.len(),
        accepted_first_time.len(),
        refused.len(),
        refused_in_gap,
        slowest_503,
        retries.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        lost_accepted.is_empty(),
        "{} deliveries answered 200 are not stored, e.g. {:?}",
        lost_accepted.len(),
        &lost_accepted[..lost_accepted.len().min(10)]
    );
    assert!(
        tally.is_exact(),
        "{tally:?}\nworker warnings and errors:\n{}",
        log_summary(&worker.take_lines())
    );
    assert_eq!(tally.stored, deliveries.len());
    assert!(worker.is_running(), "the worker rode through the outage");
    worker.stop().await;
    ingest.stop().await;
    pipeline.cleanup().await;
}
