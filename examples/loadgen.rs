//! Load generator for `fbsync ingest`, and a probe of the broker's own publish limit.
//!
//! Webhook mode (the default) posts signed Messenger deliveries to a running ingest, on an
//! open-loop schedule: delivery `n` is due at `start + n / rate`, fixed in advance, and its
//! latency is measured from that due time, not from when a free connection got round to it. A
//! slow answer therefore shows up in the figures instead of quietly lowering the load
//! (no coordinated omission). `--rate 0` sends as fast as `--concurrency` allows.
//!
//! ```sh
//! cargo build --release --bin fbsync --example loadgen
//! FACEBOOK_APP_SECRET=bench FACEBOOK_VERIFY_TOKEN=v QUEUE_PREFIX=bench-1 \
//!     INGEST_ADDR=127.0.0.1:5600 target/release/fbsync ingest &
//! # as fast as possible for 10 s, 64 requests in flight
//! FACEBOOK_APP_SECRET=bench target/release/examples/loadgen \
//!     --url http://127.0.0.1:5600/facebook/webhook --rate 0 --duration-secs 10
//! # latency at a fixed 2,000 deliveries/s
//! FACEBOOK_APP_SECRET=bench target/release/examples/loadgen \
//!     --url http://127.0.0.1:5600/facebook/webhook --rate 2000 --duration-secs 10
//! # the broker's own limit: confirmed publishes of one event's message, 128 in flight
//! target/release/examples/loadgen --raw-publish --concurrency 128 --duration-secs 10
//! # afterwards: drop what the run left on the broker
//! target/release/examples/loadgen --delete-topology bench-1
//! ```
//!
//! On one machine the generator competes with ingest and the broker for the same cores, so it
//! is built to cost little: each delivery's JSON is written straight into a buffer and posted
//! on a keep-alive connection of its own with a hand-written HTTP/1.1 request (with reqwest
//! and `serde_json::Value`s it cost 80-100 µs of CPU per delivery, as much as ingest; now
//! about 25). Its figures are still a floor, and it prints its own CPU per message (`cpu`).
//!
//! It prints what was sent, accepted (200) and refused (by status), accepted/s, and three
//! latency figures in ms (p50/p90/p99/max): `latency` from each delivery's due time to its
//! answer (the figure that counts), `service` from the actual send to the answer, and `send lag`
//! from due time to actual send (how far the generator itself fell behind: all workers busy, or
//! the timer's 1 ms granularity).
//!
//! Every message has a unique mid `m_<run id>_<n>` and a timestamp in ms, so later stages can
//! find this run's messages and measure their visibility delay.
//!
//! `--follow-metrics URL` follows the run to the store through the worker's `/metrics` (of
//! `fbsync up`, or of a worker with WORKER_METRICS_ADDR): it waits until every accepted message
//! is stored and prints stored/s end to end, conversation writes per stored message, visibility
//! p50/p99 (accepted by ingest to stored, as histogram bounds) and, with `--worker-pid`, the
//! worker's peak memory.
//!
//! `--raw-publish` leaves HTTP out: it publishes the queue message of one such event straight
//! to a throwaway topology (quorum queues, prefix `loadgen-raw-<run id>`) with publisher
//! confirms, using the same publish code as ingest, and deletes that topology afterwards. Its
//! publishes/s is the ceiling ingest works under. `--delete-topology PREFIX` only deletes a
//! prefix's queues and exchanges (for cleaning up after a webhook run).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use fbsync_shared::facebook::event::split_delivery;
use fbsync_shared::facebook::signature::{SHA256_HEADER, sign_sha256};
use fbsync_shared::jobs::JobKind;
use fbsync_shared::now_ms;
use fbsync_shared::queue::{Outgoing, Topology, open_confirm_channel, publish_confirmed};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};

