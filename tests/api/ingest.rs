//! Ingest: the handshake, signatures, splitting, limits, broker outages and load.

use std::time::Duration;

use tokio::time::Instant;

use fbsync_shared::facebook::event::EventKind;
use fbsync_shared::facebook::signature::{sign_sha1, sign_sha256};
use fbsync_shared::jobs::JobKind;

use crate::common::broker::{AMQP_URL, TcpProxy, delete_topology, unique_prefix};
use crate::common::fixtures::{fixture, fixture_names};
use crate::common::ingest::{
    InProcessIngest, spawn_ingest_in_process, spawn_ingest_in_process_with,
};
use crate::common::metrics::{sample, scrape};
use crate::common::pipeline::{DbKind, IngestUrls, Pipeline, StoreKind};
use crate::common::process::{FbsyncProcess, fbsync_command};
use crate::common::webhook::{APP_SECRET, VERIFY_TOKEN, post_signed};

#[tokio::test]
async fn handshake_answers_the_challenge_only_for_the_right_token() {
    let ingest = spawn_ingest_in_process(AMQP_URL).await;
    let get = |query: String| {
        let client = ingest.client.clone();
        let url = ingest.url(&format!("/facebook/webhook?{query}"));
        async move { client.get(url).send().await.expect("answer") }
    };
    let ok = get(format!(
        "hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}&hub.challenge=1158201444"
    ))
    .await;
    assert_eq!(ok.status(), 200);
    assert_eq!(
        ok.headers()
            .get("x-content-type-options")
            .map(|v| v.as_bytes()),
        Some(&b"nosniff"[..]),
        "the echoed challenge cannot be sniffed into HTML"
    );
    assert_eq!(ok.text().await.expect("body"), "1158201444");

    let wrong_token = get("hub.mode=subscribe&hub.verify_token=nope&hub.challenge=1".into()).await;
    assert_eq!(wrong_token.status(), 403);
    let wrong_mode = get(format!(
        "hub.mode=unsubscribe&hub.verify_token={VERIFY_TOKEN}&hub.challenge=1"
    ))
    .await;
    assert_eq!(wrong_mode.status(), 403);
    let no_challenge = get(format!(
        "hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}"
    ))
    .await;
    assert_eq!(no_challenge.status(), 403);
    ingest.cleanup().await;
}

#[tokio::test]
async fn sha256_and_sha1_signed_deliveries_are_published() {
    let ingest = spawn_ingest_in_process(AMQP_URL).await;
    let body = fixture("message.json");
    assert_eq!(ingest.post_signed(&body).await, 200);

    let sha1_only = ingest
        .client
        .post(ingest.url("/facebook/webhook"))
        .header("x-hub-signature", sign_sha1(APP_SECRET, &body))
        .body(body.clone())
        .send()
        .await
        .expect("answer");
    assert_eq!(sha1_only.status(), 200);

    let events = ingest.drain(JobKind::Conversation).await;
    assert_eq!(events.len(), 2);
    assert!(
        events
            .iter()
            .all(|e| e.event_id == "mid:mid.1468152703527:6600c706f15a292027")
    );
    ingest.cleanup().await;
}

#[tokio::test]
async fn bad_signatures_are_refused_and_nothing_is_published() {
    let ingest = spawn_ingest_in_process(AMQP_URL).await;
    let body = fixture("message.json");
    let post = |signature: Option<String>, body: Vec<u8>| {
        let mut request = ingest
            .client
            .post(ingest.url("/facebook/webhook"))
            .body(body);
        if let Some(signature) = signature {
            request = request.header("x-hub-signature-256", signature);
        }
        async move { request.send().await.expect("answer").status() }
    };
    let mut tampered = body.clone();
    let last = tampered.len() - 3;
    tampered[last] = b'9';
    assert_eq!(
        post(Some(sign_sha256(APP_SECRET, &body)), tampered).await,
        401,
        "tampered body"
    );
    assert_eq!(
        post(Some(sign_sha256("wrong-secret", &body)), body.clone()).await,
        401,
        "wrong secret"
    );
    assert_eq!(post(None, body.clone()).await, 401, "no signature");
    assert_eq!(
        post(Some("sha256=nothex".into()), body.clone()).await,
        401,
        "malformed"
    );
    assert!(ingest.drain(JobKind::Conversation).await.is_empty());
    ingest.cleanup().await;
}

