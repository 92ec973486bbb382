//! One combined scenario, and the table it prints: a burst on three workers (PostgreSQL behind
//! a proxy that can drop every connection, an S3 bucket behind Spaces' limits layer that can
//! play a storage outage) while one worker is killed with SIGKILL, another is frozen with
//! SIGSTOP past its lease and then resumed, the broker restarts, the database connections drop,
//! storage is down for a few seconds and Facebook re-sends some deliveries; events for a Page
//! that is not registered yet are dead-lettered, then replayed once it is. Nothing is lost,
//! nothing is duplicated, every dead letter is replayed, no request goes over a limit.
//!
//! It runs twice: with the bucket's rates only (a store without a per-object limit, such as
//! MinIO or AWS S3), and with all of Spaces' limits (5 PUTs per object per window, the window
//! shortened for the test).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::common::broker::queue_depth;
use crate::common::pipeline::{DbKind, PAGE_ID, Pipeline, StoreKind};
use crate::common::process::log_summary;
use crate::common::spaces_limits::{SpacesLimitLayer, SpacesLimits, s3_endpoint};
use crate::common::tally::{expected_mids, settle_and_tally};
use crate::common::webhook::{
    Delivery, conversation_burst, post_burst, retry_refused, webhook_client,
};
use crate::shared_services::{BrokerOutage, queue_report, queue_total, serial};

/// A Page that is registered only after its events were dead-lettered.
const LATE_PAGE: &str = "778899001122334";

/// What the fault injector did.
#[derive(Debug, Default)]
struct Faults {
    worker_kills: usize,
    worker_stalls: usize,
    worker_stalled: Duration,
    broker_restarts: usize,
    broker_down: Duration,
    database_down: Duration,
    storage_down: Duration,
    storage_refused: u64,
}