/// Load for `fbsync ingest`, or the broker's own confirmed-publish limit.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Webhook endpoint of the ingest under test.
    #[arg(long, default_value = "http://127.0.0.1:5000/facebook/webhook")]
    url: String,
    /// App secret that signs the deliveries.
    #[arg(long, env = "FACEBOOK_APP_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Page id of every delivery.
    #[arg(long, default_value = "100000000000001")]
    page_id: String,
    /// Distinct senders (conversations) the messages are spread over.
    #[arg(long, default_value_t = 50)]
    conversations: u64,
    /// Requests (or publishes) in flight at most.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Deliveries (or publishes) per second; 0 sends as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Length of the run; 10 s when neither this nor --count is given.
    #[arg(long)]
    duration_secs: Option<f64>,
    /// Deliveries (or publishes) in all; the run ends at whichever limit comes first.
    #[arg(long)]
    count: Option<u64>,
    /// Messaging events in each delivery.
    #[arg(long, default_value_t = 1)]
    events_per_delivery: u64,
    /// Names this run in mids and queue names; random by default.
    #[arg(long)]
    run_id: Option<String>,
    /// Publish straight to the broker with confirms instead of posting to ingest.
    #[arg(long)]
    raw_publish: bool,
    /// With --raw-publish: broker connections (one confirm channel each) to spread over.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Only delete the queues and exchanges of this prefix, then exit.
    #[arg(long, value_name = "PREFIX")]
    delete_topology: Option<String>,
    /// Follow the run to the store: read this /metrics (of `fbsync up`, or of the worker) before
    /// and after, until every accepted message is stored, and report stored/s, object writes per
    /// stored message and the visibility delay (accepted by ingest to stored).
    #[arg(long, value_name = "URL")]
    follow_metrics: Option<String>,
    /// With --follow-metrics: report the peak memory (VmHWM) of this process (the worker).
    #[arg(long)]
    worker_pid: Option<u32>,
    /// Broker for --raw-publish and --delete-topology.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    amqp_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(prefix) = &args.delete_topology {
        let (connection, channel) = open_confirm_channel(
            &args.amqp_url.clone().into(),
            &Topology::new(prefix),
            "loadgen",
        )
        .await
        .context("connecting to the broker")?;
        delete_topology(&channel, &Topology::new(prefix)).await?;
        connection.close(200, "done".into()).await?;
        println!("deleted the queues and exchanges of {prefix}");
        return Ok(());
    }
    let run_id = args.run_id.clone().unwrap_or_else(random_run_id);
    println!("run id      {run_id}");
    let before = match &args.follow_metrics {
        Some(url) => Some(StoreFigures::scrape(url).await?),
        None => None,
    };
    let started = Instant::now();
    let tally = if args.raw_publish {
        raw_publish(&args, &run_id).await?
    } else {
        webhook_load(&args, &run_id).await?
    };
    let expected = tally.accepted * args.events_per_delivery;
    tally.print(if args.raw_publish {
        "publishes"
    } else {
        "deliveries"
    });
    if let (Some(url), Some(before)) = (&args.follow_metrics, before) {
        follow_to_store(url, &before, expected, started, args.worker_pid).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Following a run to the store

/// What the worker's /metrics says about stored messages.
#[derive(Debug, Clone, Default)]
struct StoreFigures {
    /// Cumulative visibility histogram: (upper bound in s, events).
    visibility: Vec<(f64, u64)>,
    /// Events written to conversation objects.
    stored: u64,
    /// Conversation objects written.
    conversation_writes: u64,
}

impl StoreFigures {
    async fn scrape(url: &str) -> anyhow::Result<Self> {
        let text = reqwest::get(url).await?.error_for_status()?.text().await?;
        let mut figures = Self::default();
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value: f64 = value.parse().unwrap_or(0.0);
            if let Some(rest) = name.strip_prefix("fbsync_visibility_seconds_bucket{le=\"") {
                let bound = rest.trim_end_matches("\"}");
                let bound = if bound == "+Inf" {
                    f64::INFINITY
                } else {
                    bound.parse().unwrap_or(0.0)
                };
                figures.visibility.push((bound, value as u64));
            } else if name == "fbsync_visibility_seconds_count" {
                figures.stored = value as u64;
            } else if name == "fbsync_object_writes_total{object=\"conversation\"}" {
                figures.conversation_writes = value as u64;
            }
        }
        Ok(figures)
    }

    /// The upper bound of the bucket that holds quantile `q` of the events stored since `before`.
    fn visibility_quantile(&self, before: &StoreFigures, q: f64) -> f64 {
        let total = self.stored.saturating_sub(before.stored);
        let wanted = (q * total as f64).ceil() as u64;
        for (i, (bound, cumulative)) in self.visibility.iter().enumerate() {
            let earlier = before.visibility.get(i).map_or(0, |(_, c)| *c);
            if cumulative.saturating_sub(earlier) >= wanted.max(1) {
                return *bound;
            }
        }
        f64::INFINITY
    }
}

