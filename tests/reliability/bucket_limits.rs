//! Benchmarks of the flusher against one bucket's limits (not part of the test suite:
//! `scripts/bench-bucket.sh` runs them), through the tests' Spaces-limits layer in front of the
//! S3 test server, with ingest and one worker (SQLite):
//!
//! - `spaces_burst`: 20,000 messages over 1,000 conversations at 2,000/s with Spaces' limits
//!   (5 PUTs per object per 300 s, 150 writes and 240 operations a second). Figures: writes/s
//!   and operations/s while conversations are due (against the 150 writes/s limit), the time
//!   to store the last message against the bound the writes made set (writes / 150 per s),
//!   visibility p50/p99, and requests over a limit.
//! - `beyond_capacity`: twice what the bucket can write, with the limits scaled down so it runs
//!   here: 10 writes and 16 operations a second, 1,200 busy conversations each getting a message
//!   every 30 s (at one write per conversation a minute the bucket serves 600). Figures: over
//!   time, the staged backlog and the oldest staged event's age (they must level off, not
//!   grow), and in the end visibility p50/p99, events per write and the drain.
//!
//! Each prints one table; `scripts/bench.sh` reads them.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::bench_pipeline::{Bench, VISIBILITY, round_robin};
use crate::common::metrics::{histogram_quantile, sample};
use crate::common::pipeline::DbKind;
use crate::common::spaces_limits::SpacesLimits;
use crate::common::webhook::{accepted, post_at_rate};
use crate::shared_services::serial;
use fbsync_shared::storage::budget::BucketBudget;

/// Writes and operations per whole second from `from` (ms since the epoch) to `to`, from the
/// layer's admitted requests.
fn per_second(arrivals: &[(i64, bool)], from: i64, to: i64) -> Vec<(u64, u64)> {
    let seconds = ((to - from).max(0) / 1000) as usize;
    let mut counts = vec![(0_u64, 0_u64); seconds];
    for (at, write) in arrivals {
        let Some(slot) = usize::try_from((at - from) / 1000)
            .ok()
            .and_then(|i| counts.get_mut(i))
        else {
            continue;
        };
        slot.1 += 1;
        if *write {
            slot.0 += 1;
        }
    }
    counts
}

