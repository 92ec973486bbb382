//! A worker frozen (SIGSTOP) in the middle of a flush, past its lease, while another worker
//! takes the conversation over and writes newer events; then the frozen one resumes (SIGCONT).
//! Its claim is fenced: it sends no PUT and deletes no staged row, so every event is stored
//! once, whether the store honours conditional writes or not, and the object never gets more
//! PUTs than Spaces allows in its window.

use std::time::Duration;

use tokio::time::Instant;

use crate::common::broker::{AMQP_URL, TcpProxy};
use crate::common::pipeline::{DbKind, PAGE_ID, Pipeline, StoreKind, conversation_key};
use crate::common::process::log_summary;
use crate::common::spaces_limits::{SpacesLimitLayer, SpacesLimits, s3_endpoint};
use crate::common::tally::mids;
use crate::common::webhook::{message_delivery, post_signed, webhook_client};
use crate::shared_services::serial;

/// PUTs one object may take per window, as on Spaces; the window is shortened for the test.
const OBJECT_PUTS: usize = 5;
const OBJECT_WINDOW: Duration = Duration::from_secs(30);
/// The lease a frozen worker outlives.
const LEASE_MS: u64 = 2_000;
/// How long the store takes to answer the frozen worker's GET.
const SLOW_ANSWER: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stalled_past_its_lease_writes_nothing_when_it_resumes_with_conditional_writes() {
    stalled_worker_writes_nothing(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stalled_past_its_lease_writes_nothing_when_it_resumes_without_conditional_writes()
{
    stalled_worker_writes_nothing(false).await;
}

async fn stalled_worker_writes_nothing(conditional_writes: bool) {
    let _serial = serial().await;
    let layer = SpacesLimitLayer::start(
        &s3_endpoint(),
        SpacesLimits {
            object_puts: OBJECT_PUTS,
            object_window: OBJECT_WINDOW,
            ..SpacesLimits::default()
        },
    )
    .await;
    let mut pipeline = Pipeline::new(
        DbKind::Postgres,
        StoreKind::S3 {
            endpoint: Some(layer.endpoint()),
        },
    )
    .await;
    pipeline.set("SPACES_OBJECT_PUTS_PER_5MIN", &OBJECT_PUTS.to_string());
    pipeline.set(
        "SPACES_OBJECT_PUT_WINDOW_SECS",
        &OBJECT_WINDOW.as_secs().to_string(),
    );
    let mode = if conditional_writes { "auto" } else { "off" };
    pipeline.set("SPACES_CONDITIONAL_WRITES", mode);
    pipeline.set("WORKER_LEASE_MS", &LEASE_MS.to_string());
    pipeline.set("WORKER_FLUSH_INTERVAL_MS", "100");
    pipeline.register_page(PAGE_ID).await;
    let (mut ingest, urls) = pipeline.spawn_ingest().await;
    let client = webhook_client();
    let user = "stalled";
    let object = conversation_key(PAGE_ID, user);
    let post = |first: usize, count: usize| {
        let (client, url) = (client.clone(), urls.webhook.clone());
        async move {
            for n in first..first + count {
                let body =
                    message_delivery(PAGE_ID, user, &format!("m_stall_{n}"), n as i64, false);
                assert_eq!(post_signed(&client, &url, &body).await, 200);
            }
        }
    };

    // The first worker reaches the broker through a proxy of its own, so that freezing it can
    // also cut its connection: the broker then hands what it held to the other worker, as it
    // would after missed heartbeats, without waiting for them.
    let broker_addr = AMQP_URL
        .trim_start_matches("amqp://guest:guest@")
        .trim_end_matches("/%2f")
        .parse()
        .expect("broker address");
    let frozen_path = TcpProxy::start(broker_addr).await;
    pipeline.set("AMQP_URL", &frozen_path.amqp_url());
    let mut frozen = pipeline.spawn_worker().await;
    pipeline.set("AMQP_URL", AMQP_URL);

    // It claims the conversation and asks for the object; the store is slow to answer, and the
    // worker is frozen while it waits.
    layer.set_delay(SLOW_ANSWER);
    post(0, 10).await;
    let asked = Instant::now() + Duration::from_secs(20);
    while layer.gets_for(&object) == 0 {
        assert!(
            Instant::now() < asked,
            "the first worker never read the object"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    frozen.pause();
    frozen_path.cut();
    // Past its lease: the conversation is anybody's again.
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 500)).await;
    layer.set_delay(Duration::ZERO);

    // A second worker takes it over, stores the first events, then newer ones.
    let mut successor = pipeline.spawn_worker().await;
    pipeline
        .wait_for_conversation(PAGE_ID, user, 10, Duration::from_secs(60))
        .await;
    post(10, 10).await;
    let before_resume = pipeline
        .wait_for_conversation(PAGE_ID, user, 20, Duration::from_secs(60))
        .await;
    assert_eq!(before_resume.len(), 20);
    let puts_before_resume = layer.puts_for(&object);

    // The frozen worker wakes up with the old object in hand and its old claim.
    frozen.resume();
    // The resumed worker gets the slow answer within a second and finishes its flush attempt;
    // a stale PUT, had it been sent, would have landed by then.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let settled = pipeline
        .wait_for_conversation(PAGE_ID, user, 20, Duration::from_secs(30))
        .await;
    let stored = mids(&settled);
    let mut unique = stored.clone();
    unique.sort();
    unique.dedup();
    let frozen_lines = frozen.take_lines();
    let lines = [frozen_lines.clone(), successor.take_lines()].concat();
    println!(
        "conditional writes {conditional_writes}: {} events stored, {} PUTs before the resume, {} after",
        stored.len(),
        puts_before_resume,
        layer.puts_for(&object) - puts_before_resume,
    );
    assert_eq!(
        stored.len(),
        20,
        "every event stored, none lost to the stale writer:\n{}",
        log_summary(&lines)
    );
    assert_eq!(unique.len(), 20, "no event stored twice");
    assert_eq!(
        layer.puts_for(&object),
        puts_before_resume,
        "the resumed worker sent no PUT"
    );
    assert!(
        layer.puts_for(&object) <= OBJECT_PUTS as u64,
        "at most {OBJECT_PUTS} PUTs in the window"
    );
    assert_eq!(
        layer.violations().len(),
        0,
        "no request over a limit: {:?}",
        layer.violations()
    );
    assert_eq!(pipeline.staged_events(&[PAGE_ID]).await, 0);
    assert!(
        frozen_lines.iter().any(|line| line.contains("claim lost")),
        "the resumed worker found its claim gone:\n{}",
        log_summary(&frozen_lines)
    );

    frozen.stop().await;
    successor.stop().await;
    ingest.stop().await;
    pipeline.cleanup().await;
}