/// Waits until `expected` more events are stored (or 30 s pass without progress), then prints
/// the end-to-end figures.
async fn follow_to_store(
    url: &str,
    before: &StoreFigures,
    expected: u64,
    started: Instant,
    worker_pid: Option<u32>,
) -> anyhow::Result<()> {
    let mut last_progress = Instant::now();
    let mut latest = before.clone();
    loop {
        let now = StoreFigures::scrape(url).await?;
        if now.stored > latest.stored {
            last_progress = Instant::now();
        }
        latest = now;
        let stored = latest.stored.saturating_sub(before.stored);
        if stored >= expected || last_progress.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored = latest.stored.saturating_sub(before.stored);
    let writes = latest
        .conversation_writes
        .saturating_sub(before.conversation_writes);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "stored      {stored} of {expected} messages in {secs:.2} s ({:.0}/s end to end)",
        stored as f64 / secs
    );
    println!(
        "writes      {writes} conversation objects ({:.3} per stored message)",
        writes as f64 / stored.max(1) as f64
    );
    println!(
        "visibility  p50 <= {} s  p99 <= {} s  (accepted by ingest to stored; histogram bounds)",
        latest.visibility_quantile(before, 0.50),
        latest.visibility_quantile(before, 0.99)
    );
    if let Some(pid) = worker_pid {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let peak = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .unwrap_or("VmHWM: unknown");
        let now = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap_or("VmRSS: unknown");
        println!(
            "worker mem  peak {}  now {}",
            peak.trim_start_matches("VmHWM:").trim(),
            now.trim_start_matches("VmRSS:").trim()
        );
    }
    Ok(())
}

fn random_run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

// ---------------------------------------------------------------------------------------------
// Webhook mode

/// Builds the deliveries of one run: delivery `n` holds messages `n * per .. (n + 1) * per`.
/// The JSON is written straight into one buffer from pieces escaped once at the start.
struct Deliveries {
    /// The run id as it goes inside a JSON string (escaped, no quotes).
    run_id: String,
    /// The Page id as a JSON string (escaped, with quotes).
    page_id: String,
    conversations: u64,
    events_per_delivery: u64,
    secret: String,
}

impl Deliveries {
    fn new(run_id: &str, page_id: &str, conversations: u64, events: u64, secret: String) -> Self {
        let quoted = |text: &str| serde_json::to_string(text).expect("a string always serialises");
        let run_id = quoted(run_id);
        Self {
            run_id: run_id[1..run_id.len() - 1].to_string(),
            page_id: quoted(page_id),
            conversations: conversations.max(1),
            events_per_delivery: events,
            secret,
        }
    }

    /// The body of delivery `n` and its `X-Hub-Signature-256`.
    fn signed(&self, n: u64) -> (Vec<u8>, String) {
        use std::io::Write as _;
        let timestamp = now_ms();
        let (run, page) = (&self.run_id, &self.page_id);
        let mut body = Vec::with_capacity(160 + 200 * self.events_per_delivery as usize);
        // Writing to a Vec cannot fail.
        let _ = write!(
            body,
            r#"{{"object":"page","entry":[{{"id":{page},"time":{timestamp},"messaging":["#
        );
        let first = n * self.events_per_delivery;
        for m in first..first + self.events_per_delivery {
            // A text message from one of the senders to the Page.
            let comma = if m == first { "" } else { "," };
            let sender = m % self.conversations;
            let _ = write!(
                body,
                r#"{comma}{{"sender":{{"id":"9{sender:015}"}},"recipient":{{"id":{page}}},"timestamp":{timestamp},"message":{{"mid":"m_{run}_{m}","text":"loadgen message {m} of run {run}"}}}}"#
            );
        }
        body.extend_from_slice(b"]}]}");
        let signature = sign_sha256(&self.secret, &body);
        (body, signature)
    }
}

