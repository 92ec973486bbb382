//! The scheduler's subscription health check, through the real binary (`fbsync up`, with
//! SUBSCRIPTION_CHECK_INTERVAL=2s) and the fake Graph API: a healthy subscription is checked and
//! left alone (no POST); a subscription Facebook dropped, or one lacking a field, is subscribed
//! again within an interval with the whole field list, shown on `/connect` and in `pages list`,
//! and followed by a poll of the gap; a refused token flags the Page `needs_reauth`; two
//! schedulers check each Page once per interval.

use std::time::Duration;

use tokio::time::Instant;

use crate::common::fake_graph::Failure;
use crate::common::pipeline::{DbKind, StoreKind};
use crate::onboarding::{ONBOARDING_LIMIT, Owner, OwnerEnv};

const PAGE: &str = "940000000000001";
const INTERVAL: &str = "2s";

/// The subscribed_apps requests of `method` the fake has seen for the Page.
fn subscription_requests(env: &OwnerEnv, method: &str) -> usize {
    env.graph
        .login_requests()
        .iter()
        .filter(|(m, path, _)| m == method && path.ends_with(&format!("{PAGE}/subscribed_apps")))
        .count()
}

/// Waits until `done` holds, for at most `limit`.
async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A pipeline checking subscriptions every [`INTERVAL`], with [`PAGE`] connected by `person`
/// through `shop` and onboarded.
async fn onboarded(person: &str, shop: &str) -> (OwnerEnv, Owner) {
    let env = OwnerEnv::start_with(
        DbKind::Sqlite,
        StoreKind::Local,
        &[("SUBSCRIPTION_CHECK_INTERVAL", INTERVAL.to_string())],
    )
    .await;
    env.graph.set_person(person, &[PAGE]);
    let mut owner = env.owner();
    owner.install_shop(shop).await;
    owner.connect_facebook(&env, person).await;
    owner.wait_onboarded(&[PAGE]).await;
    (env, owner)
}

#[tokio::test]
async fn a_lost_subscription_is_restored_within_an_interval_and_a_healthy_one_is_left_alone() {
    let (env, mut owner) = onboarded("9401", "healthy.myshopify.com").await;
    let full = env.graph.subscribed_fields(PAGE);
    assert!(full.len() >= 17, "{full:?}");

    // Healthy: checked every interval, never subscribed again.
    let (gets, posts) = (
        subscription_requests(&env, "GET"),
        subscription_requests(&env, "POST"),
    );
    wait_until("two checks", Duration::from_secs(15), || {
        subscription_requests(&env, "GET") >= gets + 2
    })
    .await;
    assert_eq!(
        subscription_requests(&env, "POST"),
        posts,
        "a healthy subscription is left alone"
    );
    let status = owner.status().await;
    assert!(
        !status["pages"][0]["subscription_checked"].is_null(),
        "{status}"
    );
    assert!(
        status["pages"][0]["subscription_restored"].is_null(),
        "{status}"
    );

    // Facebook drops the subscription: within an interval it is back, whole, and the gap polled.
    let polls_before = env.graph.history_reads(PAGE);
    env.graph.set_subscription(PAGE, &[]);
    wait_until("subscribed again", Duration::from_secs(15), || {
        env.graph.subscribed_fields(PAGE) == full
    })
    .await;
    wait_until("the gap polled", ONBOARDING_LIMIT, || {
        env.graph.history_reads(PAGE) > polls_before
    })
    .await;
    let status = owner.status().await;
    assert!(
        !status["pages"][0]["subscription_restored"].is_null(),
        "{status}"
    );
    let html = owner.get("/connect").await;
    assert!(
        html.body.contains("Receiving messages again"),
        "{}",
        html.body
    );
    let listed = env.pages_list().await;
    assert!(
        listed[0]["subscription_restored_at_ms"].is_i64(),
        "{listed:?}"
    );

    // A field missing (a Page onboarded with an older list) is added back the same way.
    env.graph
        .set_subscription(PAGE, &["messages", "message_echoes"]);
    wait_until("every field again", Duration::from_secs(15), || {
        env.graph.subscribed_fields(PAGE) == full
    })
    .await;

    // A refused token: the Page needs re-authorisation, and is not checked again.
    env.graph.push_failure(PAGE, Failure::TokenExpired);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let listed = env.pages_list().await;
        if listed[0]["status"] == "needs_reauth" {
            break;
        }
        assert!(Instant::now() < deadline, "{listed:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gets = subscription_requests(&env, "GET");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        subscription_requests(&env, "GET"),
        gets,
        "a Page that needs re-authorisation is not checked"
    );
    env.finish(&["9401"], &[PAGE], &["healthy.myshopify.com"])
        .await;
}

#[tokio::test]
async fn two_schedulers_check_each_page_once_per_interval() {
    let (env, _owner) = onboarded("9402", "twice.myshopify.com").await;
    let mut second = env.pipeline.spawn(&["scheduler"]);
    // Let the second scheduler connect, then count over ten intervals.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let gets = subscription_requests(&env, "GET");
    tokio::time::sleep(Duration::from_secs(20)).await;
    let checks = subscription_requests(&env, "GET") - gets;
    assert!(
        (8..=11).contains(&checks),
        "{checks} checks in ten intervals of {INTERVAL} with two schedulers"
    );
    second.stop().await;
    env.finish(&["9402"], &[PAGE], &["twice.myshopify.com"])
        .await;
}
