//! Page changes, end to end through the real binary and a fake Graph API: a page change writes
//! that one Page's `page_data.json` (never a token), only when its content changed; rate limits
//! and server errors are waited out; a rejected token stops at once, flags the Page and
//! dead-letters the job; failures that outlast the retry policy are dead-lettered with their
//! attempt count; a slow fetch of older metadata never overwrites newer; a long wait parks the
//! job in its delay queue, from which the broker brings it back.

use std::time::Duration;

use fbsync_shared::facebook::event::{EventKind, EventMessage};
use fbsync_shared::jobs::JobKind;
use fbsync_shared::queue::{Outgoing, Topology, connect, publish_confirmed};
use lapin::options::BasicGetOptions;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;

use crate::common::broker::{AMQP_URL, drain_queue, queue_depth};
use crate::common::fake_graph::{CREATED_TIME, Failure, FakeGraph, page_token};
use crate::common::fixtures::fixture;
use crate::common::pipeline::{DbKind, PAGE_ID, PAGE_TOKEN, Pipeline, StoreKind, USER_UUID};
use crate::common::process::FbsyncProcess;
use crate::common::spaces_limits::{SpacesLimitLayer, SpacesLimits, s3_endpoint};
use crate::common::webhook::post_signed;

/// The default log filter plus the worker's debug lines, which say when a page-change job is
/// done and what it did ("page metadata refreshed", outcome `Written` or `Unchanged`).
const LOG_FILTER: &str =
    "info,lapin=warn,aws_config=warn,aws_smithy_runtime=warn,sqlx=warn,fbsync_worker=debug";

/// How long any one step may take.
const STEP: Duration = Duration::from_secs(30);

/// The object key of the Page's metadata, in the seed's layout.
fn page_data_key(page_id: &str) -> String {
    format!("users/{USER_UUID}/facebook_messenger/{page_id}/page_data.json")
}

/// A pipeline on `store` whose Graph API is `fake`, with the test Page registered.
async fn pipeline_with_graph(db: DbKind, store: StoreKind, fake: &FakeGraph) -> Pipeline {
    let mut pipeline = Pipeline::new(db, store).await;
    pipeline.set("FACEBOOK_GRAPH_URL", &fake.url());
    pipeline.set("RUST_LOG", LOG_FILTER);
    pipeline.register_page(PAGE_ID).await;
    pipeline
}

/// What `page_data.json` must hold: the Page as the fake answers it, without its token.
fn expected_page_data(fake: &FakeGraph, page_id: &str) -> Value {
    let mut page = fake.page(page_id).expect("the fake knows the Page");
    page.as_object_mut()
        .expect("a Page is an object")
        .remove("access_token")
        .expect("the fake hands out a token");
    page
}

/// The stored bytes hold no token of any kind.
fn assert_no_token(raw: &[u8], page_id: &str) {
    let text = String::from_utf8_lossy(raw);
    assert!(!text.contains("access_token"), "a token field: {text}");
    assert!(
        !text.contains(&page_token(page_id)),
        "the Graph token: {text}"
    );
    assert!(!text.contains(PAGE_TOKEN), "the registered token: {text}");
}

/// Posts the page-change fixture (page [`PAGE_ID`]) to the webhook.
async fn post_page_change(client: &reqwest::Client, url: &str) {
    let status = post_signed(client, url, &fixture("page_change.json")).await;
    assert_eq!(status, 200, "the page change is accepted");
}

/// Waits until the worker reports a page-change job done; returns its outcome.
async fn next_refresh(process: &mut FbsyncProcess) -> String {
    let line = process.wait_for_log("page metadata refreshed", STEP).await;
    assert_eq!(line["fields"]["page_id"], PAGE_ID, "{line}");
    line["fields"]["outcome"]
        .as_str()
        .unwrap_or_else(|| panic!("no outcome in {line}"))
        .to_string()
}

/// The stored object's bytes, once it exists (panics after `limit`).
async fn wait_for_object(pipeline: &Pipeline, key: &str, limit: Duration) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(bytes) = pipeline.object(key).await {
            return bytes;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} not written within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A message taken from the dead-letter queue: its body and headers.
struct DeadLetter {
    event: EventMessage,
    headers: FieldTable,
}