async fn webhook_load(args: &Args, run_id: &str) -> anyhow::Result<Tally> {
    let secret = args
        .secret
        .clone()
        .context("no --secret and FACEBOOK_APP_SECRET is not set")?;
    let deliveries = Arc::new(Deliveries::new(
        run_id,
        &args.page_id,
        args.conversations,
        args.events_per_delivery,
        secret,
    ));
    let target = Arc::new(Target::parse(&args.url)?);
    println!(
        "posting to  {}, {}, concurrency {}, {} event(s) per delivery",
        args.url,
        describe_rate(args.rate),
        args.concurrency,
        args.events_per_delivery
    );
    // One keep-alive connection per load worker, opened on its first request and again after
    // any failure. Worker `i` alone uses slot `i`: the mutex is never contended, it only lets
    // the slot live in the shared closure.
    let connections: Arc<Vec<tokio::sync::Mutex<Option<Connection>>>> = Arc::new(
        (0..args.concurrency.max(1))
            .map(|_| tokio::sync::Mutex::new(None))
            .collect(),
    );
    let post = move |worker: usize, n: u64| {
        let (target, deliveries, connections) =
            (target.clone(), deliveries.clone(), connections.clone());
        async move {
            let mut slot = connections[worker].lock().await;
            let (body, signature) = deliveries.signed(n);
            let answer = tokio::time::timeout(
                Duration::from_secs(10),
                post_delivery(&target, &mut slot, &body, &signature),
            )
            .await;
            match answer {
                Ok(Ok(200)) => Outcome::Accepted,
                Ok(Ok(status)) => Outcome::Refused(status),
                Ok(Err(_)) | Err(_) => {
                    *slot = None;
                    Outcome::Failed
                }
            }
        }
    };
    Ok(drive(Schedule::new(args), args.concurrency, post).await)
}

/// Where deliveries go.
struct Target {
    /// `host:port`: what is connected to, and what the `Host` header says.
    authority: String,
    /// The request line's target (path and query).
    path: String,
}

impl Target {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(url).context("--url is not a URL")?;
        anyhow::ensure!(
            url.scheme() == "http",
            "--url must be plain http:// (the load generator speaks HTTP/1.1 without TLS)"
        );
        let host = url.host_str().context("--url has no host")?;
        let port = url.port_or_known_default().unwrap_or(80);
        let path = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_string(),
        };
        Ok(Self {
            authority: format!("{host}:{port}"),
            path,
        })
    }
}

/// A keep-alive HTTP/1.1 connection to ingest, written and read by hand: one `write` per
/// request (head and body in one buffer), the answer's status and `Content-Length` read from
/// its head, one request at a time.
struct Connection {
    stream: tokio::net::TcpStream,
    /// The request being written, reused from one request to the next.
    request: Vec<u8>,
    /// What has been read of the answer.
    answer: Vec<u8>,
}

