//! The worker-cost benchmark (not part of the test suite: `scripts/bench-worker-cost.sh` runs
//! it): the workers' CPU time per 1,000 stored messages, the figure that does not depend on how
//! busy the machine is. 20,000 messages at 2,000/s over 50 conversations, no store limits, the
//! S3 test server; on SQLite and on PostgreSQL, with one and with two workers. CPU is counted
//! from the first delivery until every message is stored, less what the idle workers use in as
//! long.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::bench_pipeline::{Bench, round_robin};
use crate::common::pipeline::DbKind;
use crate::common::webhook::{accepted, post_at_rate};
use crate::shared_services::serial;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark of about two minutes: scripts/bench-worker-cost.sh"]
async fn worker_cost() {
    let _serial = serial().await;
    let (conversations, per_conversation, rate) = (50, 400, 2_000.0);
    println!();
    println!(
        "| database, workers | messages | stored in, s | workers' CPU, s | CPU ms per 1,000 stored messages | stored/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (db, name) in [(DbKind::Sqlite, "SQLite"), (DbKind::Postgres, "PostgreSQL")] {
        for workers in [1, 2] {
            let bench = Bench::start(db, None, workers).await;
            let idle_ns_per_s = {
                let (from, before) = (Instant::now(), bench.workers_cpu_ns());
                tokio::time::sleep(Duration::from_secs(2)).await;
                (bench.workers_cpu_ns() - before) as f64 / from.elapsed().as_secs_f64()
            };
            let tag = format!("cost{workers}");
            let deliveries = Arc::new(round_robin(&tag, conversations, per_conversation));
            let before = bench.scrape().await;
            let (started, cpu_before) = (Instant::now(), bench.workers_cpu_ns());
            let answers = post_at_rate(&bench.client, &bench.webhook, &deliveries, rate, 32).await;
            let sent = accepted(&answers) as u64;
            assert_eq!(sent, deliveries.len() as u64, "every delivery accepted");
            let mut stored = 0;
            while started.elapsed() < Duration::from_secs(300) {
                stored = bench.stored_since(&before, &bench.scrape().await);
                if stored >= sent {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let elapsed = started.elapsed().as_secs_f64();
            let cpu_s =
                ((bench.workers_cpu_ns() - cpu_before) as f64 - idle_ns_per_s * elapsed) / 1e9;
            println!(
                "| {name}, {workers} | {sent} | {elapsed:.1} | {cpu_s:.2} | {:.0} | {:.0} |",
                cpu_s * 1e3 / (stored as f64 / 1e3),
                stored as f64 / elapsed
            );
            assert_eq!(stored, sent, "every accepted message stored");
            bench.stop().await;
        }
    }
    println!();
}
