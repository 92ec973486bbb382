//! What the reliability tests share: the lock that runs them one at a time, control of the
//! shared broker, a burst of signed deliveries that records every answer (and retries the
//! refused ones as Facebook would), and an exact account of what ended up in the store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::Value;
use sqlx::{Connection, Row};
use tokio::time::Instant;

use crate::helpers::{AMQP_URL, FbsyncProcess};
use crate::pipeline::{Pipeline, message_delivery, mids, post_signed};

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

/// Messages ready in `queue` (not counting unacked ones).
pub async fn queue_depth(queue: &str) -> u32 {
    let connection = fbsync_shared::queue::connect(&AMQP_URL.into(), "fbsync-reliability-depth")
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("queue {queue}: {e}"));
    let _ = connection.close(200, "done".into()).await;
    declared.message_count()
}

// --- Processes ----------------------------------------------------------------------------

/// Starts `fbsync ingest`; returns it with its webhook URL.
pub async fn spawn_ingest(pipeline: &Pipeline) -> (FbsyncProcess, String) {
    let mut ingest = pipeline.spawn(&["ingest"]);
    let line = ingest
        .wait_for_log("ingest listening", Duration::from_secs(30))
        .await;
    let addr = line["fields"]["addr"].as_str().expect("addr").to_string();
    (ingest, format!("http://{addr}/facebook/webhook"))
}

/// Starts `fbsync worker` and waits until it consumes the conversation queue.
pub async fn spawn_worker(pipeline: &Pipeline) -> FbsyncProcess {
    let mut worker = pipeline.spawn(&["worker"]);
    wait_for_consuming(&mut worker, &pipeline.prefix, Duration::from_secs(30)).await;
    worker
}

/// Waits for the worker's next `consuming` line for the conversation queue.
pub async fn wait_for_consuming(process: &mut FbsyncProcess, prefix: &str, limit: Duration) {
    let queue = format!("{prefix}.conversation");
    let deadline = Instant::now() + limit;
    loop {
        let line = tokio::time::timeout_at(deadline, process.lines.recv())
            .await
            .unwrap_or_else(|_| panic!("the worker did not consume {queue} within {limit:?}"))
            .expect("the worker exited");
        if let Ok(value) = serde_json::from_str::<Value>(&line)
            && value["fields"]["message"] == "consuming"
            && value["fields"]["queue"] == queue.as_str()
        {
            return;
        }
    }
}

/// Every log line received so far and not yet read.
pub fn take_lines(process: &mut FbsyncProcess) -> Vec<String> {
    let mut lines = Vec::new();
    while let Ok(line) = process.lines.try_recv() {
        lines.push(line);
    }
    lines
}

/// Sends SIGKILL (`kill -KILL <pid>`) and waits for the process to die of it.
pub async fn kill_hard(process: &mut FbsyncProcess) {
    use std::os::unix::process::ExitStatusExt;
    let pid = process.child.id().expect("the process is running");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), process.child.wait())
        .await
        .expect("a killed process exits")
        .expect("status");
    assert_eq!(status.signal(), Some(9), "{status:?}");
}