impl DeadLetter {
    fn text(&self, name: &str) -> Option<String> {
        match self.headers.inner().get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
            _ => None,
        }
    }

    fn number(&self, name: &str) -> Option<i64> {
        match self.headers.inner().get(name)? {
            AMQPValue::LongLongInt(n) => Some(*n),
            AMQPValue::LongInt(n) => Some(i64::from(*n)),
            AMQPValue::ShortInt(n) => Some(i64::from(*n)),
            _ => None,
        }
    }
}

/// Takes `count` messages from `<prefix>.dead` as they arrive (panics if fewer come within
/// `limit`), then whatever else is already there: the caller checks the total.
async fn take_dead_letters(prefix: &str, count: usize, limit: Duration) -> Vec<DeadLetter> {
    let queue = format!("{prefix}.dead");
    let connection = connect(&AMQP_URL.into(), "fbsync-test-dead-letters")
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    let deadline = tokio::time::Instant::now() + limit;
    let mut letters = Vec::new();
    loop {
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get");
        match got {
            Some(message) => letters.push(DeadLetter {
                event: serde_json::from_slice(&message.delivery.data)
                    .expect("a dead letter keeps its event message"),
                headers: message
                    .delivery
                    .properties
                    .headers()
                    .clone()
                    .unwrap_or_default(),
            }),
            None if letters.len() >= count => break,
            None => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} of {count} dead letters within {limit:?}",
                    letters.len()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let _ = connection.close(200, "done".into()).await;
    letters
}

/// The one registered Page as `fbsync pages list --json` shows it.
async fn listed_page(pipeline: &Pipeline) -> (Value, String) {
    let (code, listing, stderr) = pipeline.run(&["pages", "list", "--json"]).await;
    assert_eq!(code, 0, "pages list failed: {stderr}");
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 1, "one Page: {listing}");
    let page: Value = serde_json::from_str(lines[0]).expect("a JSON line");
    assert_eq!(page["page_id"], PAGE_ID);
    (page, listing)
}

/// A page change writes the Page's metadata (and no token); the same metadata again writes
/// nothing; a renamed Page is written again. With `layer` (the store behind the Spaces-limit
/// layer) the PUTs are counted too.
async fn page_data_follows_the_page(
    db: DbKind,
    store: StoreKind,
    layer: Option<&SpacesLimitLayer>,
) {
    let fake = FakeGraph::start().await;
    fake.set_page(PAGE_ID, "Handmade Shop");
    let pipeline = pipeline_with_graph(db, store, &fake).await;
    let key = page_data_key(PAGE_ID);
    let (mut process, ingest) = pipeline.up().await;
    let url = ingest.webhook;
    let client = reqwest::Client::new();

    // First change: written, the Page's own metadata, no token.
    post_page_change(&client, &url).await;
    assert_eq!(next_refresh(&mut process).await, "Written");
    let raw = wait_for_object(&pipeline, &key, STEP).await;
    assert_no_token(&raw, PAGE_ID);
    let stored: Value = serde_json::from_slice(&raw).expect("page_data.json is JSON");
    assert_eq!(stored, expected_page_data(&fake, PAGE_ID));
    assert_eq!(stored["id"], PAGE_ID);
    assert_eq!(stored["name"], "Handmade Shop");
    assert_eq!(stored["category"], "Clothing Store");
    assert_eq!(stored["created_time"], CREATED_TIME);
    assert_eq!(
        stored["picture"]["data"]["url"],
        format!("https://scontent.example.com/{PAGE_ID}/picture.jpg")
    );
    assert_eq!(stored["location"]["street"], "Beispielstraße 1");
    let calls = fake.calls();
    assert_eq!(calls.len(), 1, "one Graph call: {calls:?}");
    assert_eq!(
        calls[0].token.as_deref(),
        Some(PAGE_TOKEN),
        "the worker calls Graph with the Page's registered token"
    );
    assert!(
        !calls[0].path.contains(PAGE_TOKEN),
        "the token never travels in the URL"
    );
    if let Some(layer) = layer {
        assert_eq!(layer.puts_for("page_data.json"), 1);
    }
    let file_identity = |pipeline: &Pipeline| {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(pipeline.data_dir.join(&key)).ok()?;
        Some((meta.ino(), meta.mtime(), meta.mtime_nsec()))
    };
    let local_before = pipeline.bucket.is_none().then(|| file_identity(&pipeline));
    let (page, _) = listed_page(&pipeline).await;
    let first_flush = page["last_flush_ms"]
        .as_i64()
        .expect("a written page_data.json counts as a flush");

    // Second change, same metadata: read and compared, not rewritten.
    post_page_change(&client, &url).await;
    assert_eq!(next_refresh(&mut process).await, "Unchanged");
    assert_eq!(fake.calls_for(PAGE_ID).len(), 2, "the metadata was fetched");
    assert_eq!(pipeline.object(&key).await.expect("still stored"), raw);
    if let Some(layer) = layer {
        assert_eq!(
            layer.puts_for("page_data.json"),
            1,
            "unchanged metadata is not PUT again"
        );
    }
    if let Some(before) = local_before {
        assert!(before.is_some());
        assert_eq!(
            file_identity(&pipeline),
            before,
            "the file was not rewritten"
        );
    }

    // The Page is renamed: the next change writes the new name, everything else kept.
    fake.set_page(PAGE_ID, "New name");
    post_page_change(&client, &url).await;
    assert_eq!(next_refresh(&mut process).await, "Written");
    let renamed = pipeline.object(&key).await.expect("still stored");
    assert_no_token(&renamed, PAGE_ID);
    let renamed: Value = serde_json::from_slice(&renamed).expect("JSON");
    assert_eq!(renamed["name"], "New name");
    assert_eq!(renamed, expected_page_data(&fake, PAGE_ID));
    assert_eq!(fake.calls_for(PAGE_ID).len(), 3);
    if let Some(layer) = layer {
        assert_eq!(layer.puts_for("page_data.json"), 2);
        assert_eq!(layer.throttled(), 0, "{:?}", layer.violations());
    }
    let (page, listing) = listed_page(&pipeline).await;
    assert_eq!(page["status"], "active");
    assert!(page["last_flush_ms"].as_i64() >= Some(first_flush));
    assert!(!listing.contains(PAGE_TOKEN));

    assert!(
        drain_queue(&format!("{}.dead", pipeline.prefix))
            .await
            .is_empty(),
        "nothing dead-lettered"
    );
    process.stop().await;
    pipeline.cleanup().await;
}