impl Connection {
    async fn open(target: &Target) -> std::io::Result<Self> {
        let stream = tokio::net::TcpStream::connect(&target.authority).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            request: Vec::with_capacity(1024),
            answer: Vec::with_capacity(512),
        })
    }

    /// Sends one request and reads its whole answer: the status, and whether the server
    /// closes the connection after it.
    async fn exchange(
        &mut self,
        target: &Target,
        body: &[u8],
        signature: &str,
    ) -> std::io::Result<(u16, bool)> {
        use std::io::Write as _;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        self.request.clear();
        self.answer.clear();
        write!(
            self.request,
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             {SHA256_HEADER}: {signature}\r\nContent-Length: {}\r\n\r\n",
            target.path,
            target.authority,
            body.len()
        )?;
        self.request.extend_from_slice(body);
        self.stream.write_all(&self.request).await?;
        loop {
            if let Some(head_end) = self.answer.windows(4).position(|w| w == b"\r\n\r\n") {
                let (status, length, close) = parse_answer_head(&self.answer[..head_end])?;
                let body_end = head_end + 4 + length;
                while self.answer.len() < body_end {
                    if self.stream.read_buf(&mut self.answer).await? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
                // One request at a time: anything beyond this answer means the two sides no
                // longer agree where answers end.
                let in_step = self.answer.len() == body_end;
                return Ok((status, close || !in_step));
            }
            if self.stream.read_buf(&mut self.answer).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// Posts a delivery on the worker's connection (opening one when it has none) and reads the
/// whole answer; returns its status. A kept connection that fails before a byte of the answer
/// came was closed by the server while idle (ingest closes a connection that sends nothing for
/// its read timeout): the request goes once more on a new connection. On any other error the
/// caller drops the connection.
async fn post_delivery(
    target: &Target,
    slot: &mut Option<Connection>,
    body: &[u8],
    signature: &str,
) -> std::io::Result<u16> {
    if let Some(connection) = slot.as_mut() {
        match connection.exchange(target, body, signature).await {
            Ok((status, close)) => {
                if close {
                    *slot = None;
                }
                return Ok(status);
            }
            Err(e) if !connection.answer.is_empty() => return Err(e),
            Err(_) => *slot = None,
        }
    }
    let connection = slot.insert(Connection::open(target).await?);
    let (status, close) = connection.exchange(target, body, signature).await?;
    if close {
        *slot = None;
    }
    Ok(status)
}

/// The status, `Content-Length` and whether the server closes the connection, from an answer's
/// head (status line and headers, without the blank line). An answer without a length (ingest
/// always sends one) is an error: its end could not be found.
fn parse_answer_head(head: &[u8]) -> std::io::Result<(u16, usize, bool)> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let head = std::str::from_utf8(head).map_err(|_| invalid("answer head is not text"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| invalid("no status line"))?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid("no status line"))?;
    // HTTP/1.0 closes after the answer unless told otherwise.
    let (mut length, mut close) = (None, status_line.starts_with("HTTP/1.0"));
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().ok();
        } else if name.eq_ignore_ascii_case("connection") {
            close = value
                .split(',')
                .any(|option| option.trim().eq_ignore_ascii_case("close"));
        }
    }
    let length = length.ok_or_else(|| invalid("answer without Content-Length"))?;
    Ok((status, length, close))
}

// ---------------------------------------------------------------------------------------------
// Raw publish mode

async fn raw_publish(args: &Args, run_id: &str) -> anyhow::Result<Tally> {
    let topology = Topology::new(format!("loadgen-raw-{run_id}"));
    let mut links = Vec::new();
    for _ in 0..args.connections.max(1) {
        let link = open_confirm_channel(&args.amqp_url.clone().into(), &topology, "loadgen")
            .await
            .context("connecting to the broker")?;
        links.push(link);
    }
    let message = Arc::new(sample_message(args, run_id, &topology)?);
    println!(
        "publishing  to {} ({} quorum queue), {}, concurrency {}, {} connection(s), \
         body {} bytes",
        topology.events_exchange(),
        topology.queue(JobKind::Conversation),
        describe_rate(args.rate),
        args.concurrency,
        links.len(),
        message.body.len()
    );
    let channels: Arc<Vec<lapin::Channel>> =
        Arc::new(links.iter().map(|(_, channel)| channel.clone()).collect());
    let publish = move |_worker: usize, n: u64| {
        let (channels, message) = (channels.clone(), message.clone());
        async move {
            let channel = &channels[n as usize % channels.len()];
            match publish_confirmed(channel, std::slice::from_ref(&message)).await {
                Ok(()) => Outcome::Accepted,
                Err(_) => Outcome::Failed,
            }
        }
    };
    let tally = drive(Schedule::new(args), args.concurrency, publish).await;
    delete_topology(&links[0].1, &topology).await?;
    for (connection, _) in links {
        let _ = connection.close(200, "done".into()).await;
    }
    Ok(tally)
}

