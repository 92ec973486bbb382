//! Benchmarks of the flusher against one bucket's limits (not part of the test suite:
//! `scripts/bench-bucket.sh` runs them), through the tests' Spaces-limits layer in front of the
//! S3 test server, with ingest and one worker (SQLite):
//!
//! - `spaces_burst`: 20,000 messages over 1,000 conversations at 2,000/s with today's Spaces
//!   limits (300 writes and 500 operations a second, no per-object window). Figures: writes/s
//!   and operations/s while conversations are due (against the 300 writes/s limit), the time
//!   to store the last message against the bound the load and the writes made set
//!   (max(sending time, writes / 300 per s)), visibility p50/p99, and requests over a limit.
//! - `busy_conversation`: one conversation getting a message a second for a minute, at the
//!   defaults, behind today's Spaces limits and on the local directory: each message's time
//!   from its POST to its first sight in the stored object (p50, p99, max against 2 s).
//! - `slower_bucket`: a bucket that takes 40 writes a second while fbsync is configured for
//!   300: SlowDown answers after the first 10 s against the requests sent then (under 5%),
//!   writes/s against 40, everything stored.
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
use crate::common::pipeline::{DbKind, PAGE_ID, Pipeline, StoreKind};
use crate::common::spaces_limits::{SpacesLimits, s3_client, s3_endpoint};
use crate::common::tally::mids;
use crate::common::webhook::{
    accepted, message_delivery, post_at_rate, post_signed, webhook_client,
};
use crate::shared_services::serial;
use fbsync_shared::storage::budget::BucketBudget;
use fbsync_shared::telemetry::BUCKET_RATE_IN_FORCE;

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
    // What the S3 test server itself takes, in this run, before the burst: on this machine it
    // can be the tighter bound.
    let server_puts_per_s = server_put_rate(bench.pipeline.bucket.as_deref().expect("S3")).await;
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
    // From the burst on: the worker's probe at start wrote before it.
    let writes: Vec<i64> = arrivals
        .iter()
        .filter(|(at, write)| *write && *at >= started_ms)
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
    let bound_s =
        (writes.len() as f64 / limits.bucket_writes_per_second as f64).max(sending.as_secs_f64());
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
        "| the S3 test server alone: PUTs/s (2,000 small PUTs, 32 at once, before the burst) | {server_puts_per_s:.0} | {} | {:.2} |",
        limits.bucket_writes_per_second,
        server_puts_per_s / limits.bucket_writes_per_second as f64
    );
    println!(
        "| writes/s while conversations were due, against the test server's own rate | {writes_per_s:.0} | {server_puts_per_s:.0} | {:.2} |",
        writes_per_s / server_puts_per_s
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
            "| last message stored, s after the burst began | {elapsed:.1} | {bound_s:.1} (the longer of sending and {} writes at {}/s) | {:.2} |",
            writes.len(),
            limits.bucket_writes_per_second,
            elapsed / bound_s
        ),
        None => println!(
            "| stored within {elapsed:.0} s (the rest wait for their object's window) | {stored} of {sent} | - | - |"
        ),
    }
    if stored_after.is_some() {
        let server_bound_s = (writes.len() as f64
            / server_puts_per_s.min(limits.bucket_writes_per_second as f64))
        .max(sending.as_secs_f64());
        println!(
            "| last message stored, against the longer of sending and the writes at the test server's own rate | {elapsed:.1} | {server_bound_s:.1} | {:.2} |",
            elapsed / server_bound_s
        );
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

/// PUTs a second the S3 test server takes on its own: 2,000 small objects, 32 at once, straight
/// to it (not through the limits layer), in `bucket`.
async fn server_put_rate(bucket: &str) -> f64 {
    let client = s3_client(&s3_endpoint());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let puts = (0..32).map(|_| {
        let (client, next, bucket) = (client.clone(), next.clone(), bucket.to_string());
        tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= 2_000 {
                    return;
                }
                client
                    .put_object()
                    .bucket(&bucket)
                    .key(format!("_bench/put-rate/{}.json", n % 500))
                    .body(aws_sdk_s3::primitives::ByteStream::from_static(
                        b"[{\"probe\":1}]",
                    ))
                    .send()
                    .await
                    .expect("the S3 test server takes a PUT");
            }
        })
    });
    for put in futures::future::join_all(puts).await {
        put.expect("a PUT task");
    }
    2_000.0 / started.elapsed().as_secs_f64()
}