#[tokio::test]
async fn escaped_unicode_verifies_on_the_raw_bytes_and_is_kept_as_sent() {
    let ingest = spawn_ingest_in_process(AMQP_URL).await;
    let body = br#"{"object":"page","entry":[{"id":"42","time":1,"messaging":[{"sender":{"id":"7"},"recipient":{"id":"42"},"timestamp":3,"message":{"mid":"m_\u00e4","text":"gr\u00fc\u00dfe \ud83d\ude00"}}]}]}"#;
    assert_eq!(ingest.post_signed(body).await, 200);
    let events = ingest.drain(JobKind::Conversation).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_id, "mid:m_ä");
    assert!(
        events[0]
            .event
            .get()
            .contains(r"gr\u00fc\u00dfe \ud83d\ude00"),
        "{}",
        events[0].event.get()
    );
    ingest.cleanup().await;
}

#[tokio::test]
async fn a_batch_gives_exactly_one_message_per_event() {
    let ingest = spawn_ingest_in_process(AMQP_URL).await;
    let body = br#"{"object":"page","entry":[
      {"id":"100","time":1,"messaging":[
        {"sender":{"id":"u1"},"recipient":{"id":"100"},"timestamp":10,"message":{"mid":"m_1","text":"a"}},
        {"sender":{"id":"100"},"recipient":{"id":"u1"},"timestamp":11,"message":{"mid":"m_2","is_echo":true,"text":"b"}},
        {"sender":{"id":"u1"},"recipient":{"id":"100"},"timestamp":12,"read":{"watermark":11}}]},
      {"id":"200","time":1,
       "standby":[{"sender":{"id":"u2"},"recipient":{"id":"200"},"timestamp":13,"message":{"mid":"m_3","text":"c"}}],
       "changes":[{"field":"name","value":"New name"},{"field":"category","value":"Shop"}]}]}"#;
    assert_eq!(ingest.post_signed(body).await, 200);

    let mut conversation: Vec<_> = ingest
        .drain(JobKind::Conversation)
        .await
        .into_iter()
        .map(|e| (e.page_id, e.kind, e.event_id, e.user_psid, e.standby))
        .collect();
    conversation.sort_by(|a, b| a.2.cmp(&b.2));
    let expected = vec![
        (
            "100".to_string(),
            EventKind::Message,
            "mid:m_1".to_string(),
            Some("u1".to_string()),
            false,
        ),
        (
            "100".to_string(),
            EventKind::Echo,
            "mid:m_2".to_string(),
            Some("u1".to_string()),
            false,
        ),
        (
            "200".to_string(),
            EventKind::Message,
            "mid:m_3".to_string(),
            Some("u2".to_string()),
            true,
        ),
        (
            "100".to_string(),
            EventKind::Read,
            "read:11".to_string(),
            Some("u1".to_string()),
            false,
        ),
    ];
    assert_eq!(conversation, expected);
    let changes = ingest.drain(JobKind::PageChange).await;
    assert_eq!(changes.len(), 2);
    assert!(
        changes
            .iter()
            .all(|e| e.page_id == "200" && e.kind == EventKind::PageChange)
    );
    assert_ne!(changes[0].event_id, changes[1].event_id);
    ingest.cleanup().await;
}

