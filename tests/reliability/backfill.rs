//! The backfill benchmark (not part of the test suite: `scripts/bench-backfill.sh` runs it): a
//! Page with 10,000 conversations of 20 messages each, read from the fake Graph API by one
//! `fbsync poll --backfill` and stored through all of Spaces' limits (5 PUTs per object per
//! 300 s, 150 writes and 240 operations a second) by one worker on PostgreSQL. It prints the
//! table the README quotes: messages stored per second, Graph calls, object writes per
//! conversation, the time against the bound the bucket's write rate sets (one write per
//! conversation at 150 writes/s), requests over a limit, and the worker's peak RSS.

use std::time::Duration;

use tokio::time::Instant;

use crate::common::broker::queue_depth;
use crate::common::fake_graph::FakeGraph;
use crate::common::pipeline::{DbKind, PAGE_ID, Pipeline};
use crate::common::spaces_limits::{SpacesLimits, list_keys, s3_endpoint};
use crate::shared_services::serial;

/// Conversations of the Page, and messages in each (all with details: the 20 most recent).
fn size() -> (usize, usize) {
    let conversations = std::env::var("FBSYNC_BENCH_CONVERSATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    (conversations, 20)
}

/// The bucket's write rate, the bound's denominator.
const WRITES_PER_SECOND: f64 = 150.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark of a few minutes: scripts/bench-backfill.sh"]
async fn backfill() {
    let _serial = serial().await;
    let (conversations, messages) = size();
    let fake = FakeGraph::start().await;
    fake.set_page(PAGE_ID, "Handmade Shop");
    let start_ms = 1_714_640_400_000;
    for i in 0..conversations {
        fake.add_conversation(
            PAGE_ID,
            &format!("psid-{i}"),
            messages,
            start_ms + i as i64 * 60_000,
        );
    }
    let (mut pipeline, layer) =
        Pipeline::behind_spaces_limits(DbKind::Postgres, SpacesLimits::default()).await;
    pipeline.set("FACEBOOK_GRAPH_URL", &fake.url());
    pipeline.register_page(PAGE_ID).await;
    let mut worker = pipeline.spawn_worker().await;

    let started = Instant::now();
    let (code, _, stderr) = pipeline
        .run(&["poll", "--page-id", PAGE_ID, "--backfill"])
        .await;
    assert_eq!(code, 0, "{stderr}");
    let limit = Duration::from_secs(1_800);
    let conversation_queue = format!("{}.conversation", pipeline.prefix);
    let mut polled_at = None;
    loop {
        if polled_at.is_none() {
            let (_, listing, _) = pipeline.run(&["pages", "list", "--json"]).await;
            if listing.contains("\"last_poll_ms\":1") {
                polled_at = Some(started.elapsed());
            }
        }
        let drained = polled_at.is_some()
            && queue_depth(&conversation_queue).await == 0
            && pipeline.staged_events(&[PAGE_ID]).await == 0;
        if drained || started.elapsed() > limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let elapsed = started.elapsed();
    let peak_rss_kib = worker.peak_rss_kib();

    let bucket = pipeline.bucket.clone().expect("an S3 store");
    let keys = list_keys(
        &s3_endpoint(),
        &bucket,
        &format!(
            "users/{}/facebook_messenger/{PAGE_ID}/conversations/",
            crate::common::pipeline::USER_UUID
        ),
    )
    .await;
    let mut short = 0;
    for i in (0..conversations).step_by((conversations / 50).max(1)) {
        let events = pipeline
            .conversation(PAGE_ID, &format!("psid-{i}"))
            .await
            .unwrap_or_default();
        if events.len() != messages {
            short += 1;
        }
    }
    let writes = layer.puts_for(".json");
    let graph_calls = fake.calls().len();
    let bound = conversations as f64 / WRITES_PER_SECOND;
    let stored = keys.len() * messages;

    println!();
    println!(
        "| backfill: {conversations} conversations x {messages} messages, fake Graph API, 1 worker, PostgreSQL, Spaces' limits | |"
    );
    println!("|---|---:|");
    println!(
        "| poll finished (all staged), seconds | {:.1} |",
        polled_at.unwrap_or(limit).as_secs_f64()
    );
    println!(
        "| everything stored, seconds | {:.1} |",
        elapsed.as_secs_f64()
    );
    println!(
        "| bound: {conversations} writes at {WRITES_PER_SECOND} writes/s, seconds | {bound:.1} |"
    );
    println!("| time / bound | {:.2} |", elapsed.as_secs_f64() / bound);
    println!("| conversation objects stored | {} |", keys.len());
    println!(
        "| messages stored per second | {:.0} |",
        stored as f64 / elapsed.as_secs_f64()
    );
    println!("| Graph API calls | {graph_calls} |");
    println!(
        "| object writes per conversation | {:.2} |",
        writes as f64 / conversations as f64
    );
    println!("| requests over a limit | {} |", layer.throttled());
    println!(
        "| sampled conversations not complete | {short} of {} |",
        (0..conversations)
            .step_by((conversations / 50).max(1))
            .count()
    );
    println!(
        "| worker peak RSS, MB | {:.0} |",
        peak_rss_kib as f64 / 1024.0
    );
    println!();

    assert_eq!(keys.len(), conversations, "every conversation stored");
    assert_eq!(short, 0, "every sampled conversation holds every message");
    assert_eq!(layer.throttled(), 0, "{:?}", layer.violations());
    worker.stop().await;
    pipeline.cleanup().await;
}