fn fmt_bound(bound: Option<f64>) -> String {
    bound.map_or_else(|| "> 900".to_string(), |b| format!("<= {b}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark of about a minute: scripts/bench-bucket.sh"]
async fn spaces_burst() {
    let _serial = serial().await;
    let limits = SpacesLimits::default();
    let bench = Bench::start(DbKind::Sqlite, Some(limits), 1).await;
    let (conversations, per_conversation, rate) = (1_000, 20, 2_000.0);
    let deliveries = Arc::new(round_robin("burst", conversations, per_conversation));
    let before = bench.scrape().await;
    let started = Instant::now();
    let started_ms = fbsync_shared::now_ms();
    let answers = post_at_rate(&bench.client, &bench.webhook, &deliveries, rate, 64).await;
    let sent = accepted(&answers) as u64;
    assert_eq!(sent, deliveries.len() as u64, "every delivery accepted");
    let sending = started.elapsed();
    // Everything stored, or 330 s (a conversation waiting for its object's window).
    let (mut page, mut stored_after) = (bench.scrape().await, None);
    while started.elapsed() < Duration::from_secs(330) {
        page = bench.scrape().await;
        if bench.stored_since(&before, &page) >= sent {
            stored_after = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored = bench.stored_since(&before, &page);
    let arrivals = bench.layer().arrivals();
    let writes: Vec<i64> = arrivals
        .iter()
        .filter(|(_, write)| *write)
        .map(|(at, _)| *at)
        .collect();
    let (first, last) = (
        writes.first().copied().unwrap_or(started_ms),
        writes.last().copied().unwrap_or(started_ms),
    );
    let span_s = ((last - first) as f64 / 1000.0).max(0.001);
    let ops = arrivals
        .iter()
        .filter(|(at, _)| (first..=last).contains(at))
        .count();
    let seconds = per_second(&arrivals, first, last);
    let lowest = seconds.iter().map(|(w, _)| *w).min().unwrap_or(0);
    let bound_s = writes.len() as f64 / limits.bucket_writes_per_second as f64;
    let writes_per_s = writes.len() as f64 / span_s;
    let elapsed = stored_after.unwrap_or(started.elapsed()).as_secs_f64();

    println!();
    println!(
        "| Spaces' limits burst: {} messages over {conversations} conversations at {rate}/s, 1 worker, SQLite | figure | bound | ratio |",
        deliveries.len()
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| sending, s | {:.1} | {:.1} | - |",
        sending.as_secs_f64(),
        deliveries.len() as f64 / rate
    );
    println!(
        "| writes/s while conversations were due ({} writes in {span_s:.1} s) | {writes_per_s:.0} | {} | {:.2} |",
        writes.len(),
        limits.bucket_writes_per_second,
        writes_per_s / limits.bucket_writes_per_second as f64
    );
    println!(
        "| lowest writes in one whole second of that span | {lowest} | {} | {:.2} |",
        limits.bucket_writes_per_second,
        lowest as f64 / limits.bucket_writes_per_second as f64
    );
    println!(
        "| operations/s in that span | {:.0} | {} | {:.2} |",
        ops as f64 / span_s,
        limits.bucket_operations_per_second,
        ops as f64 / span_s / limits.bucket_operations_per_second as f64
    );
    match stored_after {
        Some(_) => println!(
            "| last message stored, s after the burst began | {elapsed:.1} | {bound_s:.1} ({} writes at {}/s) | {:.2} |",
            writes.len(),
            limits.bucket_writes_per_second,
            elapsed / bound_s
        ),
        None => println!(
            "| stored within {elapsed:.0} s (the rest wait for their object's window) | {stored} of {sent} | - | - |"
        ),
    }
    println!(
        "| visibility p50 / p99, s (histogram bounds) | {} / {} | - | - |",
        fmt_bound(histogram_quantile(&before, &page, VISIBILITY, 0.50)),
        fmt_bound(histogram_quantile(&before, &page, VISIBILITY, 0.99)),
    );
    println!(
        "| conversation writes per conversation | {:.2} | - | - |",
        writes.len() as f64 / conversations as f64
    );
    println!(
        "| requests over a limit | {} | 0 | - |",
        bench.layer().throttled()
    );
    println!(
        "writes (operations) per second from the first write: {}",
        seconds
            .iter()
            .map(|(w, o)| format!("{w} ({o})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    bench.stop_all_stored_within_limits(stored, sent).await;
}

/// Seconds the beyond-capacity load lasts.
fn capacity_seconds() -> u64 {
    std::env::var("FBSYNC_BENCH_CAPACITY_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark of about eight minutes: scripts/bench-bucket.sh"]
async fn beyond_capacity() {
    let _serial = serial().await;
    let limits = SpacesLimits {
        object_puts: 5,
        object_window: Duration::from_secs(300),
        bucket_writes_per_second: 10,
        bucket_operations_per_second: 16,
    };
    let bench = Bench::start(DbKind::Sqlite, Some(limits), 1).await;
    let conversations = 1_200;
    let every = Duration::from_secs(30);
    let seconds = capacity_seconds();
    let per_conversation = (seconds / every.as_secs()).max(1) as usize;
    let rate = conversations as f64 / every.as_secs_f64();
    let deliveries = Arc::new(round_robin("busy", conversations, per_conversation));
    let before = bench.scrape().await;
    let worker_cpu_before = bench.workers[0].0.cpu_time_ns();
    let started = Instant::now();
    let started_ms = fbsync_shared::now_ms();
    let sender = {
        let (client, url, deliveries) = (
            bench.client.clone(),
            bench.webhook.clone(),
            deliveries.clone(),
        );
        tokio::spawn(async move { post_at_rate(&client, &url, &deliveries, rate, 16).await })
    };
    // Every 30 s: stored, the staged backlog, the oldest staged event's age, writes/s.
    let mut timeline = Vec::new();
    let mut last_writes = (0_usize, started);
    let sample_every = Duration::from_secs(30);
    let mut stored_after = None;
    let mut page = before.clone();
    while started.elapsed() < Duration::from_secs(seconds + 900) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        page = bench.scrape().await;
        let stored = bench.stored_since(&before, &page);
        let done = sender.is_finished() && stored >= deliveries.len() as u64;
        if started.elapsed() >= sample_every * (timeline.len() as u32 + 1) || done {
            let writes = bench
                .layer()
                .arrivals()
                .iter()
                .filter(|(_, write)| *write)
                .count();
            let writes_per_s =
                (writes - last_writes.0) as f64 / last_writes.1.elapsed().as_secs_f64().max(0.001);
            last_writes = (writes, Instant::now());
            timeline.push((
                started.elapsed().as_secs(),
                stored,
                sample(&page, "fbsync_staged_backlog").unwrap_or(-1.0),
                sample(&page, "fbsync_staged_oldest_seconds").unwrap_or(-1.0),
                writes_per_s,
            ));
        }
        if done {
            stored_after = Some(started.elapsed());
            break;
        }
    }
    let worker_cpu_s = (bench.workers[0].0.cpu_time_ns() - worker_cpu_before) as f64 / 1e9;
    let answers = sender.await.expect("sender");
    let sent = accepted(&answers) as u64;
    let stored = bench.stored_since(&before, &page);
    let writes = bench
        .layer()
        .arrivals()
        .iter()
        .filter(|(at, write)| *write && *at >= started_ms)
        .count();

    println!();
    println!(
        "| beyond capacity: {conversations} conversations, a message each every {} s for {seconds} s ({rate:.0}/s), {} writes/s and {} operations/s | | | | |",
        every.as_secs(),
        limits.bucket_writes_per_second,
        limits.bucket_operations_per_second
    );
    println!("| s | stored | staged backlog | oldest staged, s | writes/s |");
    println!("|---:|---:|---:|---:|---:|");
    for (at, stored, backlog, oldest, writes_per_s) in &timeline {
        println!("| {at} | {stored} | {backlog:.0} | {oldest:.0} | {writes_per_s:.1} |");
    }
    // A conversation the worker did not write within the last 120 s is read before it is
    // written: two operations a flush, at the operations the budget sustains.
    let budget = BucketBudget::for_rates(
        limits.bucket_writes_per_second as i64,
        limits.bucket_operations_per_second as i64,
    );
    let ops_per_second = budget.sustained(budget.ops_per_second);
    let cycle = conversations as f64 / (ops_per_second / 2.0);
    println!();
    println!("| beyond capacity | figure | bound | ratio |");
    println!("|---|---:|---:|---:|");
    println!(
        "| writes/s over the run | {:.1} | {} | {:.2} |",
        writes as f64 / stored_after.unwrap_or(started.elapsed()).as_secs_f64(),
        limits.bucket_writes_per_second,
        writes as f64
            / stored_after.unwrap_or(started.elapsed()).as_secs_f64()
            / limits.bucket_writes_per_second as f64
    );
    println!(
        "| messages per write | {:.1} | - | - |",
        stored as f64 / writes.max(1) as f64
    );
    println!(
        "| visibility p50 / p99, s (histogram bounds) | {} / {} | {cycle:.0} (every conversation once, a GET and a PUT each at the budget's {ops_per_second:.0} operations/s) | - |",
        fmt_bound(histogram_quantile(&before, &page, VISIBILITY, 0.50)),
        fmt_bound(histogram_quantile(&before, &page, VISIBILITY, 0.99)),
    );
    println!(
        "| drain after the last delivery, s | {:.0} | {cycle:.0} (as above) | - |",
        stored_after
            .map(|d| d.as_secs_f64() - seconds as f64)
            .unwrap_or(f64::NAN),
    );
    println!(
        "| stored of sent; requests over a limit | {stored} of {sent}; {} | - | - |",
        bench.layer().throttled()
    );
    // Saturated, most flushes find no room in the bucket: what they cost the worker.
    println!(
        "| worker CPU over the run, s; per write, ms | {worker_cpu_s:.1}; {:.1} | - | - |",
        worker_cpu_s * 1000.0 / writes.max(1) as f64
    );
    println!();
    bench.stop_all_stored_within_limits(stored, sent).await;
}