/// The queue message ingest would publish for one event of this run (same body, same headers).
fn sample_message(args: &Args, run_id: &str, topology: &Topology) -> anyhow::Result<Outgoing> {
    let deliveries = Deliveries::new(run_id, &args.page_id, args.conversations, 1, String::new());
    let (body, _) = deliveries.signed(0);
    let events = split_delivery(&body, now_ms())?;
    let event = events.first().context("the sample delivery has no event")?;
    Ok(fbsync_ingest::to_outgoing(topology, event))
}

/// Deletes every queue and exchange of `topology`, messages and all.
async fn delete_topology(channel: &lapin::Channel, topology: &Topology) -> anyhow::Result<()> {
    let queues = JobKind::ALL
        .iter()
        .map(|kind| topology.queue(*kind))
        .chain([topology.dead()]);
    for queue in queues {
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
    }
    for exchange in [topology.events_exchange(), topology.dead()] {
        channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The open-loop driver

/// When each request is due: fixed in advance from the start and the rate.
struct Schedule {
    start: Instant,
    /// Time between two requests; `None` sends each as soon as a worker is free.
    interval: Option<Duration>,
    deadline: Option<Instant>,
    count: Option<u64>,
    next: AtomicU64,
}

impl Schedule {
    fn new(args: &Args) -> Self {
        let start = Instant::now();
        let duration = match (args.duration_secs, args.count) {
            (None, None) => Some(10.0),
            (duration, _) => duration,
        };
        Self {
            start,
            interval: (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate)),
            deadline: duration.map(|secs| start + Duration::from_secs_f64(secs)),
            count: args.count,
            next: AtomicU64::new(0),
        }
    }

    /// Claims the next request: its number and due time, or `None` once the run is over.
    fn claim(&self) -> Option<(u64, Instant)> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        if self.count.is_some_and(|count| n >= count) {
            return None;
        }
        let due = match self.interval {
            Some(interval) => self.start + interval.mul_f64(n as f64),
            None => Instant::now(),
        };
        if self.deadline.is_some_and(|deadline| due >= deadline) {
            return None;
        }
        Some((n, due))
    }
}

/// How one request ended.
enum Outcome {
    /// 200, or a publish the broker confirmed.
    Accepted,
    /// Answered with another status.
    Refused(u16),
    /// No answer (connection error, timeout) or a publish not confirmed.
    Failed,
}