#[tokio::test]
async fn page_changes_keep_page_data_in_a_local_directory() {
    page_data_follows_the_page(DbKind::Sqlite, StoreKind::Local, None).await;
}

#[tokio::test]
async fn page_changes_keep_page_data_in_the_s3_bucket_within_spaces_limits() {
    let layer = SpacesLimitLayer::start(&s3_endpoint(), SpacesLimits::default()).await;
    let store = StoreKind::S3 {
        endpoint: Some(layer.endpoint()),
    };
    page_data_follows_the_page(DbKind::Postgres, store, Some(&layer)).await;
}

/// Rate limits (403 code 4, 400 code 80006) and a 500 before the normal answer: each is waited
/// out, the object is written, nothing is dead-lettered.
#[tokio::test]
async fn graph_rate_limits_and_server_errors_are_waited_out() {
    let fake = FakeGraph::start().await;
    fake.set_page(PAGE_ID, "Handmade Shop");
    for failure in [
        Failure::RateLimited {
            code: 4,
            regain_minutes: 0,
        },
        Failure::ServerError,
        Failure::RateLimited {
            code: 80006,
            regain_minutes: 0,
        },
    ] {
        fake.push_failure(PAGE_ID, failure);
    }
    let pipeline = pipeline_with_graph(DbKind::Sqlite, StoreKind::Local, &fake).await;
    let (mut process, ingest) = pipeline.up().await;
    let url = ingest.webhook;
    let client = reqwest::Client::new();

    post_page_change(&client, &url).await;
    assert_eq!(next_refresh(&mut process).await, "Written");
    let raw = wait_for_object(&pipeline, &page_data_key(PAGE_ID), STEP).await;
    assert_no_token(&raw, PAGE_ID);
    let stored: Value = serde_json::from_slice(&raw).expect("JSON");
    assert_eq!(stored, expected_page_data(&fake, PAGE_ID));

    let calls = fake.calls_for(PAGE_ID);
    assert_eq!(calls.len(), 4, "three failures, then the answer");
    assert_eq!(fake.pending_failures(PAGE_ID), 0);
    // WORKER_RETRY_BASE_MS=50: every retry waited at least that long.
    for pair in calls.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(50),
            "a retry after {gap:?}, sooner than the policy's base delay"
        );
    }
    assert!(
        drain_queue(&format!("{}.dead", pipeline.prefix))
            .await
            .is_empty(),
        "nothing dead-lettered"
    );
    let (page, _) = listed_page(&pipeline).await;
    assert_eq!(page["status"], "active");
    process.stop().await;
    pipeline.cleanup().await;
}

