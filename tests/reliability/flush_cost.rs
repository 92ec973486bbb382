//! The flush-cost benchmark (not part of the test suite: `scripts/bench-flush-cost.sh` runs
//! it): what one flush costs the worker when a conversation already holds 1,000, 10,000 or
//! 100,000 events. For each size, a worker (SQLite, the S3 test server, no store limits) finds
//! the conversation stored as the Python app left it and gets one new message at a time:
//!
//! - the first flush reads the object and parses all of it (the full merge);
//! - then new messages that sort after the last stored one are appended (the stored bytes
//!   copied, not parsed; a body too big to keep is read again, its index still known);
//! - then a message older than the last stored one takes the full merge again: what every
//!   flush cost before appending.
//!
//! Each figure is the worker process's CPU time from the delivery to the stored write, less
//! what the idle worker used in as long (its flusher looks for due conversations every 100 ms).
//! It prints one table: CPU per flush, CPU per MB of the object, and the worker's peak RSS.

use std::time::Duration;

use tokio::time::Instant;

use crate::bench_pipeline::{Bench, WRITE_GAP};
use crate::common::metrics::sample;
use crate::common::pipeline::{DbKind, PAGE_ID, conversation_key};
use crate::common::spaces_limits::{s3_client, s3_endpoint};
use crate::common::webhook::{message_delivery, post_signed};
use crate::shared_services::serial;