/// Runs `concurrency` workers that each claim the next due request, wait for its time, send it
/// and record it; returns their tallies merged. `attempt` gets the worker's index (for state of
/// its own, such as a connection) and the request's number.
async fn drive<F, Fut>(schedule: Schedule, concurrency: usize, attempt: F) -> Tally
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    let schedule = Arc::new(schedule);
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|worker| {
            let (schedule, attempt) = (schedule.clone(), attempt.clone());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while let Some((n, due)) = schedule.claim() {
                    if due > Instant::now() {
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let sent_at = Instant::now();
                    let outcome = attempt(worker, n).await;
                    tally.record(outcome, due, sent_at);
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for worker in futures::future::join_all(workers).await {
        total.merge(worker.expect("a load worker panicked"));
    }
    total.elapsed = schedule.start.elapsed();
    total
}

/// What a run (or one worker of it) saw.
#[derive(Default)]
struct Tally {
    accepted: u64,
    refused: BTreeMap<u16, u64>,
    failed: u64,
    /// Due time to answer, of accepted requests, in µs.
    latency_us: Vec<u64>,
    /// Actual send to answer, of accepted requests, in µs (leaves out the generator's lag).
    service_us: Vec<u64>,
    /// Due time to actual send, of every request, in µs: how far the generator fell behind.
    lag_us: Vec<u64>,
    elapsed: Duration,
}

impl Tally {
    fn record(&mut self, outcome: Outcome, due: Instant, sent_at: Instant) {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.lag_us
            .push(micros(sent_at.saturating_duration_since(due)));
        match outcome {
            Outcome::Accepted => {
                self.accepted += 1;
                self.latency_us.push(micros(due.elapsed()));
                self.service_us.push(micros(sent_at.elapsed()));
            }
            Outcome::Refused(status) => *self.refused.entry(status).or_default() += 1,
            Outcome::Failed => self.failed += 1,
        }
    }

    fn merge(&mut self, other: Tally) {
        self.accepted += other.accepted;
        for (status, n) in other.refused {
            *self.refused.entry(status).or_default() += n;
        }
        self.failed += other.failed;
        self.latency_us.extend(other.latency_us);
        self.service_us.extend(other.service_us);
        self.lag_us.extend(other.lag_us);
    }

    fn print(mut self, what: &str) {
        let sent = self.lag_us.len();
        let secs = self.elapsed.as_secs_f64();
        let refused: Vec<String> = self
            .refused
            .iter()
            .map(|(status, n)| format!("{status}: {n}"))
            .collect();
        println!("elapsed     {secs:.2} s");
        println!("sent        {sent} {what} ({:.0}/s)", sent as f64 / secs);
        println!("accepted    {}", self.accepted);
        println!("refused     {}", none_if_empty(&refused.join(", ")));
        println!("failed      {} (no answer or not confirmed)", self.failed);
        println!("accepted/s  {:.0}", self.accepted as f64 / secs);
        println!("latency ms  {}", percentiles(&mut self.latency_us));
        println!("service ms  {}", percentiles(&mut self.service_us));
        println!("send lag ms {}", percentiles(&mut self.lag_us));
        if let Some(cpu) = own_cpu_seconds() {
            println!(
                "cpu         {cpu:.2} s ({:.1} µs per accepted; the generator's own user + system)",
                cpu * 1e6 / self.accepted.max(1) as f64
            );
        }
    }
}

/// This process's CPU time so far (user + system), from /proc/self/stat; `None` where there
/// is no /proc. Counted in the kernel's clock ticks of 1/100 s (USER_HZ on Linux).
fn own_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn none_if_empty(text: &str) -> &str {
    if text.is_empty() { "none" } else { text }
}

/// "p50 … p90 … p99 … max …" in ms of a set of µs samples.
fn percentiles(samples_us: &mut [u64]) -> String {
    if samples_us.is_empty() {
        return "no samples".into();
    }
    samples_us.sort_unstable();
    let at = |q: f64| {
        let rank = (q * samples_us.len() as f64).ceil() as usize;
        samples_us[rank.clamp(1, samples_us.len()) - 1] as f64 / 1000.0
    };
    format!(
        "p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        at(0.50),
        at(0.90),
        at(0.99),
        at(1.0)
    )
}

fn describe_rate(rate: f64) -> String {
    if rate > 0.0 {
        format!("{rate}/s open loop")
    } else {
        "open throttle".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A server that answers each connection's first request with 200 and then closes it, as
    /// ingest closes a connection left idle for its read timeout; counts the connections.
    async fn answer_once_then_close() -> (Target, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let address = listener.local_addr().expect("its address");
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let mut request = Vec::new();
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    if stream.read_buf(&mut request).await.unwrap_or(0) == 0 {
                        break;
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\nEVENT_RECEIVED")
                    .await;
            }
        });
        let target = Target::parse(&format!("http://{address}/facebook/webhook")).expect("a URL");
        (target, connections)
    }

    #[tokio::test]
    async fn a_kept_connection_the_server_closed_while_idle_costs_a_reconnect_not_a_failure() {
        let (target, connections) = answer_once_then_close().await;
        let mut slot = None;
        for n in 0..3 {
            let status = post_delivery(&target, &mut slot, b"{}", "sha256=00").await;
            assert_eq!(status.ok(), Some(200), "delivery {n}");
            // Let the server's close reach this side before the connection is used again.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(connections.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn an_answer_head_gives_its_status_length_and_whether_the_connection_closes() {
        let head = |text: &str| parse_answer_head(text.as_bytes()).ok();
        assert_eq!(
            head("HTTP/1.1 200 OK\r\ncontent-length: 14"),
            Some((200, 14, false))
        );
        assert_eq!(
            head(
                "HTTP/1.1 503 Service Unavailable\r\nConnection: keep-alive, close\r\nContent-Length: 15"
            ),
            Some((503, 15, true))
        );
        assert_eq!(
            head("HTTP/1.0 200 OK\r\nContent-Length: 2"),
            Some((200, 2, true))
        );
        assert_eq!(head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"), None);
        assert_eq!(head("garbage"), None);
    }
}