/// Warning and error lines, counted by level and message.
pub fn log_summary(lines: &[String]) -> String {
    let mut counts: std::collections::BTreeMap<(String, String), usize> = Default::default();
    for line in lines {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let level = value["level"].as_str().unwrap_or_default().to_string();
        if level == "WARN" || level == "ERROR" {
            let message = value["fields"]["message"].as_str().unwrap_or_default();
            let error = value["fields"]["error"].as_str().unwrap_or_default();
            *counts
                .entry((level, format!("{message} {error}")))
                .or_default() += 1;
        }
    }
    counts
        .iter()
        .map(|((level, message), count)| format!("{count} × {level} {message}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// True while the process has not exited.
pub fn is_running(process: &mut FbsyncProcess) -> bool {
    matches!(process.child.try_wait(), Ok(None))
}

// --- Deliveries ---------------------------------------------------------------------------

/// One webhook delivery of one message.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub page_id: String,
    pub user: String,
    pub mid: String,
    pub body: Vec<u8>,
}

/// `per_conversation` messages to each of `conversations` users of `page_id`, interleaved
/// across conversations; timestamps run backwards in odd conversations (arrival order is not
/// file order) and every 7th message is a Page echo.
pub fn conversation_burst(
    page_id: &str,
    tag: &str,
    conversations: usize,
    per_conversation: usize,
) -> Vec<Delivery> {
    let mut deliveries = Vec::with_capacity(conversations * per_conversation);
    for n in 0..per_conversation {
        for c in 0..conversations {
            let user = format!("{tag}user{c}");
            let mid = format!("m_{tag}_{c}_{n}");
            let timestamp = if c % 2 == 0 {
                1_000 + n as i64
            } else {
                1_000_000 - n as i64
            };
            deliveries.push(Delivery {
                body: message_delivery(page_id, &user, &mid, timestamp, n % 7 == 0),
                page_id: page_id.to_string(),
                user,
                mid,
            });
        }
    }
    deliveries
}

/// One answer of ingest to one POST.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    /// Index of the delivery in the burst.
    pub index: usize,
    /// HTTP status; 0 when the request itself failed.
    pub status: u16,
    /// When the answer came.
    pub at: Instant,
    /// How long ingest took to answer.
    pub took: Duration,
}

/// A client that gives up on a request after 10 s (Facebook waits about 5 s).
pub fn webhook_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// Posts every delivery once from `posters` concurrent senders, each resting `pace` after a
/// post (so a burst lasts long enough for the faults injected into it) and 500 ms after a
/// refusal (a sender backing off); `answered` counts answers as they come (fault injectors
/// watch it). Returns every answer.
pub async fn post_burst(
    client: &reqwest::Client,
    url: &str,
    deliveries: &Arc<Vec<Delivery>>,
    posters: usize,
    pace: Duration,
    answered: &Arc<AtomicUsize>,
) -> Vec<Answer> {
    let next = Arc::new(AtomicUsize::new(0));
    let senders = (0..posters).map(|_| {
        let (client, url) = (client.clone(), url.to_string());
        let (deliveries, next, answered) = (deliveries.clone(), next.clone(), answered.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::SeqCst);
                let Some(delivery) = deliveries.get(index) else {
                    return answers;
                };
                let sent = Instant::now();
                let status = post_signed(&client, &url, &delivery.body).await;
                let at = Instant::now();
                answers.push(Answer {
                    index,
                    status,
                    at,
                    took: at - sent,
                });
                answered.fetch_add(1, Ordering::SeqCst);
                let rest = if status == 200 {
                    pace
                } else {
                    Duration::from_millis(500)
                };
                if !rest.is_zero() {
                    tokio::time::sleep(rest).await;
                }
            }
        })
    });
    let mut answers = Vec::new();
    for sender in futures::future::join_all(senders).await {
        answers.extend(sender.expect("sender task"));
    }
    answers
}

/// Posts each refused delivery again until it is accepted, as Facebook retries a delivery
/// that did not get a 200; returns the answers of the retries.
pub async fn retry_refused(
    client: &reqwest::Client,
    url: &str,
    deliveries: &[Delivery],
    answers: &[Answer],
    limit: Duration,
) -> Vec<Answer> {
    let accepted: BTreeSet<usize> = answers
        .iter()
        .filter(|a| a.status == 200)
        .map(|a| a.index)
        .collect();
    let mut pending: Vec<usize> = answers
        .iter()
        .map(|a| a.index)
        .filter(|index| !accepted.contains(index))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let deadline = Instant::now() + limit;
    let mut retries = Vec::new();
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} deliveries still refused after {limit:?}",
            pending.len()
        );
        let mut still = Vec::new();
        for index in pending {
            let sent = Instant::now();
            let status = post_signed(client, url, &deliveries[index].body).await;
            let at = Instant::now();
            retries.push(Answer {
                index,
                status,
                at,
                took: at - sent,
            });
            if status != 200 {
                still.push(index);
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    retries
}

// --- The store ----------------------------------------------------------------------------

/// A conversation: (page id, user psid).
pub type ConversationId = (String, String);

/// Which mids each conversation must hold.
pub fn expected_mids<'a>(
    deliveries: impl IntoIterator<Item = &'a Delivery>,
) -> BTreeMap<ConversationId, BTreeSet<String>> {
    let mut expected: BTreeMap<ConversationId, BTreeSet<String>> = BTreeMap::new();
    for delivery in deliveries {
        expected
            .entry((delivery.page_id.clone(), delivery.user.clone()))
            .or_default()
            .insert(delivery.mid.clone());
    }
    expected
}