#[tokio::test]
async fn every_fixture_is_accepted() {
    let ingest = spawn_ingest_in_process(AMQP_URL).await;
    let names = fixture_names();
    assert!(names.len() >= 7, "fixtures missing: {names:?}");
    for name in &names {
        assert_eq!(ingest.post_signed(&fixture(name)).await, 200, "{name}");
    }
    let conversation = ingest.drain(JobKind::Conversation).await;
    let changes = ingest.drain(JobKind::PageChange).await;
    assert_eq!(conversation.len() + changes.len(), names.len());
    assert_eq!(changes.len(), 1);
    ingest.cleanup().await;
}

#[tokio::test]
async fn oversized_and_malformed_bodies_are_refused() {
    let ingest = spawn_ingest_in_process(AMQP_URL).await;
    let huge = vec![b' '; 1024 * 1024 + 1];
    assert_eq!(ingest.post_signed(&huge).await, 413);
    assert_eq!(ingest.post_signed(b"not json").await, 400);
    assert_eq!(
        ingest
            .post_signed(br#"{"object":"instagram","entry":[]}"#)
            .await,
        400
    );
    assert!(ingest.drain(JobKind::Conversation).await.is_empty());
    ingest.cleanup().await;
}

/// A signed delivery whose Page id is 200 KB (it used to travel into an AMQP header, and
/// RabbitMQ closed ingest's connection: every delivery in flight then got 503) and one nested
/// 20,000 levels deep (it used to be accepted, then dropped at merge) are answered 400 and
/// publish nothing; the next delivery is accepted as usual.
#[tokio::test]
async fn deliveries_with_ids_that_are_not_ids_or_nested_too_deep_are_refused_at_the_door() {
    let ingest = spawn_ingest_in_process(AMQP_URL).await;
    let huge_id = "1".repeat(200_000);
    let with_huge_id = String::from_utf8(fixture("message.json"))
        .expect("utf-8")
        .replace("510249619162304", &huge_id);
    assert_eq!(ingest.post_signed(with_huge_id.as_bytes()).await, 400);
    let nested = format!("{}1{}", "[".repeat(20_000), "]".repeat(20_000));
    let deep = format!(
        r#"{{"object":"page","entry":[{{"id":"510249619162304","time":1,"messaging":[{{"sender":{{"id":"7"}},"recipient":{{"id":"510249619162304"}},"timestamp":3,"message":{{"mid":"m_deep","attachments":{nested}}}}}]}}]}}"#
    );
    assert_eq!(ingest.post_signed(deep.as_bytes()).await, 400);
    assert_eq!(ingest.post_signed(&fixture("message.json")).await, 200);
    let events = ingest.drain(JobKind::Conversation).await;
    assert_eq!(events.len(), 1, "only the good delivery was published");
    ingest.cleanup().await;
}

#[tokio::test]
async fn broker_outage_gives_503_then_200_without_restart() {
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    let ingest = spawn_ingest_in_process(&proxy.amqp_url()).await;
    let body = fixture("message.json");
    assert_eq!(ingest.post_signed(&body).await, 200);

    proxy.cut();
    let started = std::time::Instant::now();
    let during = ingest.post_signed(&fixture("echo.json")).await;
    assert_eq!(during, 503);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "503 took {:?}",
        started.elapsed()
    );
    let ready = ingest
        .client
        .get(ingest.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 503);

    proxy.restore();
    let mut status = 0;
    for _ in 0..100 {
        status = ingest.post_signed(&fixture("read.json")).await;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status, 200,
        "ingest did not recover after the broker came back"
    );
    let ids: Vec<String> = ingest
        .drain(JobKind::Conversation)
        .await
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert!(ids.contains(&"mid:mid.1468152703527:6600c706f15a292027".to_string()));
    assert!(ids.contains(&"read:1468152706921".to_string()));
    ingest.cleanup().await;
}

