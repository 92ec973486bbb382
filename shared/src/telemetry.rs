//! Logs (tracing, JSON lines with LOG_FORMAT=json) and the Prometheus metrics recorder.
//!
//! Metric names live here, once, so ingest, workers and tests agree on them.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Webhook deliveries answered, by `outcome` (accepted, bad_signature, bad_request, too_large,
/// too_slow, overloaded, over_budget, unavailable).
pub const DELIVERIES: &str = "fbsync_webhook_deliveries_total";
/// Events published to the broker with a confirm, by `kind`.
pub const EVENTS_PUBLISHED: &str = "fbsync_events_published_total";
/// Seconds from first publish to the last confirm of a delivery.
pub const PUBLISH_CONFIRM_SECONDS: &str = "fbsync_publish_confirm_seconds";
/// Events staged in the database, by `kind`.
pub const EVENTS_STAGED: &str = "fbsync_events_staged_total";
/// Conversation flushes, by `outcome` (written, unchanged, failed, set_aside, page_removed).
pub const FLUSHES: &str = "fbsync_flushes_total";
/// Conversation merges, by `way`: `append` (new events after the stored ones, the stored file
/// not parsed) or `full` (the stored file parsed and merged).
pub const MERGES: &str = "fbsync_merges_total";
/// Objects written to the store, by `object` (conversation, page_data).
pub const OBJECT_WRITES: &str = "fbsync_object_writes_total";
/// Seconds from ingest accepting an event to its object being written.
pub const VISIBILITY_SECONDS: &str = "fbsync_visibility_seconds";
/// Retries of transient failures, by `operation`.
pub const RETRIES: &str = "fbsync_retries_total";
/// Messages dead-lettered, by `reason`.
pub const DEAD_LETTERED: &str = "fbsync_dead_lettered_total";
/// Staged events not yet in the store.
pub const STAGED_BACKLOG: &str = "fbsync_staged_backlog";
/// Age in seconds of the oldest staged event.
pub const STAGED_OLDEST_SECONDS: &str = "fbsync_staged_oldest_seconds";
/// Conversations set aside because their stored object cannot be read.
pub const CONVERSATIONS_SET_ASIDE: &str = "fbsync_conversations_set_aside";
/// Messages waiting in the dead-letter queue.
pub const DLQ_DEPTH: &str = "fbsync_dlq_depth";
/// Webhook subscriptions found lost (or lacking a field) by the scheduler's check and
/// subscribed again.
pub const SUBSCRIPTIONS_RESTORED: &str = "fbsync_subscriptions_restored_total";
/// Pages Facebook blocks from messaging now (their last `messaging_policy_enforcement`).
pub const PAGES_MESSAGING_BLOCKED: &str = "fbsync_pages_messaging_blocked";
/// Jobs in the outbox the broker has not confirmed yet (owners' onboarding and deletions).
pub const OUTBOX_PENDING: &str = "fbsync_outbox_pending";
/// Age in seconds of the oldest job in the outbox (0 when it is empty).
pub const OUTBOX_OLDEST_SECONDS: &str = "fbsync_outbox_oldest_seconds";
/// Seconds per object-store request, by `operation`.
pub const STORAGE_SECONDS: &str = "fbsync_storage_request_seconds";
/// Store answers of 503 SlowDown: the bucket's real limit is below its configured rates.
pub const STORE_SLOW_DOWNS: &str = "fbsync_store_slow_downs_total";
/// The bucket's rate in force, per second, by `class` (writes, operations): the configured
/// ceiling's budget, lowered after SlowDown answers and climbing back.
pub const BUCKET_RATE_IN_FORCE: &str = "fbsync_bucket_rate_per_second";
/// 1 when the store refused both conditional-write probes (it honours `If-None-Match` and
/// `If-Match`), 0 when it accepted one (workers run on their claims alone), -1 before an
/// answer.
pub const CONDITIONAL_WRITES_HONOURED: &str = "fbsync_store_conditional_writes_honoured";
/// Seconds per Graph API request.
pub const GRAPH_SECONDS: &str = "fbsync_graph_request_seconds";
/// Graph API requests, by `outcome` (ok, rate_limited, token_error, transient, error).
pub const GRAPH_CALLS: &str = "fbsync_graph_calls_total";
/// Poll jobs, by `outcome` (started, finished, failed, parked).
pub const POLLS: &str = "fbsync_polls_total";
/// Messages read by polls, by `result` (found, new: staged rows that were new,
/// details_unavailable: the Graph API withheld the details of an older message).
pub const POLL_MESSAGES: &str = "fbsync_poll_messages_total";
/// Seconds since each Page's last complete poll ended (label `page_id`; a Page never polled
/// counts from its registration).
pub const POLL_AGE_SECONDS: &str = "fbsync_poll_age_seconds";
/// Poll jobs enqueued by the scheduler (or `fbsync poll`).
pub const POLLS_ENQUEUED: &str = "fbsync_polls_enqueued_total";

/// Starts logging. Safe to call more than once (later calls do nothing).
pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,lapin=warn,aws_config=warn,aws_smithy_runtime=warn,sqlx=warn")
    });
    // Colour only for a person at a terminal: files, pipes and container logs get plain text,
    // and NO_COLOR (any value, https://no-color.org) turns it off there too.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(|| LossyStderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Standard error that never fails: a line that cannot be written (a closed pipe, a dead log
/// shipper) is dropped. An error would make the subscriber report it with `eprintln!`, which
/// panics on the same broken pipe, in whichever task was logging (the one that starts the
/// shutdown, for one).
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// The process-wide metrics recorder (installed on first use).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency_buckets = [
                0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            // Visibility spans milliseconds (no per-object limit) to minutes (Spaces' window).
            let visibility_buckets = [
                0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0,
                30.0, 60.0, 120.0, 300.0, 600.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets(&latency_buckets)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(VISIBILITY_SECONDS.into()),
                        &visibility_buckets,
                    )
                })
                .expect("bucket lists are not empty");
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (a test harness): render an empty one.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}
