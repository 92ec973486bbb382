//! A worker killed with SIGKILL in the middle of a burst: whatever it held unacked is
//! redelivered, whatever it had staged is flushed by the survivor once the dead worker's leases
//! expire, and every conversation ends up with every message exactly once, sorted.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::common::pipeline::{DbKind, PAGE_ID, Pipeline, StoreKind};
use crate::common::process::log_summary;
use crate::common::tally::{expected_mids, settle_and_tally};
use crate::common::webhook::{conversation_burst, post_burst, webhook_client};
use crate::shared_services::{live_leases, serial};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_burst_loses_and_duplicates_nothing() {
    let _serial = serial().await;
    let started = Instant::now();
    let mut pipeline = Pipeline::new(DbKind::Postgres, StoreKind::S3 { endpoint: None }).await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    // A dead worker's claim on a conversation lasts this long; then the survivor takes over.
    pipeline.set("WORKER_LEASE_MS", "3000");
    pipeline.register_page(PAGE_ID).await;
    let database_url = pipeline.database_url();
    let (mut ingest, urls) = pipeline.spawn_ingest().await;
    let url = urls.webhook;
    let mut victim = pipeline.spawn_worker().await;
    let mut survivor = pipeline.spawn_worker().await;

    // 3,000 messages over 10 conversations, every 10th delivered twice (Facebook does that).
    let (conversations, per_conversation) = (10, 300);
    let unique = conversation_burst(PAGE_ID, "k", conversations, per_conversation);
    let mut deliveries = Vec::with_capacity(unique.len() * 11 / 10);
    for (i, delivery) in unique.iter().enumerate() {
        deliveries.push(delivery.clone());
        if i % 10 == 0 {
            deliveries.push(delivery.clone());
        }
    }
    let deliveries = Arc::new(deliveries);
    let answered = Arc::new(AtomicUsize::new(0));
    let client = webhook_client();

    // The killer: a third into the burst, at a moment when both workers hold a conversation
    // lease if one comes within 1 s (and before two thirds are answered), so the victim dies
    // mid-flush as well as mid-consume.
    let killer = async {
        while answered.load(Ordering::SeqCst) < deliveries.len() / 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let look_until = Instant::now() + Duration::from_secs(1);
        let mut leases = live_leases(&database_url).await;
        while Instant::now() < look_until
            && answered.load(Ordering::SeqCst) < deliveries.len() * 2 / 3
        {
            let owners: BTreeSet<&str> = leases.iter().map(|(_, o, _)| o.as_str()).collect();
            if owners.len() >= 2 {
                break;
            }
            leases = live_leases(&database_url).await;
        }
        let at = answered.load(Ordering::SeqCst);
        victim.kill_hard().await;
        // Leases still held, unchanged, a second later belong to the dead worker.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let later = live_leases(&database_url).await;
        let orphaned = leases.iter().filter(|lease| later.contains(lease)).count();
        (at, orphaned)
    };
    // Each poster rests between deliveries so the burst lasts several seconds however fast
    // ingest is: the kill must land inside it.
    let burst_started = Instant::now();
    let (answers, (killed_at, orphaned)) = tokio::join!(
        post_burst(
            &client,
            &url,
            &deliveries,
            16,
            Duration::from_millis(30),
            &answered
        ),
        killer
    );
    let burst_secs = answers
        .iter()
        .map(|a| a.at - burst_started)
        .max()
        .unwrap_or_default()
        .as_secs_f64();
    assert!(
        killed_at < deliveries.len(),
        "the worker was killed in the middle of the burst"
    );
    let refused: Vec<_> = answers.iter().filter(|a| a.status != 200).collect();
    assert!(
        refused.is_empty(),
        "ingest does not depend on workers, yet refused {} deliveries: {:?}",
        refused.len(),
        refused.iter().take(5).collect::<Vec<_>>()
    );

    let expected = expected_mids(unique.iter());
    let tally = settle_and_tally(&pipeline, &expected, Duration::from_secs(90)).await;
    let survivor_lines = survivor.take_lines();
    println!(
        "worker SIGKILL after {killed_at} of {} deliveries; leases it left behind: {orphaned}; \
         burst {burst_secs:.1} s, settled after {:.1} s: {tally:?}",
        deliveries.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        tally.is_exact() && tally.stored == conversations * per_conversation,
        "{tally:?}\nsurvivor warnings and errors:\n{}",
        log_summary(&survivor_lines)
    );
    assert!(survivor.is_running(), "the survivor kept running");
    survivor.stop().await;
    ingest.stop().await;
    pipeline.cleanup().await;
}
