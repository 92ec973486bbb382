//! The owners' jobs go through the outbox, through the real binary: with the broker cut off
//! (a proxy of this test's own in front of the shared broker, for ingest and worker alike) just
//! before the Facebook callback, the callback still answers at once, a Page onboarded earlier
//! keeps its steps, and once the broker is back every Page is onboarded without another click;
//! a data deletion during an outage is answered (not 503) and carried out once it ends.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tokio::time::Instant;

use crate::common::broker::TcpProxy;
use crate::common::fake_dialog::DialogAnswer;
use crate::common::fake_graph::LOGIN_APP_SECRET;
use crate::common::pipeline::{DbKind, StoreKind};
use crate::onboarding::{ONBOARDING_LIMIT, OwnerEnv, signed_request};

const EARLIER: &str = "920000000000001";
const NEW: &str = "920000000000002";

/// The onboarding steps `/connect` shows for `page`.
fn steps(status: &Value, page: &str) -> Value {
    status["pages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["page_id"] == page)
        .map(|p| p["onboarding"].clone())
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn an_owner_who_connects_while_the_broker_is_away_ends_with_every_page_onboarded() {
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    let env = OwnerEnv::start_with(
        DbKind::Sqlite,
        StoreKind::Local,
        &[("AMQP_URL", proxy.amqp_url())],
    )
    .await;
    env.graph.set_person("3001", &[EARLIER]);
    let mut owner = env.owner();
    owner.install_shop("blip.myshopify.com").await;
    owner.connect_facebook(&env, "3001").await;
    let before = steps(&owner.wait_onboarded(&[EARLIER]).await, EARLIER);

    // The person now has a second Page; the broker goes away just before the callback.
    env.graph.set_person("3001", &[EARLIER, NEW]);
    env.dialog
        .answer(DialogAnswer::Approve(env.graph.login_code("3001")));
    let login = owner.get("/facebook/login").await;
    let callback = owner.get(&login.location()).await.location();
    proxy.cut();
    let answer = owner.get(&callback).await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.body);
    let status = owner.status().await;
    assert_eq!(
        steps(&status, EARLIER),
        before,
        "the earlier Page keeps its steps"
    );
    assert_eq!(steps(&status, NEW)["subscribe"], "queued", "{status}");
    assert!(!status.to_string().contains("failed"), "{status}");

    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.restore();
    owner.wait_onboarded(&[EARLIER, NEW]).await;
    assert!(
        !env.graph.subscribed_fields(NEW).is_empty(),
        "the new Page's webhooks are subscribed"
    );

    // A data deletion while the broker is away: answered at once, carried out afterwards.
    proxy.cut();
    let mut meta = env.owner();
    let answer = meta
        .post_form(
            "/facebook/data-deletion",
            &[("signed_request", &signed_request(LOGIN_APP_SECRET, "3001"))],
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let confirmation: Value = serde_json::from_str(&answer.body).expect("json");
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.restore();
    let done = crate::meta_callbacks::completed(&mut meta, &confirmation).await;
    assert!(done["objects_deleted"].as_i64() > Some(0), "{done}");
    env.finish(&["3001"], &[EARLIER, NEW], &["blip.myshopify.com"])
        .await;
}

/// Waits until every one of `pages` has a finished poll and none in progress.
async fn wait_polled(owner: &mut crate::onboarding::Owner, pages: &[&str]) {
    let deadline = Instant::now() + ONBOARDING_LIMIT;
    loop {
        let status = owner.status().await;
        let done = pages.iter().all(|page| {
            status["pages"].as_array().into_iter().flatten().any(|p| {
                p["page_id"] == *page && !p["last_poll"].is_null() && p["poll_in_progress"] == false
            })
        });
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "not polled: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_reconnect_reads_the_history_of_the_new_page_only() {
    let env = OwnerEnv::start(DbKind::Sqlite, StoreKind::Local).await;
    let (first, second, added) = ("930000000000001", "930000000000002", "930000000000003");
    // One conversation and one message per page of results: a backfill makes many reads.
    env.graph.set_paging(1, 1);
    for page in [first, second, added] {
        for n in 0..3 {
            env.graph
                .add_conversation(page, &format!("psid-{page}-{n}"), 3, 1_700_000_000_000 + n);
        }
    }
    env.graph.set_person("3101", &[first, second]);
    let mut owner = env.owner();
    owner.install_shop("again.myshopify.com").await;
    owner.connect_facebook(&env, "3101").await;
    owner.wait_onboarded(&[first, second]).await;
    wait_polled(&mut owner, &[first, second]).await;
    let backfill_reads = env.graph.history_reads(first);
    assert!(
        backfill_reads >= 6,
        "a backfill reads it all: {backfill_reads}"
    );

    env.graph.set_person("3101", &[first, second, added]);
    let before = [first, second].map(|page| env.graph.history_reads(page));
    owner.connect_facebook(&env, "3101").await;
    owner.wait_onboarded(&[first, second, added]).await;
    wait_polled(&mut owner, &[first, second, added]).await;
    let status = owner.status().await;
    for (page, before) in [first, second].into_iter().zip(before) {
        let reads = env.graph.history_reads(page) - before;
        assert!(
            reads <= 1,
            "{page} was read again ({reads} history reads, {backfill_reads} for its backfill)"
        );
        assert_eq!(
            steps(&status, page)["backfill"],
            crate::onboarding::HISTORY_KEPT,
            "{status}"
        );
    }
    assert!(
        env.graph.history_reads(added) >= 6,
        "the new Page's history is read: {}",
        env.graph.history_reads(added)
    );
    env.finish(&["3101"], &[first, second, added], &["again.myshopify.com"])
        .await;
}