/// What the store holds compared with what it must hold.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Distinct messages that must be stored.
    pub expected: usize,
    /// Distinct expected messages found in the store.
    pub stored: usize,
    /// Expected messages missing from the store.
    pub lost: usize,
    /// Extra copies: events in the files beyond one per distinct mid.
    pub duplicated: usize,
    /// Messages in the store that were never delivered.
    pub unexpected: usize,
    /// Conversations whose file is not sorted by timestamp.
    pub unsorted: Vec<String>,
    /// A few missing mids, for the failure message.
    pub missing_examples: Vec<String>,
}

impl Tally {
    pub fn is_exact(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.unexpected == 0 && self.unsorted.is_empty()
    }
}

async fn tally_once(
    pipeline: &Pipeline,
    expected: &BTreeMap<ConversationId, BTreeSet<String>>,
) -> Tally {
    let mut tally = Tally::default();
    for ((page_id, user), wanted) in expected {
        tally.expected += wanted.len();
        let events = pipeline
            .conversation(page_id, user)
            .await
            .unwrap_or_default();
        if !crate::pipeline::sorted_by_timestamp(&events) {
            tally.unsorted.push(format!("{page_id}/{user}"));
        }
        let ids = mids(&events);
        let distinct: BTreeSet<String> = ids.iter().cloned().collect();
        tally.duplicated += ids.len() - distinct.len();
        tally.unexpected += distinct.difference(wanted).count();
        let present = wanted.intersection(&distinct).count();
        tally.stored += present;
        tally.lost += wanted.len() - present;
        for missing in wanted.difference(&distinct).take(3) {
            if tally.missing_examples.len() < 10 {
                tally.missing_examples.push(missing.clone());
            }
        }
    }
    tally
}

/// Waits until every expected message is stored (or `limit` passes), then until the Pages'
/// staging is empty, and counts what the store holds.
pub async fn settle_and_tally(
    pipeline: &Pipeline,
    expected: &BTreeMap<ConversationId, BTreeSet<String>>,
    limit: Duration,
) -> Tally {
    let deadline = Instant::now() + limit;
    loop {
        let tally = tally_once(pipeline, expected).await;
        if tally.lost == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Nothing left staged: no flush still to come could change the files.
    let pages: BTreeSet<&str> = expected.keys().map(|(page, _)| page.as_str()).collect();
    while Instant::now() < deadline {
        let staged = staged_events(pipeline, &pages).await;
        if staged == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tally_once(pipeline, expected).await
}

/// Events staged and not yet stored for `pages`, from `fbsync pages list --json`.
pub async fn staged_events(pipeline: &Pipeline, pages: &BTreeSet<&str>) -> i64 {
    let (code, stdout, stderr) = pipeline.run(&["pages", "list", "--json"]).await;
    assert_eq!(code, 0, "pages list: {stderr}");
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|page| page["page_id"].as_str().is_some_and(|p| pages.contains(p)))
        .map(|page| page["staged"].as_i64().unwrap_or(0))
        .sum()
}

/// The pipeline's DATABASE_URL.
pub fn database_url(pipeline: &Pipeline) -> String {
    pipeline
        .vars
        .iter()
        .find(|(k, _)| k == "DATABASE_URL")
        .map(|(_, v)| v.clone())
        .expect("DATABASE_URL")
}

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

// --- Dead letters -------------------------------------------------------------------------

/// `fbsync dlq list --json FILTERS`: one JSON object per letter, or the command's stderr.
pub async fn dlq_list(pipeline: &Pipeline, filters: &[&str]) -> Result<Vec<Value>, String> {
    let mut args = vec!["dlq", "list", "--json"];
    args.extend_from_slice(filters);
    let (code, stdout, stderr) = pipeline.run(&args).await;
    if code != 0 {
        return Err(format!("fbsync {} exited {code}: {stderr}", args.join(" ")));
    }
    stdout
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).map_err(|e| format!("{line:?}: {e}")))
        .collect()
}

/// `fbsync dlq replay FILTERS`: the N of its final line `replayed N`, or what went wrong.
pub async fn dlq_replay(pipeline: &Pipeline, filters: &[&str]) -> Result<usize, String> {
    let mut args = vec!["dlq", "replay"];
    args.extend_from_slice(filters);
    let (code, stdout, stderr) = pipeline.run(&args).await;
    if code != 0 {
        return Err(format!("fbsync {} exited {code}: {stderr}", args.join(" ")));
    }
    stdout
        .lines()
        .rev()
        .find_map(|line| line.trim().strip_prefix("replayed "))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| format!("no final `replayed N` line in {stdout:?}"))
}