/// An expired token (190): one call, no retry, the job dead-lettered as `token_error`, the Page
/// flagged for re-authorisation, nothing written.
#[tokio::test]
async fn an_expired_token_dead_letters_at_once_and_flags_the_page() {
    let fake = FakeGraph::start().await;
    fake.set_page(PAGE_ID, "Handmade Shop");
    fake.push_failure(PAGE_ID, Failure::TokenExpired);
    let pipeline = pipeline_with_graph(DbKind::Sqlite, StoreKind::Local, &fake).await;
    let (mut process, ingest) = pipeline.up().await;
    let url = ingest.webhook;
    let client = reqwest::Client::new();

    post_page_change(&client, &url).await;
    let dead = take_dead_letters(&pipeline.prefix, 1, STEP).await;
    assert_eq!(dead.len(), 1, "one dead letter");
    let letter = &dead[0];
    assert_eq!(
        letter.text("x-fbsync-reason").as_deref(),
        Some("token_error")
    );
    assert_eq!(letter.number("x-fbsync-attempts"), Some(1));
    assert_eq!(
        letter.text("x-fbsync-routing-key").as_deref(),
        Some("page_change"),
        "replay goes back to the page-change queue"
    );
    let error = letter.text("x-fbsync-error").unwrap_or_default();
    assert!(error.contains("190"), "{error}");
    assert!(!error.contains(PAGE_TOKEN), "{error}");
    assert_eq!(letter.event.page_id, PAGE_ID);
    assert_eq!(letter.event.kind, EventKind::PageChange);

    assert_eq!(fake.calls_for(PAGE_ID).len(), 1, "no retry after a 190");
    let (page, listing) = listed_page(&pipeline).await;
    assert_eq!(page["status"], "needs_reauth", "{page}");
    let last_error = page["last_error"].as_str().unwrap_or_default();
    assert!(last_error.contains("190"), "{page}");
    assert!(page["last_error_ms"].as_i64().is_some(), "{page}");
    assert!(!listing.contains(PAGE_TOKEN));
    assert!(
        pipeline.object(&page_data_key(PAGE_ID)).await.is_none(),
        "nothing written"
    );
    process.stop().await;
    pipeline.cleanup().await;
}

/// More server errors than WORKER_MAX_ATTEMPTS: three calls, then the job is dead-lettered as
/// `attempts_exhausted` with its attempt count; the Page itself stays active.
#[tokio::test]
async fn server_errors_beyond_the_attempts_dead_letter_the_job() {
    let fake = FakeGraph::start().await;
    fake.set_page(PAGE_ID, "Handmade Shop");
    for _ in 0..5 {
        fake.push_failure(PAGE_ID, Failure::ServerError);
    }
    let mut pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    pipeline.set("FACEBOOK_GRAPH_URL", &fake.url());
    pipeline.set("WORKER_MAX_ATTEMPTS", "3");
    pipeline.register_page(PAGE_ID).await;
    let (mut process, ingest) = pipeline.up().await;
    let url = ingest.webhook;
    let client = reqwest::Client::new();

    post_page_change(&client, &url).await;
    let dead = take_dead_letters(&pipeline.prefix, 1, STEP).await;
    assert_eq!(dead.len(), 1, "one dead letter");
    let letter = &dead[0];
    assert_eq!(
        letter.text("x-fbsync-reason").as_deref(),
        Some("attempts_exhausted")
    );
    assert_eq!(letter.number("x-fbsync-attempts"), Some(3));
    let error = letter.text("x-fbsync-error").unwrap_or_default();
    assert!(
        error.contains("unexpected error"),
        "the last error: {error}"
    );
    assert_eq!(letter.event.page_id, PAGE_ID);
    let first = letter.number("x-fbsync-first-failure-ms").unwrap_or(0);
    let last = letter.number("x-fbsync-last-failure-ms").unwrap_or(0);
    assert!(first > 0 && last >= first, "failure times {first}..{last}");

    assert_eq!(fake.calls_for(PAGE_ID).len(), 3, "exactly the attempts");
    assert_eq!(fake.pending_failures(PAGE_ID), 2);
    assert!(pipeline.object(&page_data_key(PAGE_ID)).await.is_none());
    let (page, _) = listed_page(&pipeline).await;
    assert_eq!(
        page["status"], "active",
        "a server error is not a token error"
    );
    process.stop().await;
    pipeline.cleanup().await;
}

