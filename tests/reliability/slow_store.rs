//! A store that answers slowly: every request reaches the bucket within moments of the budget
//! window it was counted in (that window or the few after it, never a whole slow answer later),
//! because the window is charged right before each request is sent, not when the flush starts.
//! Spaces' limits layer sees no request over the bucket's rates.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::Connection;

use crate::common::pipeline::{DbKind, PAGE_ID, Pipeline, StoreKind};
use crate::common::process::log_summary;
use crate::common::spaces_limits::{SpacesLimitLayer, SpacesLimits, s3_endpoint};
use crate::common::tally::{expected_mids, settle_and_tally};
use crate::common::webhook::{conversation_burst, post_signed, webhook_client};
use crate::shared_services::serial;

/// The bucket's rates, scaled down so that a small burst meets them.
const WRITES_PER_SECOND: usize = 10;
const OPERATIONS_PER_SECOND: usize = 16;
/// How long the store takes to answer each request: unevenly, up to seconds.
const SLOW_ANSWERS: std::ops::Range<Duration> =
    Duration::from_millis(100)..Duration::from_millis(1_500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushes_through_a_slow_store_stay_within_the_bucket_rates() {
    let _serial = serial().await;
    let layer = SpacesLimitLayer::start(
        &s3_endpoint(),
        SpacesLimits {
            object_puts: usize::MAX,
            bucket_writes_per_second: WRITES_PER_SECOND,
            bucket_operations_per_second: OPERATIONS_PER_SECOND,
            ..SpacesLimits::default()
        },
    )
    .await;
    layer.set_delay_between(SLOW_ANSWERS);
    let mut pipeline = Pipeline::new(
        DbKind::Postgres,
        StoreKind::S3 {
            endpoint: Some(layer.endpoint()),
        },
    )
    .await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    pipeline.set("SPACES_WRITES_PER_SEC", &WRITES_PER_SECOND.to_string());
    pipeline.set("SPACES_OPS_PER_SEC", &OPERATIONS_PER_SECOND.to_string());
    pipeline.register_page(PAGE_ID).await;
    let (mut ingest, urls) = pipeline.spawn_ingest().await;
    let mut workers = [pipeline.spawn_worker().await, pipeline.spawn_worker().await];
    let client = webhook_client();
    // 40 conversations, a message each a second for 8 s: more due than the bucket's rates let
    // through, so every window is used while slow answers are still coming back.
    let deliveries = conversation_burst(PAGE_ID, "slow", 40, 8);
    for wave in deliveries.chunks(40) {
        for delivery in wave {
            assert_eq!(
                post_signed(&client, &urls.webhook, &delivery.body).await,
                200
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let tally = settle_and_tally(
        &pipeline,
        &expected_mids(deliveries.iter()),
        Duration::from_secs(120),
    )
    .await;
    let lines: Vec<String> = workers.iter_mut().flat_map(|w| w.take_lines()).collect();
    println!(
        "{} requests forwarded through a store answering in {SLOW_ANSWERS:?}, {} over a limit",
        layer.forwarded(),
        layer.throttled()
    );
    assert!(
        tally.is_exact() && tally.stored == deliveries.len(),
        "{tally:?}\n{}",
        log_summary(&lines)
    );
    assert_eq!(
        layer.throttled(),
        0,
        "no request over the bucket's rates: {:?}",
        layer.violations()
    );

    for worker in &mut workers {
        worker.stop().await;
    }
    ingest.stop().await;
    pipeline.cleanup().await;
}

/// Length of the budget windows for Spaces' default rates (150 writes, 240 operations per
/// second), which this test keeps. The test also checks that every window it reads from
/// `bucket_budget` starts on a multiple of it.
const WINDOW_MS: i64 = 50;
/// How long the store takes to answer every request.
const SLOW_ANSWER: Duration = Duration::from_secs(1);
/// Conversations of the one wave, a message each.
const CONVERSATIONS: usize = 40;

/// Writes and operations of one budget window.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    writes: i64,
    ops: i64,
}

/// Reads `bucket_budget` and keeps, per window, the most seen so far (rows older than 10 s are
/// trimmed now and then, and a window only grows while it is charged).
async fn snapshot_budget(
    db: &mut sqlx::PgConnection,
    charges: &Mutex<BTreeMap<i64, Counts>>,
) -> Result<(), sqlx::Error> {
    let rows: Vec<(i64, i64, i64)> =
        sqlx::query_as("SELECT window_ms, writes, ops FROM bucket_budget")
            .fetch_all(db)
            .await?;
    let mut charges = charges.lock().expect("charges lock");
    for (window, writes, ops) in rows {
        let seen = charges.entry(window).or_default();
        seen.writes = seen.writes.max(writes);
        seen.ops = seen.ops.max(ops);
    }
    Ok(())
}

/// One window whose arrivals its budget did not cover.
#[derive(Debug)]
#[allow(dead_code)] // Fields only the failure message shows (through Debug) are not "read".
struct Uncovered {
    window_ms: i64,
    arrived: (i64, i64),
    charged: (i64, i64),
    left_over_from_previous: (i64, i64),
    uncovered: (i64, i64),
}

/// How many windows after the one it was counted in a request may still reach the store: its
/// own window's end plus this many more (200 ms in all). A busy 2-core machine delays a request
/// by tens of ms between its statement and the store; the budget's caps count one window of
/// such lateness and its 10% margin about one more (the rate itself is checked by the limits
/// layer's count, which must stay 0). The fault this test guards against is far larger: a PUT
/// charged when its flush started reaches the store a whole slow answer (1 s, the GET before
/// it) after its window.
const LATE_WINDOWS: i64 = 3;

/// Walks the windows in time order: the requests that arrived in a window must be covered by
/// its charges plus what the `LATE_WINDOWS` windows before it charged and did not use
/// themselves. Arrivals use the oldest leftover first (it expires soonest). Writes and
/// operations separately; a write is also an operation.
fn uncovered_windows(arrivals: &[(i64, bool)], charges: &BTreeMap<i64, Counts>) -> Vec<Uncovered> {
    let mut arrived: BTreeMap<i64, Counts> = BTreeMap::new();
    for &(at, write) in arrivals {
        let window = arrived.entry(at - at.rem_euclid(WINDOW_MS)).or_default();
        window.ops += 1;
        window.writes += i64::from(write);
    }
    let windows: std::collections::BTreeSet<i64> =
        arrived.keys().chain(charges.keys()).copied().collect();
    // (window, its charges not used yet), oldest first, at most LATE_WINDOWS old.
    let mut unused: std::collections::VecDeque<(i64, Counts)> = Default::default();
    let mut uncovered = Vec::new();
    for window in windows {
        unused.retain(|(start, _)| window - start <= LATE_WINDOWS * WINDOW_MS);
        let came = arrived.get(&window).copied().unwrap_or_default();
        let charged = charges.get(&window).copied().unwrap_or_default();
        let left_over_from_previous =
            unused
                .iter()
                .fold(Counts::default(), |sum, (_, left)| Counts {
                    writes: sum.writes + left.writes,
                    ops: sum.ops + left.ops,
                });
        unused.push_back((window, charged));
        let (mut writes_short, mut ops_short) = (came.writes, came.ops);
        for (_, left) in unused.iter_mut() {
            let writes = writes_short.min(left.writes);
            let ops = ops_short.min(left.ops);
            left.writes -= writes;
            left.ops -= ops;
            writes_short -= writes;
            ops_short -= ops;
        }
        if writes_short > 0 || ops_short > 0 {
            uncovered.push(Uncovered {
                window_ms: window,
                arrived: (came.writes, came.ops),
                charged: (charged.writes, charged.ops),
                left_over_from_previous: (
                    left_over_from_previous.writes,
                    left_over_from_previous.ops,
                ),
                uncovered: (writes_short, ops_short),
            });
        }
    }
    uncovered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_store_within_moments_of_the_budget_window_they_were_counted_in() {
    let _serial = serial().await;
    let layer = SpacesLimitLayer::start(
        &s3_endpoint(),
        SpacesLimits {
            object_puts: usize::MAX,
            ..SpacesLimits::default()
        },
    )
    .await;
    layer.set_delay(SLOW_ANSWER);
    let mut pipeline = Pipeline::new(
        DbKind::Postgres,
        StoreKind::S3 {
            endpoint: Some(layer.endpoint()),
        },
    )
    .await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    pipeline.register_page(PAGE_ID).await;
    let (mut ingest, urls) = pipeline.spawn_ingest().await;
    let mut worker = pipeline.spawn_worker().await;
    let client = webhook_client();

    // Snapshots of the charged windows every 500 ms while the flushes run.
    let charges = Arc::new(Mutex::new(BTreeMap::<i64, Counts>::new()));
    let mut db = sqlx::PgConnection::connect(&pipeline.database_url())
        .await
        .expect("connect to the pipeline's database");
    let snapshots = {
        let charges = charges.clone();
        let url = pipeline.database_url();
        tokio::spawn(async move {
            let mut db = sqlx::PgConnection::connect(&url)
                .await
                .expect("connect to the pipeline's database");
            loop {
                // The table appears with the worker's migrations; until then there is nothing.
                let _ = snapshot_budget(&mut db, &charges).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    // One wave: a message to each conversation at once, then nothing more.
    let deliveries = conversation_burst(PAGE_ID, "counted", CONVERSATIONS, 1);
    for delivery in &deliveries {
        assert_eq!(
            post_signed(&client, &urls.webhook, &delivery.body).await,
            200
        );
    }
    let tally = settle_and_tally(
        &pipeline,
        &expected_mids(deliveries.iter()),
        Duration::from_secs(25),
    )
    .await;
    snapshots.abort();
    snapshot_budget(&mut db, &charges)
        .await
        .expect("read bucket_budget");
    let charges = charges.lock().expect("charges lock").clone();
    let arrivals = layer.arrivals();
    let lines = worker.take_lines();

    assert!(
        tally.is_exact() && tally.stored == deliveries.len(),
        "{tally:?}\n{}",
        log_summary(&lines)
    );
    assert!(
        charges.keys().all(|window| window % WINDOW_MS == 0),
        "budget windows are {WINDOW_MS} ms long: {charges:?}"
    );
    let uncovered = uncovered_windows(&arrivals, &charges);
    println!(
        "{} requests ({} writes) reached the store, {} windows charged, {} windows not covered",
        arrivals.len(),
        arrivals.iter().filter(|(_, write)| *write).count(),
        charges.len(),
        uncovered.len()
    );
    let report: Vec<String> = uncovered
        .iter()
        .map(|window| format!("{window:?}"))
        .collect();
    for line in &report {
        println!("{line}");
    }
    assert!(
        !arrivals.is_empty(),
        "the flushes sent requests through the layer"
    );
    assert!(
        uncovered.is_empty(),
        "{} windows got requests their budget did not count (writes, ops):\n{}",
        uncovered.len(),
        report.join("\n")
    );
    assert_eq!(
        layer.throttled(),
        0,
        "no request over the bucket's rates: {:?}",
        layer.violations()
    );

    worker.stop().await;
    ingest.stop().await;
    pipeline.cleanup().await;
}

/// The coverage check itself: a request may arrive up to `LATE_WINDOWS` windows after the one
/// that counted it, never later, and a window's charges cover one request each.
#[test]
fn the_coverage_check_refuses_requests_later_than_a_few_windows_or_beyond_their_count() {
    let charged_once = BTreeMap::from([(1_000, Counts { writes: 1, ops: 1 })]);
    let arriving = |late_windows: i64| [(1_000 + late_windows * WINDOW_MS + 7, true)];
    for late in 0..=LATE_WINDOWS {
        assert!(
            uncovered_windows(&arriving(late), &charged_once).is_empty(),
            "{late} windows late is covered"
        );
    }
    assert_eq!(
        uncovered_windows(&arriving(LATE_WINDOWS + 1), &charged_once).len(),
        1,
        "later than that is not"
    );
    let twice = [(1_010, true), (1_060, true)];
    assert_eq!(
        uncovered_windows(&twice, &charged_once).len(),
        1,
        "one charge covers one request"
    );
    let a_read_is_not_a_write = [(1_010, false)];
    assert!(uncovered_windows(&a_read_is_not_a_write, &charged_once).is_empty());
    let a_write_charged_as_a_read = BTreeMap::from([(1_000, Counts { writes: 0, ops: 1 })]);
    assert_eq!(
        uncovered_windows(&arriving(0), &a_write_charged_as_a_read).len(),
        1
    );
}