#[tokio::test]
async fn a_thousand_concurrent_deliveries_give_a_thousand_messages() {
    let ingest = spawn_ingest_in_process(AMQP_URL).await;
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let body = format!(
            r#"{{"object":"page","entry":[{{"id":"9","time":1,"messaging":[{{"sender":{{"id":"u{}"}},"recipient":{{"id":"9"}},"timestamp":{i},"message":{{"mid":"m_{i}","text":"n"}}}}]}}]}}"#,
            i % 10
        );
        let client = ingest.client.clone();
        let url = ingest.url("/facebook/webhook");
        tasks.push(tokio::spawn(async move {
            post_signed(&client, &url, body.as_bytes()).await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("task"), 200);
    }
    let mut ids: Vec<String> = ingest
        .drain(JobKind::Conversation)
        .await
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1000);
    ingest.cleanup().await;
}

/// `/metrics` is served on the operators' listener (`INGEST_METRICS_ADDR`) and not on the public
/// webhook listener (`INGEST_ADDR`), where it is 404; `/healthz` and `/readyz` answer on both;
/// the operators' listener does not serve the webhook. After one delivery of one message the
/// operators' `/metrics` counts exactly it. The same holds for `fbsync up` (ingest and a worker
/// in one process).
///
/// The real binary, so `/metrics` shows what this test did and nothing else: the in-process
/// tests share one process-wide recorder, a process has its own.
#[tokio::test]
async fn metrics_are_served_apart_from_the_public_webhook_listener() {
    let pipeline = Pipeline::new(DbKind::Sqlite, StoreKind::Local).await;
    let client = reqwest::Client::new();
    let (mut ingest, urls) = pipeline.spawn_ingest().await;
    let metrics = listeners_apart(&client, &urls).await;
    assert!(
        metrics.contains("fbsync_webhook_deliveries_total{outcome=\"accepted\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fbsync_events_published_total{kind=\"message\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fbsync_publish_confirm_seconds_bucket"),
        "{metrics}"
    );
    // This process saw one delivery of one message: the counts are exact.
    for series in [
        "fbsync_webhook_deliveries_total{outcome=\"accepted\"}",
        "fbsync_events_published_total{kind=\"message\"}",
        "fbsync_publish_confirm_seconds_count",
    ] {
        assert_eq!(
            sample(&metrics, series),
            Some(1.0),
            "{series} in:\n{metrics}"
        );
    }
    ingest.stop().await;

    // `fbsync up` serves its metrics on the operators' listener too.
    let (mut up, urls) = pipeline.up().await;
    let metrics = listeners_apart(&client, &urls).await;
    assert_eq!(
        sample(
            &metrics,
            "fbsync_webhook_deliveries_total{outcome=\"accepted\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    up.stop().await;
    pipeline.cleanup().await;
}

/// Posts one signed delivery to a running ingest and checks its two listeners: `/healthz` and
/// `/readyz` answer 200 on both, `/metrics` is 404 on the public one and the webhook 404 on the
/// operators' one. Returns the operators' `/metrics` page.
async fn listeners_apart(client: &reqwest::Client, urls: &IngestUrls) -> String {
    assert_eq!(
        post_signed(client, &urls.webhook, &fixture("message.json")).await,
        200
    );
    let status = |request: reqwest::RequestBuilder| async move {
        let url = request
            .try_clone()
            .and_then(|r| r.build().ok())
            .map(|r| r.url().to_string())
            .unwrap_or_default();
        request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"))
            .status()
            .as_u16()
    };
    for base in [&urls.public, &urls.operator] {
        for path in ["/healthz", "/readyz"] {
            assert_eq!(
                status(client.get(format!("{base}{path}"))).await,
                200,
                "{base}{path}"
            );
        }
    }
    assert_eq!(
        status(client.get(format!("{}/metrics", urls.public))).await,
        404,
        "/metrics on the public listener"
    );
    let operator_webhook = format!("{}/facebook/webhook", urls.operator);
    assert_eq!(
        post_signed(client, &operator_webhook, &fixture("message.json")).await,
        404,
        "the webhook on the operators' listener"
    );
    scrape(client, &format!("{}/metrics", urls.operator)).await
}

/// `fbsync ingest` on its own (no pipeline), on ports of its choosing, with `extra` variables.
fn spawn_lone_ingest(prefix: &str, extra: &[(&str, &str)]) -> FbsyncProcess {
    let mut env = vec![
        ("FACEBOOK_APP_SECRET", APP_SECRET),
        ("FACEBOOK_VERIFY_TOKEN", VERIFY_TOKEN),
        ("QUEUE_PREFIX", prefix),
        ("INGEST_ADDR", "127.0.0.1:0"),
        ("INGEST_METRICS_ADDR", "127.0.0.1:0"),
    ];
    env.extend_from_slice(extra);
    FbsyncProcess::spawn(&["ingest"], &env)
}

/// SIGTERM while ingest still waits for an unreachable broker (its grace period before it
/// listens) stops it there: exit 0 at once, and it never starts listening.
#[tokio::test]
async fn sigterm_before_the_broker_is_reached_stops_ingest_before_it_listens() {
    let prefix = unique_prefix();
    let mut process = spawn_lone_ingest(
        &prefix,
        &[
            ("LOG_FORMAT", "json"),
            ("AMQP_URL", "amqp://guest:guest@127.0.0.1:9/%2f"),
        ],
    );
    process
        .wait_for_log("broker unreachable; retrying", Duration::from_secs(20))
        .await;
    let status = process
        .terminate_and_wait(Duration::from_secs(5))
        .await
        .expect("ingest exits within 5 s of SIGTERM (its broker grace period is 10 s)");
    assert!(status.success(), "{status}");
    let lines = process.take_lines();
    assert!(
        !lines.iter().any(|line| line.contains("ingest listening")),
        "it started listening after SIGTERM: {lines:?}"
    );
}

#[tokio::test]
async fn the_binary_serves_logs_json_and_exits_cleanly_on_sigterm() {
    let prefix = unique_prefix();
    let mut process = spawn_lone_ingest(&prefix, &[("LOG_FORMAT", "json")]);
    let listening = process
        .wait_for_log("ingest listening", Duration::from_secs(20))
        .await;
    let addr = listening["fields"]["addr"]
        .as_str()
        .expect("addr")
        .to_string();
    let client = reqwest::Client::new();
    let body = fixture("message.json");
    let mut status = 0;
    for _ in 0..50 {
        status = post_signed(&client, &format!("http://{addr}/facebook/webhook"), &body).await;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200);
    process.stop_within(Duration::from_secs(10)).await;
    delete_topology(&prefix).await;
}

#[tokio::test]
async fn missing_configuration_is_one_clear_line_per_problem() {
    let output = fbsync_command(&["ingest"], &[("INGEST_ADDR", "nowhere:x")])
        .output()
        .await
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("INGEST_ADDR=\"nowhere:x\" is not a valid value"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    let output = fbsync_command(&["ingest"], &[])
        .output()
        .await
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(lines[0].contains("FACEBOOK_APP_SECRET is not set"));
    assert!(lines[1].contains("FACEBOOK_VERIFY_TOKEN is not set"));
}

/// Mistakes of both stages (values that do not parse, and what the roles require) in one run,
/// no line twice, where three rounds of fixing and restarting were needed before.
#[tokio::test]
async fn every_configuration_mistake_is_named_in_one_run() {
    let output = fbsync_command(
        &["up"],
        &[
            ("WORKER_PREFETCH", "abc"),
            ("LOG_FORMAT", "xml"),
            ("SHOPIFY_ADMIN_URL", "https://admin.example/"),
            ("FACEBOOK_VERIFY_TOKEN", "v"),
            ("TOKEN_ENCRYPTION_KEY", "c2hvcnQ="),
            ("FACEBOOK_APP_ID", "1"),
            ("FACEBOOK_REDIRECT_URI", "notaurl"),
            ("SHOPIFY_API_KEY", "k"),
            ("SHOPIFY_API_SECRET", "s"),
            (
                "SHOPIFY_REDIRECT_URI",
                "http://127.0.0.1:1/shopify/callback",
            ),
            ("STATE_TOKEN_SECRET", "short"),
        ],
    )
    .output()
    .await
    .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for mistake in [
        "WORKER_PREFETCH=\"abc\" is not a valid value",
        "LOG_FORMAT must be text or json",
        "SHOPIFY_ADMIN_URL must contain {shop}",
        "FACEBOOK_APP_SECRET is not set",
        "TOKEN_ENCRYPTION_KEY is malformed",
        "FACEBOOK_REDIRECT_URI",
        "STATE_TOKEN_SECRET",
    ] {
        assert!(stderr.contains(mistake), "{mistake:?} missing:\n{stderr}");
    }
    let lines: Vec<&str> = stderr.lines().collect();
    let mut unique = lines.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), lines.len(), "a line twice:\n{stderr}");
}

/// Colour codes are for a terminal: logs written to a pipe (a file, a container's log) are
/// plain text.
#[tokio::test]
async fn text_logs_into_a_pipe_carry_no_colour_codes() {
    let prefix = unique_prefix();
    let mut process = spawn_lone_ingest(&prefix, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines = Vec::new();
    while !lines
        .iter()
        .any(|line: &String| line.contains("ingest listening"))
    {
        assert!(Instant::now() < deadline, "no listening line: {lines:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        lines.extend(process.take_lines());
    }
    process.stop_within(Duration::from_secs(10)).await;
    lines.extend(process.take_lines());
    assert!(
        lines.iter().all(|line| !line.contains('\u{1b}')),
        "colour codes in a pipe: {lines:?}"
    );
    delete_topology(&prefix).await;
}

/// A window of refused deliveries (the broker away) lasting INGEST_RECONCILE_AFTER_MS is
/// reconciled when a delivery is accepted again: one job asks the workers to poll every active
/// Page back to the window's start. A shorter one asks nothing.
#[tokio::test]
async fn a_long_window_of_refused_deliveries_is_reconciled_when_it_ends_and_a_short_one_is_not() {
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    let ingest =
        spawn_ingest_in_process_with(&proxy.amqp_url(), &[("INGEST_RECONCILE_AFTER_MS", "1500")])
            .await;
    // Short: refused, then accepted within the threshold.
    proxy.cut();
    assert_eq!(ingest.post_signed(&fixture("echo.json")).await, 503);
    proxy.restore();
    accepted_again(&ingest).await;
    assert!(
        ingest.drain_jobs(JobKind::Onboard).await.is_empty(),
        "a short window asks nothing"
    );

    // Long: refused for longer than the threshold.
    proxy.cut();
    let first_refusal = fbsync_shared::now_ms();
    assert_eq!(ingest.post_signed(&fixture("echo.json")).await, 503);
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    assert_eq!(ingest.post_signed(&fixture("echo.json")).await, 503);
    proxy.restore();
    accepted_again(&ingest).await;
    let jobs = ingest.drain_jobs(JobKind::Onboard).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let fbsync_shared::jobs::Job::Reconcile(window) = &jobs[0] else {
        panic!("not a reconciliation: {jobs:?}");
    };
    assert!(
        window.since_ms <= first_refusal,
        "{window:?} starts before the first refusal"
    );
    assert!(window.until_ms >= first_refusal + 1_800, "{window:?}");
    ingest.cleanup().await;
}

/// Posts a delivery until ingest accepts it again (the broker is back).
async fn accepted_again(ingest: &InProcessIngest) {
    let body = fixture("read.json");
    for _ in 0..100 {
        if ingest.post_signed(&body).await == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("ingest did not recover after the broker came back");
}