/// A page_data write that has to wait (here: storage answers 503 while it backs off) must not
/// store metadata older than what a later page change already stored.
#[tokio::test]
async fn a_delayed_write_never_overwrites_newer_page_data() {
    let layer = SpacesLimitLayer::start(&s3_endpoint(), SpacesLimits::default()).await;
    let fake = FakeGraph::start().await;
    fake.set_page(PAGE_ID, "Old name");
    let store = StoreKind::S3 {
        endpoint: Some(layer.endpoint()),
    };
    let mut pipeline = pipeline_with_graph(DbKind::Sqlite, store, &fake).await;
    // The retry loop's own debug lines say how long the write backs off.
    pipeline.set("RUST_LOG", &format!("{LOG_FILTER},fbsync_shared=debug"));
    pipeline.set("WORKER_RETRY_BASE_MS", "400");
    pipeline.set("WORKER_RETRY_MAX_MS", "4000");
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    let key = page_data_key(PAGE_ID);
    let (mut process, ingest) = pipeline.up().await;
    let url = ingest.webhook;
    let client = reqwest::Client::new();

    // Job 1 fetches "Old name", then cannot reach the store and backs off.
    layer.set_down(true);
    post_page_change(&client, &url).await;
    loop {
        let line = process.wait_for_log("retrying", STEP).await;
        let delay = line["fields"]["delay_ms"].as_u64().unwrap_or(0);
        if line["fields"]["operation"] == "page_data" && delay >= 1500 {
            break;
        }
    }
    // While job 1 sleeps, the Page is renamed, storage is back, and job 2 stores the new name.
    fake.set_page(PAGE_ID, "New name");
    layer.set_down(false);
    post_page_change(&client, &url).await;
    assert_eq!(next_refresh(&mut process).await, "Written");
    let stored: Value =
        serde_json::from_slice(&pipeline.object(&key).await.expect("stored")).expect("JSON");
    assert_eq!(stored["name"], "New name", "job 2 finished first");
    // Job 1 wakes up and finishes.
    let _ = next_refresh(&mut process).await;
    let stored: Value =
        serde_json::from_slice(&pipeline.object(&key).await.expect("stored")).expect("JSON");
    assert_eq!(
        stored,
        expected_page_data(&fake, PAGE_ID),
        "page_data.json went back to metadata older than the last page change"
    );
    process.stop().await;
    pipeline.cleanup().await;
}