/// Each message's visibility in one conversation getting a message a second for a minute.
async fn busy_conversation_visibility(store: &str, pipeline: Pipeline) {
    pipeline.register_page(PAGE_ID).await;
    let (mut process, urls) = pipeline.up().await;
    let client = webhook_client();
    let psid = "u-busy";
    let messages = 60;
    let mut posted = Vec::with_capacity(messages);
    let mut seen: Vec<Option<Instant>> = vec![None; messages];
    let started = Instant::now();
    let mut next_post = started;
    while seen.iter().any(Option::is_none) {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "{store}: not every message stored"
        );
        if posted.len() < messages && Instant::now() >= next_post {
            let n = posted.len();
            let body = message_delivery(PAGE_ID, psid, &format!("m_busy_{n}"), n as i64, false);
            assert_eq!(post_signed(&client, &urls.webhook, &body).await, 200);
            posted.push(Instant::now());
            next_post += Duration::from_secs(1);
        }
        if let Some(events) = pipeline.conversation(PAGE_ID, psid).await {
            for mid in mids(&events) {
                if let Some(n) = mid
                    .strip_prefix("m_busy_")
                    .and_then(|n| n.parse::<usize>().ok())
                    && seen[n].is_none()
                {
                    seen[n] = Some(Instant::now());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut visibility: Vec<f64> = seen
        .iter()
        .zip(&posted)
        .map(|(seen, posted)| (seen.expect("seen") - *posted).as_secs_f64())
        .collect();
    visibility.sort_by(f64::total_cmp);
    let at = |q: f64| {
        visibility[((visibility.len() as f64 * q).ceil() as usize).clamp(1, visibility.len()) - 1]
    };
    println!();
    println!(
        "| busy conversation, {store}: 1 message/s for 60 s, defaults | figure | bound | ratio |"
    );
    println!("|---|---:|---:|---:|");
    for (name, value) in [("p50", at(0.5)), ("p99", at(0.99)), ("max", at(1.0))] {
        println!(
            "| visibility {name}, s | {value:.2} | 2.0 | {:.2} |",
            value / 2.0
        );
    }
    println!();
    process.stop().await;
    pipeline.cleanup().await;
    assert!(at(0.99) <= 2.0, "{store}: p99 visibility {:.2} s", at(0.99));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark of about two minutes: scripts/bench-bucket.sh"]
async fn busy_conversation() {
    let _serial = serial().await;
    let (pipeline, layer) =
        Pipeline::behind_spaces_limits(DbKind::Sqlite, SpacesLimits::default()).await;
    busy_conversation_visibility("behind today's Spaces limits", pipeline).await;
    assert_eq!(layer.throttled(), 0, "{:?}", layer.violations());
    let local = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    busy_conversation_visibility("local directory", local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark of about a minute: scripts/bench-bucket.sh"]
async fn slower_bucket() {
    let _serial = serial().await;
    let limits = SpacesLimits {
        bucket_writes_per_second: 40,
        ..SpacesLimits::default()
    };
    // Configured for today's oldest buckets, 300 writes/s: the bucket's real limit is lower.
    let configured = [
        ("SPACES_WRITES_PER_SEC", "300"),
        ("SPACES_OPS_PER_SEC", "500"),
    ];
    let bench = Bench::start_configured(DbKind::Sqlite, Some(limits), 1, &configured).await;
    let (conversations, per_conversation, rate) = (1_000, 5, 500.0);
    let deliveries = Arc::new(round_robin("slow", conversations, per_conversation));
    let before = bench.scrape().await;
    let started = Instant::now();
    let started_ms = fbsync_shared::now_ms();
    let answers = post_at_rate(&bench.client, &bench.webhook, &deliveries, rate, 32).await;
    let sent = accepted(&answers) as u64;
    assert_eq!(sent, deliveries.len() as u64, "every delivery accepted");
    let mut page = bench.scrape().await;
    while bench.stored_since(&before, &page) < sent && started.elapsed() < Duration::from_secs(300)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        page = bench.scrape().await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let stored = bench.stored_since(&before, &page);
    let settled_at = started.into_std() + Duration::from_secs(10);
    let violations = bench.layer().violations();
    let refused_after = violations.iter().filter(|v| v.at >= settled_at).count();
    let arrivals = bench.layer().arrivals();
    let admitted_after = arrivals
        .iter()
        .filter(|(at, _)| *at >= started_ms + 10_000)
        .count();
    let writes: Vec<i64> = arrivals
        .iter()
        .filter(|(at, w)| *w && *at >= started_ms)
        .map(|(at, _)| *at)
        .collect();
    let span_s = writes
        .last()
        .zip(writes.first())
        .map_or(0.001, |(last, first)| {
            ((last - first) as f64 / 1000.0).max(0.001)
        });
    let writes_per_s = writes.len() as f64 / span_s;
    let share_after = refused_after as f64 / (refused_after + admitted_after).max(1) as f64;
    println!();
    println!(
        "| a bucket taking 40 writes/s, configured 300: {} messages over {conversations} conversations at {rate}/s | figure | bound | ratio |",
        deliveries.len()
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| SlowDown answers after the first 10 s, share of the requests sent then ({refused_after} of {}) | {share_after:.3} | 0.05 | {:.2} |",
        refused_after + admitted_after,
        share_after / 0.05
    );
    println!(
        "| SlowDown answers in all (the first seconds find the limit) | {} | - | - |",
        violations.len()
    );
    println!(
        "| writes/s from the first write to the last ({} writes in {span_s:.1} s) | {writes_per_s:.1} | 40 | {:.2} |",
        writes.len(),
        writes_per_s / 40.0
    );
    println!(
        "| lowest rate in force seen at the end, writes/s | {} | 270 (the ceiling's budget) | - |",
        sample(
            &page,
            &format!("{BUCKET_RATE_IN_FORCE}{{class=\"writes\"}}")
        )
        .map_or("-".to_string(), |r| format!("{r:.0}"))
    );
    println!("| stored, in {elapsed:.1} s | {stored} of {sent} | - | - |");
    println!();
    assert_eq!(stored, sent, "every accepted message stored");
    assert!(share_after < 0.05, "SlowDown after 10 s: {share_after:.3}");
    bench.stop().await;
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
