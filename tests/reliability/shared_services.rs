//! What only the reliability tests do to the services every test shares: take the lock that
//! runs them one at a time, stop and start the one RabbitMQ (`rabbitmqctl`), read its queues
//! with `rabbitmqctl`, and look at the conversation leases in PostgreSQL.

use std::time::Duration;

use sqlx::{Connection, Row};
use tokio::time::Instant;

use crate::common::broker::AMQP_URL;

/// Held for the whole of every test in this target: they restart the shared broker.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes the target-wide lock (it does not poison: a failed test releases it too).
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

// --- The broker ---------------------------------------------------------------------------

async fn rabbitmqctl(command: &str) {
    let output = tokio::process::Command::new("rabbitmqctl")
        .arg(command)
        .output()
        .await
        .unwrap_or_else(|e| panic!("rabbitmqctl {command}: {e}"));
    assert!(
        output.status.success(),
        "rabbitmqctl {command}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The shared broker, stopped (`rabbitmqctl stop_app`) until [`start`](Self::start); started
/// again when dropped, so a failing test never leaves it down.
pub struct BrokerOutage {
    stopped: bool,
}

impl BrokerOutage {
    pub async fn stop() -> Self {
        let outage = Self { stopped: true };
        rabbitmqctl("stop_app").await;
        outage
    }

    /// Starts the broker and waits until it accepts connections again.
    pub async fn start(mut self) {
        rabbitmqctl("start_app").await;
        self.stopped = false;
        wait_for_broker(Duration::from_secs(30)).await;
    }
}

impl Drop for BrokerOutage {
    fn drop(&mut self) {
        if self.stopped {
            let _ = std::process::Command::new("rabbitmqctl")
                .arg("start_app")
                .status();
        }
    }
}

/// Waits until the broker accepts an AMQP connection.
pub async fn wait_for_broker(limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(connection) =
            fbsync_shared::queue::connect(&AMQP_URL.into(), "fbsync-reliability-probe").await
        {
            let _ = connection.close(200, "probe".into()).await;
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the broker did not come back within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `rabbitmqctl list_queues` for the queues of `prefix`: (name, ready, unacked, consumers).
pub async fn queue_report(prefix: &str) -> Vec<(String, u64, u64, u64)> {
    let output = tokio::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "--no-table-headers",
            "--quiet",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ])
        .output()
        .await
        .expect("rabbitmqctl list_queues");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?.to_string();
            let mut number = || fields.next()?.parse::<u64>().ok();
            Some((name, number()?, number()?, number()?))
        })
        .collect()
}

/// Messages in `queue`, ready or delivered and not yet acked.
pub async fn queue_total(prefix: &str, queue: &str) -> u64 {
    queue_report(prefix)
        .await
        .iter()
        .find(|(name, ..)| name == queue)
        .map_or(0, |(_, ready, unacked, _)| ready + unacked)
}

// --- PostgreSQL -----------------------------------------------------------------------------

/// Conversation leases held right now (PostgreSQL): (user psid, owner, until ms).
pub async fn live_leases(database_url: &str) -> Vec<(String, String, i64)> {
    let Ok(mut db) = sqlx::PgConnection::connect(database_url).await else {
        return Vec::new();
    };
    let now = fbsync_shared::now_ms();
    let rows = sqlx::query(
        "SELECT user_psid, lease_owner, lease_until_ms FROM conversations
         WHERE lease_owner IS NOT NULL AND lease_until_ms > $1",
    )
    .bind(now)
    .fetch_all(&mut db)
    .await
    .unwrap_or_default();
    let _ = db.close().await;
    rows.into_iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}
