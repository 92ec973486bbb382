//! The pipeline the benchmarks run: ingest and one or more workers (each with its metrics
//! page), on SQLite or PostgreSQL, writing to the S3 test server, through the Spaces-limits
//! layer when limits are given (and with no store limits otherwise).

use crate::common::metrics::{scrape, total};
use crate::common::pipeline::{DbKind, PAGE_ID, Pipeline, StoreKind};
use crate::common::process::FbsyncProcess;
use crate::common::spaces_limits::{SpacesLimitLayer, SpacesLimits, s3_endpoint};
use crate::common::webhook::{Delivery, message_delivery, webhook_client};

/// The workers' WORKER_OBJECT_WRITE_GAP_MS, set explicitly (it is the default) so that a
/// benchmark waiting it out cannot drift from it.
pub const WRITE_GAP: std::time::Duration = std::time::Duration::from_millis(1_000);

/// The histogram with one observation per stored event.
pub const VISIBILITY: &str = "fbsync_visibility_seconds";

pub struct Bench {
    pub pipeline: Pipeline,
    /// The limits layer, when the run has store limits.
    layer: Option<SpacesLimitLayer>,
    pub ingest: FbsyncProcess,
    /// Each worker with its metrics page URL.
    pub workers: Vec<(FbsyncProcess, String)>,
    /// Ingest's webhook URL.
    pub webhook: String,
    pub client: reqwest::Client,
}

impl Bench {
    /// Registers the Page and starts ingest and `workers` workers, configured with the layer's
    /// limits.
    pub async fn start(db: DbKind, limits: Option<SpacesLimits>, workers: usize) -> Self {
        Self::start_configured(db, limits, workers, &[]).await
    }

    /// As [`Bench::start`], with `vars` set after the limits (a configuration that differs
    /// from the bucket's real limits).
    pub async fn start_configured(
        db: DbKind,
        limits: Option<SpacesLimits>,
        workers: usize,
        vars: &[(&str, &str)],
    ) -> Self {
        let layer = match limits {
            Some(limits) => Some(SpacesLimitLayer::start(&s3_endpoint(), limits).await),
            None => None,
        };
        let mut pipeline = Pipeline::new(
            db,
            StoreKind::S3 {
                endpoint: layer.as_ref().map(SpacesLimitLayer::endpoint),
            },
        )
        .await;
        let limit_vars = match limits {
            Some(limits) => [
                limits.object_puts.to_string(),
                limits.object_window.as_secs().to_string(),
                limits.bucket_writes_per_second.to_string(),
                limits.bucket_operations_per_second.to_string(),
            ],
            None => ["0".into(), "300".into(), "0".into(), "0".into()],
        };
        let names = [
            "SPACES_OBJECT_PUTS_PER_5MIN",
            "SPACES_OBJECT_PUT_WINDOW_SECS",
            "SPACES_WRITES_PER_SEC",
            "SPACES_OPS_PER_SEC",
        ];
        for (name, value) in names.iter().zip(limit_vars) {
            pipeline.set(name, &value);
        }
        for (name, value) in vars {
            pipeline.set(name, value);
        }
        pipeline.set("WORKER_METRICS_ADDR", "127.0.0.1:0");
        // The worker's default: the tests' 50 ms would cost CPU that production does not spend.
        pipeline.set("WORKER_FLUSH_INTERVAL_MS", "100");
        pipeline.set(
            "WORKER_OBJECT_WRITE_GAP_MS",
            &WRITE_GAP.as_millis().to_string(),
        );
        let log = std::env::var("FBSYNC_BENCH_LOG").unwrap_or_else(|_| "warn,fbsync=info".into());
        pipeline.set("RUST_LOG", &log);
        pipeline.register_page(PAGE_ID).await;
        let (ingest, urls) = pipeline.spawn_ingest().await;
        let mut started = Vec::new();
        for _ in 0..workers {
            let (worker, operator) = pipeline.spawn_worker_with_operator().await;
            started.push((worker, format!("{operator}/metrics")));
        }
        Self {
            pipeline,
            layer,
            ingest,
            workers: started,
            webhook: urls.webhook,
            client: webhook_client(),
        }
    }

    /// The limits layer (panics when the run has none).
    pub fn layer(&self) -> &SpacesLimitLayer {
        self.layer.as_ref().expect("a run with store limits")
    }

    /// Every worker's metrics page, one after the other (sums over them with `total`).
    pub async fn scrape(&self) -> String {
        let mut pages = String::new();
        for (_, url) in &self.workers {
            pages.push_str(&scrape(&self.client, url).await);
        }
        pages
    }

    /// Events stored between two scrapes (one visibility observation per stored event).
    pub fn stored_since(&self, before: &str, now: &str) -> u64 {
        let count = format!("{VISIBILITY}_count");
        (total(now, &count) - total(before, &count)).max(0.0) as u64
    }

    /// CPU time of all workers, in ns.
    pub fn workers_cpu_ns(&self) -> u64 {
        self.workers.iter().map(|(w, _)| w.cpu_time_ns()).sum()
    }

    /// Asserts that no request went over a limit and that all `sent` were stored, then stops.
    pub async fn stop_all_stored_within_limits(self, stored: u64, sent: u64) {
        assert_eq!(
            self.layer().throttled(),
            0,
            "{:?}",
            self.layer().violations()
        );
        assert_eq!(stored, sent, "every accepted message stored");
        self.stop().await;
    }

    pub async fn stop(mut self) {
        for (worker, _) in &mut self.workers {
            worker.stop().await;
        }
        self.ingest.stop().await;
        self.pipeline.cleanup().await;
    }
}

/// `per_conversation` messages to each of `conversations` users, round-robin, timestamps rising.
pub fn round_robin(tag: &str, conversations: usize, per_conversation: usize) -> Vec<Delivery> {
    let mut deliveries = Vec::with_capacity(conversations * per_conversation);
    for n in 0..per_conversation {
        for c in 0..conversations {
            let user = format!("{tag}user{c}");
            let mid = format!("m_{tag}_{c}_{n}");
            deliveries.push(Delivery {
                body: message_delivery(PAGE_ID, &user, &mid, 1_000 + n as i64, false),
                page_id: PAGE_ID.to_string(),
                user,
                mid,
            });
        }
    }
    deliveries
}
