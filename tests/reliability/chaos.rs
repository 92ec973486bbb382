//! The chaos benchmark (not part of the test suite: `scripts/chaos.sh` runs it): 100,000
//! distinct deliveries, 5% of them delivered twice, through ingest, two workers and PostgreSQL,
//! with all of Spaces' limits in front of the store, while two workers are killed with SIGKILL,
//! one is frozen with SIGSTOP past its lease, the broker restarts, the store is down for 30 s
//! and the database for 10 s. It prints the table the README quotes: stored, lost, duplicated,
//! dead-lettered, requests over a limit, and the time to drain after the last delivery.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::common::broker::queue_depth;
use crate::common::pipeline::{DbKind, PAGE_ID, Pipeline};
use crate::common::process::{FbsyncProcess, log_summary};
use crate::common::spaces_limits::SpacesLimits;
use crate::common::tally::{expected_mids, tally};
use crate::common::webhook::{conversation_burst, post_burst, retry_refused, webhook_client};
use crate::shared_services::{BrokerOutage, serial};

/// Distinct deliveries: conversations × messages each.
const CONVERSATIONS: usize = 500;
const PER_CONVERSATION: usize = 200;
/// A claim outlives a frozen worker by this much.
const LEASE: Duration = Duration::from_secs(5);
const STORE_OUTAGE: Duration = Duration::from_secs(30);
const DATABASE_OUTAGE: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Faults {
    worker_kills: usize,
    worker_stall: Duration,
    broker_down: Duration,
    store_down: Duration,
    store_refused: u64,
    database_down: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark of several minutes: scripts/chaos.sh"]
async fn chaos() {
    let _serial = serial().await;
    let started = Instant::now();
    let (mut pipeline, layer) =
        Pipeline::behind_spaces_limits(DbKind::Postgres, SpacesLimits::default()).await;
    // Spaces' limits as they are: 5 PUTs per object per 300 s, 150 writes and 240 operations a
    // second (the defaults).
    pipeline.set("WORKER_LEASE_MS", &LEASE.as_millis().to_string());
    let database_path = pipeline.database_through_proxy().await;
    pipeline.register_page(PAGE_ID).await;
    let (mut ingest, urls) = pipeline.spawn_ingest().await;
    let mut workers: Vec<FbsyncProcess> =
        vec![pipeline.spawn_worker().await, pipeline.spawn_worker().await];

    let unique = conversation_burst(PAGE_ID, "x", CONVERSATIONS, PER_CONVERSATION);
    let mut deliveries = Vec::with_capacity(unique.len() * 21 / 20);
    for (i, delivery) in unique.iter().enumerate() {
        deliveries.push(delivery.clone());
        if i % 20 == 7 {
            deliveries.push(delivery.clone());
        }
    }
    let duplicates = deliveries.len() - unique.len();
    let deliveries = Arc::new(deliveries);
    let answered = Arc::new(AtomicUsize::new(0));
    let client = webhook_client();

    let chaos = async {
        let mut faults = Faults::default();
        let reach = |share: usize| {
            let answered = answered.clone();
            let target = deliveries.len() * share / 100;
            async move {
                while answered.load(Ordering::SeqCst) < target {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        reach(10).await;
        workers[0].kill_hard().await;
        faults.worker_kills += 1;
        workers[0] = pipeline.spawn_worker().await;
        reach(25).await;
        workers[1].pause();
        let stalled = Instant::now();
        tokio::time::sleep(LEASE + Duration::from_secs(2)).await;
        workers[1].resume();
        faults.worker_stall = stalled.elapsed();
        reach(40).await;
        let outage = BrokerOutage::stop().await;
        let down = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        outage.start().await;
        faults.broker_down = down.elapsed();
        reach(55).await;
        layer.set_down(true);
        let down = Instant::now();
        tokio::time::sleep(STORE_OUTAGE).await;
        layer.set_down(false);
        faults.store_down = down.elapsed();
        faults.store_refused = layer.refused_while_down();
        reach(70).await;
        database_path.cut();
        let down = Instant::now();
        tokio::time::sleep(DATABASE_OUTAGE).await;
        database_path.restore();
        faults.database_down = down.elapsed();
        reach(85).await;
        workers[1].kill_hard().await;
        faults.worker_kills += 1;
        workers[1] = pipeline.spawn_worker().await;
        faults
    };
    let (answers, faults) = tokio::join!(
        post_burst(
            &client,
            &urls.webhook,
            &deliveries,
            16,
            Duration::ZERO,
            &answered
        ),
        chaos
    );
    let retries = retry_refused(
        &client,
        &urls.webhook,
        &deliveries,
        &answers,
        Duration::from_secs(300),
    )
    .await;
    let sent = Instant::now();
    let sending = sent - started;

    // Drained: nothing on the queue, nothing staged (the last flushes may wait out an object's
    // 300 s budget).
    let conversation_queue = format!("{}.conversation", pipeline.prefix);
    let drain_limit = Duration::from_secs(900);
    loop {
        let idle = queue_depth(&conversation_queue).await == 0
            && pipeline.staged_events(&[PAGE_ID]).await == 0;
        if idle || sent.elapsed() > drain_limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let drained = sent.elapsed();
    let counted = tally(&pipeline, &expected_mids(unique.iter())).await;
    let dead_lettered = queue_depth(&format!("{}.dead", pipeline.prefix)).await;

    println!();
    println!(
        "| chaos: {} distinct deliveries, ingest + 2 workers + PostgreSQL, Spaces' limits | |",
        unique.len()
    );
    println!("|---|---:|");
    println!(
        "| POSTs (5% duplicates, and 503s re-sent) | {} |",
        answers.len() + retries.len()
    );
    println!("| duplicate deliveries | {duplicates} |");
    println!("| fault: worker SIGKILL | {} |", faults.worker_kills);
    println!(
        "| fault: worker SIGSTOP past its {} s lease, seconds | {:.1} |",
        LEASE.as_secs(),
        faults.worker_stall.as_secs_f64()
    );
    println!(
        "| fault: broker restart, seconds down | {:.1} |",
        faults.broker_down.as_secs_f64()
    );
    println!(
        "| fault: store outage, seconds ({} requests refused) | {:.1} |",
        faults.store_refused,
        faults.store_down.as_secs_f64()
    );
    println!(
        "| fault: database outage, seconds | {:.1} |",
        faults.database_down.as_secs_f64()
    );
    println!("| answered 503 and re-sent | {} |", retries.len());
    println!("| stored | {} |", counted.stored);
    println!("| lost | {} |", counted.lost);
    println!("| duplicated | {} |", counted.duplicated);
    println!("| dead-lettered | {dead_lettered} |");
    println!("| requests over a limit | {} |", layer.throttled());
    println!("| sending, seconds | {:.1} |", sending.as_secs_f64());
    println!(
        "| drain after the last delivery, seconds | {:.1} |",
        drained.as_secs_f64()
    );
    println!();

    let mut lines: Vec<String> = workers.iter_mut().flat_map(|w| w.take_lines()).collect();
    lines.extend(ingest.take_lines());
    println!(
        "warnings and errors (count, level, message):\n{}",
        log_summary(&lines)
    );
    assert!(counted.is_exact(), "{counted:?}");
    assert_eq!(counted.stored, unique.len());
    assert_eq!(dead_lettered, 0);
    assert_eq!(layer.throttled(), 0, "{:?}", layer.violations());

    for worker in &mut workers {
        worker.stop().await;
    }
    ingest.stop().await;
    pipeline.cleanup().await;
}