/// Conversation sizes, in events.
fn sizes() -> Vec<usize> {
    std::env::var("FBSYNC_BENCH_FLUSH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000, 100_000])
}

const USER: &str = "psid-long";

/// Milliseconds between stored messages; the new ones come after the last.
const STEP_MS: i64 = 1_000;

/// The figures of one conversation size.
struct Costs {
    events: usize,
    object_bytes: usize,
    first_ms: f64,
    append_ms: Vec<f64>,
    out_of_order_ms: f64,
    peak_rss_mb: f64,
    /// Merges that appended, and that parsed the whole file (the worker's own count).
    merges: (f64, f64),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark of about a minute: scripts/bench-flush-cost.sh"]
async fn flush_cost() {
    let _serial = serial().await;
    let mut rows = Vec::new();
    for events in sizes() {
        rows.push(measure(events).await);
    }
    println!();
    println!(
        "| events | object, MB | first flush (read + full merge), ms CPU | append flush, ms CPU (3) | out-of-order flush (full merge), ms CPU | append / full merge | append, ms CPU per MB | worker peak RSS, MB | merges: append / full |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let mb = row.object_bytes as f64 / 1e6;
        let append = median(&row.append_ms);
        println!(
            "| {} | {mb:.1} | {:.1} | {} (median {append:.1}) | {:.1} | {:.3} | {:.2} | {:.0} | {} / {} |",
            row.events,
            row.first_ms,
            row.append_ms
                .iter()
                .map(|ms| format!("{ms:.1}"))
                .collect::<Vec<_>>()
                .join(", "),
            row.out_of_order_ms,
            append / row.out_of_order_ms,
            append / mb,
            row.peak_rss_mb,
            row.merges.0,
            row.merges.1,
        );
    }
    println!();
}

async fn measure(events: usize) -> Costs {
    let mut bench = Bench::start(DbKind::Sqlite, None, 1).await;
    let bucket = bench.pipeline.bucket.clone().expect("an S3 store");
    let key = conversation_key(PAGE_ID, USER);
    s3_client(&s3_endpoint())
        .put_object()
        .bucket(&bucket)
        .key(&key)
        .body(stored_conversation(events).into_bytes().into())
        .send()
        .await
        .expect("put the stored conversation");
    let worker = &bench.workers[0].0;
    let idle_ns_per_s = idle_cpu(&bench).await;
    let last_ms = events as i64 * STEP_MS;
    let flush = async |n: usize, timestamp: i64| {
        // Sent once the write gap has passed since the last write: the measured span holds the
        // flush, not the wait for it.
        tokio::time::sleep(WRITE_GAP).await;
        let before = bench.scrape().await;
        let (started, cpu_before) = (Instant::now(), worker.cpu_time_ns());
        let body = message_delivery(PAGE_ID, USER, &format!("m_new_{n}"), timestamp, false);
        assert_eq!(post_signed(&bench.client, &bench.webhook, &body).await, 200);
        let deadline = started + Duration::from_secs(60);
        while bench.stored_since(&before, &bench.scrape().await) == 0 {
            assert!(Instant::now() < deadline, "message {n} was not stored");
            tokio::time::sleep(POLL).await;
        }
        let idle = idle_ns_per_s * started.elapsed().as_secs_f64();
        (worker.cpu_time_ns() - cpu_before) as f64 - idle
    };
    let ms = |ns: f64| (ns / 1e6).max(0.0);
    let first_ms = ms(flush(0, last_ms + STEP_MS).await);
    let mut append_ms = Vec::new();
    for n in 1..=3 {
        append_ms.push(ms(flush(n, last_ms + (n as i64 + 1) * STEP_MS).await));
    }
    let out_of_order_ms = ms(flush(4, last_ms / 2 + STEP_MS / 2).await);

    let written = bench
        .pipeline
        .object(&key)
        .await
        .expect("the conversation is stored");
    let parsed: Vec<serde_json::Value> = serde_json::from_slice(&written).expect("a JSON array");
    assert_eq!(parsed.len(), events + 5, "every message stored once");
    let timestamps: Vec<i64> = parsed
        .iter()
        .map(|e| e["timestamp"].as_i64().unwrap_or_default())
        .collect();
    assert!(timestamps.is_sorted(), "events in timestamp order");
    let peak_rss_mb = worker.peak_rss_kib() as f64 / 1024.0;
    let page = bench.scrape().await;
    let merges = (
        sample(&page, "fbsync_merges_total{way=\"append\"}").unwrap_or(0.0),
        sample(&page, "fbsync_merges_total{way=\"full\"}").unwrap_or(0.0),
    );
    if std::env::var("FBSYNC_BENCH_LOG").is_ok() {
        for line in bench.workers[0].0.take_lines() {
            println!("{line}");
        }
    }
    bench.stop().await;
    Costs {
        events,
        object_bytes: written.len(),
        first_ms,
        append_ms,
        out_of_order_ms,
        peak_rss_mb,
        merges,
    }
}

/// A conversation of `events` messages in the webhook's shape, about 200 bytes each, one
/// every [`STEP_MS`], as the Python app stored them.
fn stored_conversation(events: usize) -> String {
    let texts: Vec<String> = (1..=events)
        .map(|i| {
            let ts = i as i64 * STEP_MS;
            format!(
                r#"{{"sender":{{"id":"{USER}"}},"recipient":{{"id":"{PAGE_ID}"}},"timestamp":{ts},"message":{{"mid":"m_stored_{i}","text":"Do you still have the blue one in size M? I would pick it up on Friday ({i})"}}}}"#
            )
        })
        .collect();
    format!("[{}]", texts.join(","))
}

/// How often the benchmark asks the worker whether the message is stored (its metrics page;
/// not the object, whose HEAD during a PUT would load the store).
const POLL: Duration = Duration::from_millis(10);

/// The worker's CPU use while idle and asked for its metrics every [`POLL`], in ns per second
/// (measured over 2 s).
async fn idle_cpu(bench: &Bench) -> f64 {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let worker = &bench.workers[0].0;
    let (started, before) = (Instant::now(), worker.cpu_time_ns());
    while started.elapsed() < Duration::from_secs(2) {
        bench.scrape().await;
        tokio::time::sleep(POLL).await;
    }
    (worker.cpu_time_ns() - before) as f64 / started.elapsed().as_secs_f64()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}