/// A worker's claim lasts this long after it stops renewing it.
const LEASE: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliability_table() {
    // Spaces' bucket rates, and no per-object limit.
    fault_scenario(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliability_table_within_spaces_limits() {
    // Every one of Spaces' limits: 5 PUTs per object in a window shortened to 20 s.
    fault_scenario(Some((5, Duration::from_secs(20)))).await;
}

/// The whole scenario; `object_limit` is the per-object budget (PUTs, window), if any.
async fn fault_scenario(object_limit: Option<(usize, Duration)>) {
    let _serial = serial().await;
    let started = Instant::now();
    let layer = SpacesLimitLayer::start(
        &s3_endpoint(),
        SpacesLimits {
            object_puts: object_limit.map_or(usize::MAX, |(puts, _)| puts),
            object_window: object_limit.map_or(Duration::from_secs(300), |(_, window)| window),
            ..SpacesLimits::default()
        },
    )
    .await;
    let mut pipeline = Pipeline::new(
        DbKind::Postgres,
        StoreKind::S3 {
            endpoint: Some(layer.endpoint()),
        },
    )
    .await;
    match object_limit {
        Some((puts, window)) => {
            pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", &puts.to_string());
            pipeline.set(
                "SPACES_OBJECT_PUT_WINDOW_SECS",
                &window.as_secs().to_string(),
            );
        }
        None => pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0"),
    }
    pipeline.set("WORKER_LEASE_MS", &LEASE.as_millis().to_string());
    // Every process reaches PostgreSQL through a proxy that can drop its connections.
    let database_path = pipeline.database_through_proxy().await;
    pipeline.register_page(PAGE_ID).await;
    let (mut ingest, urls) = pipeline.spawn_ingest().await;
    let url = urls.webhook;
    let mut victim = pipeline.spawn_worker().await;
    let mut staller = pipeline.spawn_worker().await;
    let mut survivor = pipeline.spawn_worker().await;

    // 1,500 messages over 10 conversations of the registered Page, 40 over 2 of a Page that is
    // not registered yet, mixed; every 10th delivery re-sent at once (a duplicate delivery).
    let registered = conversation_burst(PAGE_ID, "t", 10, 150);
    let late = conversation_burst(LATE_PAGE, "l", 2, 20);
    let mut unique: Vec<Delivery> = Vec::new();
    let mut late_iter = late.iter();
    for (i, delivery) in registered.iter().enumerate() {
        unique.push(delivery.clone());
        if i % 37 == 0
            && let Some(late) = late_iter.next()
        {
            unique.push(late.clone());
        }
    }
    unique.extend(late_iter.cloned());
    let mut deliveries = Vec::new();
    let mut duplicates = 0;
    for (i, delivery) in unique.iter().enumerate() {
        deliveries.push(delivery.clone());
        if i % 10 == 5 {
            deliveries.push(delivery.clone());
            duplicates += 1;
        }
    }
    let late_posts = deliveries.iter().filter(|d| d.page_id == LATE_PAGE).count();
    let deliveries = Arc::new(deliveries);
    let answered = Arc::new(AtomicUsize::new(0));
    let client = webhook_client();

    // The faults, one after another as the burst goes on.
    let chaos = async {
        let mut faults = Faults::default();
        let at = |share: usize| deliveries.len() * share / 100;
        while answered.load(Ordering::SeqCst) < at(20) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        victim.kill_hard().await;
        faults.worker_kills += 1;
        while answered.load(Ordering::SeqCst) < at(30) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Frozen past its lease, then resumed: its claims are fenced, what it held is kept.
        staller.pause();
        let stalled = Instant::now();
        tokio::time::sleep(LEASE + Duration::from_secs(1)).await;
        staller.resume();
        faults.worker_stalls += 1;
        faults.worker_stalled = stalled.elapsed();
        while answered.load(Ordering::SeqCst) < at(45) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let outage = BrokerOutage::stop().await;
        let down = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        outage.start().await;
        faults.broker_restarts += 1;
        faults.broker_down = down.elapsed();
        while answered.load(Ordering::SeqCst) < at(52) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Every database connection dropped, and none possible for 2 s.
        database_path.cut();
        let down = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        database_path.restore();
        faults.database_down = down.elapsed();
        while answered.load(Ordering::SeqCst) < at(60) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Down for 3 s, and longer (up to 10 s) until a worker has met the outage.
        layer.set_down(true);
        let down = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        while layer.refused_while_down() == 0 && down.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        layer.set_down(false);
        faults.storage_down = down.elapsed();
        faults.storage_refused = layer.refused_while_down();
        faults
    };
    let (answers, faults) = tokio::join!(
        post_burst(
            &client,
            &url,
            &deliveries,
            // About 100 deliveries a second: the burst lasts the length of the faults.
            4,
            Duration::from_millis(40),
            &answered
        ),
        chaos
    );
    let retries = retry_refused(
        &client,
        &url,
        &deliveries,
        &answers,
        Duration::from_secs(60),
    )
    .await;
    let refused = answers.iter().filter(|a| a.status != 200).count();
    let posts = answers.len() + retries.len();

    // The registered Page: everything stored once.
    let expected_now = expected_mids(registered.iter());
    let registered_tally =
        settle_and_tally(&pipeline, &expected_now, Duration::from_secs(90)).await;

    // The late Page: everything dead-lettered, nothing stored; then registered and replayed.
    let dead_queue = format!("{}.dead", pipeline.prefix);
    let conversation_queue = format!("{}.conversation", pipeline.prefix);
    // Until the worker has handled every delivery: the late ones are all in the DLQ.
    let deadline = Instant::now() + Duration::from_secs(30);
    while ((queue_depth(&dead_queue).await as usize) < late_posts
        || queue_total(&pipeline.prefix, &conversation_queue).await > 0)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let queues_before_replay = queue_report(&pipeline.prefix).await;
    for delivery in &late {
        assert!(
            pipeline
                .conversation(&delivery.page_id, &delivery.user)
                .await
                .is_none(),
            "nothing of an unregistered Page is stored"
        );
    }
    let dlq = pipeline.dlq_list(&["--page-id", LATE_PAGE]).await;
    let replay = match &dlq {
        Ok(letters) => {
            assert!(
                letters.iter().all(|l| l["reason"] == "unknown_page"
                    && l["kind"] == "conversation"
                    && l["page_id"] == LATE_PAGE),
                "{letters:?}"
            );
            pipeline.register_page(LATE_PAGE).await;
            pipeline.dlq_replay(&["--page-id", LATE_PAGE]).await
        }
        Err(e) => Err(e.clone()),
    };
    let dead_lettered = dlq.as_ref().map(Vec::len).ok();
    let replayed = replay.as_ref().ok().copied();
    let late_tally = if replay.is_ok() {
        Some(
            settle_and_tally(
                &pipeline,
                &expected_mids(late.iter()),
                Duration::from_secs(60),
            )
            .await,
        )
    } else {
        None
    };
    let left = if replay.is_ok() {
        pipeline.dlq_list(&["--page-id", LATE_PAGE]).await.ok()
    } else {
        None
    };

    let stored = registered_tally.stored + late_tally.as_ref().map_or(0, |t| t.stored);
    let lost = registered_tally.lost + late_tally.as_ref().map_or(0, |t| t.lost);
    let duplicated = registered_tally.duplicated + late_tally.as_ref().map_or(0, |t| t.duplicated);
    let show =
        |n: Option<usize>| n.map_or("— (`fbsync dlq` failed)".to_string(), |n| n.to_string());
    println!();
    let limits = match object_limit {
        Some((puts, window)) => format!(
            "Spaces' limits: {puts} PUTs per object per {} s, 150 writes and 240 operations per second",
            window.as_secs()
        ),
        None => "the bucket's rates only (150 writes, 240 operations per second)".to_string(),
    };
    println!(
        "| reliability: {} deliveries through real `fbsync` processes, {limits} | count |",
        unique.len()
    );
    println!("|---|---:|");
    println!("| deliveries sent (distinct events) | {} |", unique.len());
    println!("| POSTs made (with duplicates and retries) | {posts} |");
    println!("| fault: worker SIGKILL | {} |", faults.worker_kills);
    println!(
        "| fault: worker SIGSTOP past its {} s lease ({:.1} s), then SIGCONT | {} |",
        LEASE.as_secs(),
        faults.worker_stalled.as_secs_f64(),
        faults.worker_stalls
    );
    println!(
        "| fault: database connections dropped, seconds | {:.1} |",
        faults.database_down.as_secs_f64()
    );
    println!(
        "| fault: broker restart (stop_app … start_app, {:.1} s) | {} |",
        faults.broker_down.as_secs_f64(),
        faults.broker_restarts
    );
    println!(
        "| fault: storage outage, seconds ({} requests refused) | {:.1} |",
        faults.storage_refused,
        faults.storage_down.as_secs_f64()
    );
    println!("| fault: duplicate deliveries re-sent | {duplicates} |");
    println!("| answered 503, re-sent until 200 | {refused} |");
    println!("| stored | {stored} |");
    println!("| lost | {lost} |");
    println!("| duplicated | {duplicated} |");
    println!("| requests over a limit | {} |", layer.throttled());
    println!(
        "| dead-lettered (unknown Page; {late_posts} deliveries of it were posted) | {} |",
        show(dead_lettered)
    );
    println!("| replayed | {} |", show(replayed));
    println!(
        "| run time, seconds | {:.1} |",
        started.elapsed().as_secs_f64()
    );
    println!();

    let mut logs = survivor.take_lines();
    logs.extend(staller.take_lines());
    logs.extend(ingest.take_lines());
    let notable = log_summary(&logs);
    println!(
        "queues before the replay (name, ready, unacked, consumers): {queues_before_replay:?}"
    );
    println!(
        "queues at the end: {:?}",
        queue_report(&pipeline.prefix).await
    );
    println!("{} log lines read", logs.len());
    println!("registered Page: {registered_tally:?}\nlate Page: {late_tally:?}");
    if let Ok(letters) = &dlq {
        let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
        for letter in letters {
            *reasons
                .entry(letter["reason"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
        println!("dead letters by reason: {reasons:?}");
    }
    println!("warnings and errors logged (count, level, message):\n{notable}");
    assert!(
        registered_tally.is_exact() && registered_tally.stored == registered.len(),
        "{registered_tally:?}"
    );
    assert_eq!(layer.throttled(), 0, "{:?}", layer.violations());
    assert!(
        faults.storage_refused > 0,
        "the workers met the storage outage"
    );
    assert!(
        survivor.is_running() && staller.is_running(),
        "the surviving and the stalled workers rode through every fault"
    );
    assert!(ingest.is_running(), "ingest rode through every fault");
    let dead_lettered = dlq.unwrap_or_else(|e| panic!("dlq list: {e}")).len();
    let replayed = replay.unwrap_or_else(|e| panic!("dlq replay: {e}"));
    let late_tally = late_tally.expect("replayed");
    assert!(late_tally.is_exact(), "{late_tally:?}");
    assert_eq!(
        left.map(|l| l.len()),
        Some(0),
        "the replayed letters left the DLQ"
    );
    assert!(
        dead_lettered >= late_posts,
        "every late delivery ({late_posts} with the duplicates) was dead-lettered"
    );
    assert_eq!(dead_lettered, replayed);
    assert_eq!(lost, 0);
    assert_eq!(duplicated, 0);
    survivor.stop().await;
    staller.stop().await;
    ingest.stop().await;
    pipeline.cleanup().await;
}