/// Page changes for many Pages at once: their reads and writes stay within the bucket's
/// request rates, as the flusher's do (the layer enforces Spaces' bucket budgets).
#[tokio::test]
async fn a_burst_of_page_changes_stays_within_the_bucket_rates() {
    let limits = SpacesLimits {
        bucket_writes_per_second: 20,
        bucket_operations_per_second: 30,
        ..SpacesLimits::default()
    };
    let layer = SpacesLimitLayer::start(&s3_endpoint(), limits).await;
    let fake = FakeGraph::start().await;
    let mut pipeline = Pipeline::new(
        DbKind::Sqlite,
        StoreKind::S3 {
            endpoint: Some(layer.endpoint()),
        },
    )
    .await;
    pipeline.set("FACEBOOK_GRAPH_URL", &fake.url());
    pipeline.set("SPACES_WRITES_PER_SEC", "20");
    pipeline.set("SPACES_OPS_PER_SEC", "30");
    let pages: Vec<String> = (0..40).map(|i| format!("7000000000{i:03}")).collect();
    for page_id in &pages {
        fake.set_page(page_id, &format!("Shop {page_id}"));
        pipeline.register_page(page_id).await;
    }
    let (mut process, ingest) = pipeline.up().await;
    let url = ingest.webhook;
    let entries: Vec<String> = pages
        .iter()
        .map(|page_id| {
            format!(
                r#"{{"id":"{page_id}","time":1520383571,"changes":[{{"field":"name","value":"x"}}]}}"#
            )
        })
        .collect();
    let body = format!(r#"{{"object":"page","entry":[{}]}}"#, entries.join(","));
    let client = reqwest::Client::new();
    let status = post_signed(&client, &url, body.as_bytes()).await;
    assert_eq!(status, 200);
    for page_id in &pages {
        let raw =
            wait_for_object(&pipeline, &page_data_key(page_id), Duration::from_secs(60)).await;
        let stored: Value = serde_json::from_slice(&raw).expect("JSON");
        assert_eq!(stored, expected_page_data(&fake, page_id));
    }
    assert_eq!(
        layer.throttled(),
        0,
        "requests over a bucket rate: {:?}",
        layer.violations()
    );
    process.stop().await;
    pipeline.cleanup().await;
}

/// A worker told to stop while a page-change job waits out a Graph rate limit (here: access
/// back in a minute) stops promptly and leaves the job on its queue for later.
#[tokio::test]
async fn a_rate_limit_wait_does_not_hold_up_shutdown() {
    let fake = FakeGraph::start().await;
    fake.set_page(PAGE_ID, "Handmade Shop");
    fake.push_failure(
        PAGE_ID,
        Failure::RateLimited {
            code: 32,
            regain_minutes: 1,
        },
    );
    let pipeline = pipeline_with_graph(DbKind::Sqlite, StoreKind::Local, &fake).await;
    let (mut process, ingest) = pipeline.up().await;
    let url = ingest.webhook;
    let client = reqwest::Client::new();
    post_page_change(&client, &url).await;
    let deadline = tokio::time::Instant::now() + STEP;
    while fake.calls_for(PAGE_ID).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no Graph call");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some(status) = process.terminate_and_wait(Duration::from_secs(15)).await else {
        panic!("fbsync still running 15 s after SIGTERM: it is waiting out the rate limit");
    };
    assert!(
        status.success(),
        "fbsync exited with {status} after SIGTERM: a shutdown during a rate-limit wait must \
         be clean (status 0)"
    );
    let requeued = drain_queue(&Topology::new(&pipeline.prefix).queue(JobKind::PageChange)).await;
    assert_eq!(requeued.len(), 1, "the job is back on its queue");
    pipeline.cleanup().await;
}

/// Page metadata never goes back in time: job 1's Graph call is slow and answers the Page as it
/// was (old name); meanwhile the Page is renamed and job 2 fetches and stores the new name.
/// When job 1's answer finally comes, it is dropped: `page_data.json` keeps the newer data.
#[tokio::test]
async fn a_slow_fetch_of_older_metadata_never_overwrites_newer_page_data() {
    let fake = FakeGraph::start().await;
    fake.set_page(PAGE_ID, "Old name");
    let hold = fake.hold_next(PAGE_ID);
    let pipeline = pipeline_with_graph(DbKind::Sqlite, StoreKind::Local, &fake).await;
    let key = page_data_key(PAGE_ID);
    let (mut process, ingest) = pipeline.up().await;
    let client = reqwest::Client::new();

    // Job 1's call arrives and is held: its answer is the Page as it is now.
    post_page_change(&client, &ingest.webhook).await;
    let deadline = tokio::time::Instant::now() + STEP;
    while fake.calls_for(PAGE_ID).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no Graph call");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The Page is renamed; job 2 fetches the new name and stores it while job 1 waits.
    fake.set_page(PAGE_ID, "New name");
    post_page_change(&client, &ingest.webhook).await;
    assert_eq!(next_refresh(&mut process).await, "Written", "job 2");
    let stored: Value =
        serde_json::from_slice(&pipeline.object(&key).await.expect("stored")).expect("JSON");
    assert_eq!(stored["name"], "New name");
    assert_eq!(fake.calls_for(PAGE_ID).len(), 2);

    // Job 1's old answer comes now; it must not be stored.
    hold.release();
    assert_eq!(
        next_refresh(&mut process).await,
        "Unchanged",
        "job 1 stored its older metadata"
    );
    let raw = pipeline.object(&key).await.expect("stored");
    assert_no_token(&raw, PAGE_ID);
    let stored: Value = serde_json::from_slice(&raw).expect("JSON");
    assert_eq!(
        stored,
        expected_page_data(&fake, PAGE_ID),
        "page_data.json went back to metadata older than what it held"
    );
    assert_eq!(fake.calls_for(PAGE_ID).len(), 2, "no other fetch");
    process.stop().await;
    pipeline.cleanup().await;
}

/// Reads (and takes) the one message waiting in `queue`: its body, headers and expiration.
async fn take_one(queue: &str) -> Option<(Vec<u8>, FieldTable, Option<String>)> {
    let connection = connect(&AMQP_URL.into(), "fbsync-test-take")
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    let got = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get");
    let _ = connection.close(200, "done".into()).await;
    let delivery = got?.delivery;
    let properties = &delivery.properties;
    Some((
        delivery.data.clone(),
        properties.headers().clone().unwrap_or_default(),
        properties.expiration().as_ref().map(|e| e.to_string()),
    ))
}

/// Waits until `queue` has `depth` messages ready (panics after `limit`).
async fn wait_for_depth(queue: &str, depth: u32, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let current = queue_depth(queue).await;
        if current == depth {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue} holds {current}, not {depth}, after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A rate limit that asks for a minute, with `WORKER_PARK_AFTER_MS=500`, parks the job: a copy
/// waits in `<prefix>.delay.page_change` with the wait as its per-message expiration, the
/// original is acked (nothing is held or returned to `<prefix>.page_change`), nothing is
/// dead-lettered, and the worker goes on with other work. When the copy's expiration ends, the
/// broker routes it back to `<prefix>.page_change` (proved with a copy re-parked for 300 ms),
/// and a worker then refreshes the Page.
#[tokio::test]
async fn a_long_rate_limit_parks_the_job_in_its_delay_queue() {
    let fake = FakeGraph::start().await;
    fake.set_page(PAGE_ID, "Handmade Shop");
    fake.push_failure(
        PAGE_ID,
        Failure::RateLimited {
            code: 32,
            regain_minutes: 1,
        },
    );
    let mut pipeline = pipeline_with_graph(DbKind::Sqlite, StoreKind::Local, &fake).await;
    pipeline.set("WORKER_PARK_AFTER_MS", "500");
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", "0");
    let topology = Topology::new(&pipeline.prefix);
    let (jobs, delay) = (
        topology.queue(JobKind::PageChange),
        topology.delay_queue(JobKind::PageChange),
    );
    let (mut process, ingest) = pipeline.up().await;
    let client = reqwest::Client::new();

    post_page_change(&client, &ingest.webhook).await;
    let parked = process
        .wait_for_log("job parked until it may run again", STEP)
        .await;
    assert_eq!(parked["fields"]["queue"], delay.as_str(), "{parked}");
    assert_eq!(parked["fields"]["wait_secs"], 60, "{parked}");
    wait_for_depth(&delay, 1, STEP).await;
    assert_eq!(fake.calls_for(PAGE_ID).len(), 1, "one Graph call, no retry");

    // The worker goes on: a conversation event and another page change are done.
    let body = crate::common::webhook::message_delivery(PAGE_ID, "u1", "m_after", 100, false);
    assert_eq!(post_signed(&client, &ingest.webhook, &body).await, 200);
    let events = pipeline.wait_for_conversation(PAGE_ID, "u1", 1, STEP).await;
    assert_eq!(events.len(), 1);
    post_page_change(&client, &ingest.webhook).await;
    assert_eq!(next_refresh(&mut process).await, "Written");

    // Stopping the worker returns whatever it still holds: nothing, the original was acked.
    process.stop().await;
    assert_eq!(queue_depth(&jobs).await, 0, "the parked job was not acked");
    assert_eq!(queue_depth(&delay).await, 1);
    assert_eq!(queue_depth(&topology.dead()).await, 0, "dead-lettered");

    // The parked copy: the job's own message, with the wait as its expiration.
    let (body, headers, expiration) = take_one(&delay).await.expect("the parked copy");
    let expiration: u64 = expiration
        .expect("a per-message expiration")
        .parse()
        .expect("milliseconds");
    assert!(
        (60_000..=70_000).contains(&expiration),
        "expiration {expiration} ms for a one-minute rate limit"
    );
    let event: EventMessage = serde_json::from_slice(&body).expect("an event message");
    assert_eq!(event.page_id, PAGE_ID);
    assert_eq!(event.kind, EventKind::PageChange);
    assert!(
        !headers
            .inner()
            .keys()
            .any(|k| k.as_str().starts_with("x-fbsync-")),
        "a parked job is not a dead letter: {headers:?}"
    );

    // The same copy parked for 300 ms comes back to the job queue when it expires.
    let connection = connect(&AMQP_URL.into(), "fbsync-test-park")
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let reparked = Outgoing {
        exchange: String::new(),
        routing_key: delay.clone(),
        body: body.clone(),
        message_id: event.event_id.clone(),
        headers,
        expiration: Some(Duration::from_millis(300)),
    };
    publish_confirmed(&channel, &[reparked])
        .await
        .expect("re-parked");
    let _ = connection.close(200, "done".into()).await;
    wait_for_depth(&jobs, 1, Duration::from_secs(10)).await;
    assert_eq!(queue_depth(&delay).await, 0);

    // A worker takes it from there: the Page's metadata is stored, nothing dead-lettered.
    std::fs::remove_file(pipeline.data_dir.join(page_data_key(PAGE_ID))).expect("remove");
    let mut worker = pipeline.spawn(&["worker"]);
    let raw = wait_for_object(&pipeline, &page_data_key(PAGE_ID), STEP).await;
    let stored: Value = serde_json::from_slice(&raw).expect("JSON");
    assert_eq!(stored, expected_page_data(&fake, PAGE_ID));
    assert_eq!(
        fake.calls_for(PAGE_ID).len(),
        3,
        "the parked job ran once more"
    );
    worker.stop().await;
    assert_eq!(queue_depth(&jobs).await, 0);
    assert_eq!(queue_depth(&topology.dead()).await, 0);
    pipeline.cleanup().await;
}

/// The whole round trip by the worker alone: with `WORKER_PARK_AFTER_MS` below the retry
/// policy's delay, a Graph server error parks the job for that delay; the copy expires, the
/// broker routes it back, and the worker's next attempt stores the Page. Nothing is lost or
/// dead-lettered and the queues end empty.
#[tokio::test]
async fn a_parked_job_comes_back_when_its_wait_ends_and_completes() {
    let fake = FakeGraph::start().await;
    fake.set_page(PAGE_ID, "Handmade Shop");
    fake.push_failure(PAGE_ID, Failure::ServerError);
    let mut pipeline = pipeline_with_graph(DbKind::Sqlite, StoreKind::Local, &fake).await;
    pipeline.set("WORKER_PARK_AFTER_MS", "100");
    pipeline.set("WORKER_RETRY_BASE_MS", "300");
    let topology = Topology::new(&pipeline.prefix);
    let (mut process, ingest) = pipeline.up().await;
    let client = reqwest::Client::new();

    post_page_change(&client, &ingest.webhook).await;
    let parked = process
        .wait_for_log("job parked until it may run again", STEP)
        .await;
    assert_eq!(
        parked["fields"]["queue"],
        topology.delay_queue(JobKind::PageChange).as_str()
    );
    assert_eq!(next_refresh(&mut process).await, "Written");
    let raw = wait_for_object(&pipeline, &page_data_key(PAGE_ID), STEP).await;
    let stored: Value = serde_json::from_slice(&raw).expect("JSON");
    assert_eq!(stored, expected_page_data(&fake, PAGE_ID));
    let calls = fake.calls_for(PAGE_ID);
    assert_eq!(
        calls.len(),
        2,
        "the failed attempt, then the one after the wait"
    );
    assert!(
        calls[1] - calls[0] >= Duration::from_millis(300),
        "came back after {:?}, sooner than its wait",
        calls[1] - calls[0]
    );
    process.stop().await;
    for queue in [
        topology.queue(JobKind::PageChange),
        topology.delay_queue(JobKind::PageChange),
        topology.dead(),
    ] {
        assert_eq!(queue_depth(&queue).await, 0, "{queue}");
    }
    pipeline.cleanup().await;
}
