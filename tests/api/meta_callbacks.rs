//! Meta's deauthorize and data-deletion callbacks act on the one person they name, through the
//! real binary: with two people connecting Pages for one shop (and both connecting one Page),
//! a deauthorization removes only that person's Pages (a Page both connected goes on with the
//! other's token), a data deletion removes that person's Pages and their folders and says so
//! on its status page, and the shop's whole folder goes only when nobody is left connected to
//! it. A signed_request issued long ago is refused; a replayed one does nothing again.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tokio::time::Instant;

use crate::common::fake_graph::LOGIN_APP_SECRET;
use crate::common::pipeline::{DbKind, StoreKind};
use crate::onboarding::{
    ONBOARDING_LIMIT, Owner, OwnerEnv, page_ids, signed_request, signed_request_issued,
};

const PAGE_A: &str = "910000000000001";
const PAGE_B: &str = "910000000000002";
const SHARED: &str = "910000000000003";

/// The Page ids `fbsync pages list` shows.
async fn listed(env: &OwnerEnv) -> Vec<String> {
    env.pages_list()
        .await
        .iter()
        .filter_map(|page| page["page_id"].as_str().map(String::from))
        .collect()
}

/// The Page folders that hold objects under the user's folder.
async fn folders(env: &OwnerEnv, user: &str) -> Vec<String> {
    let mut pages: Vec<String> = env
        .keys_of(user)
        .await
        .iter()
        .filter_map(|key| key.split('/').nth(3).map(String::from))
        .collect();
    pages.dedup();
    pages
}

/// POSTs Meta's callback at `path` for `signed`: the answer's JSON (200 asserted).
async fn callback(meta: &mut Owner, path: &str, signed: &str) -> Value {
    let answer = meta.post_form(path, &[("signed_request", signed)]).await;
    assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.body);
    serde_json::from_str(&answer.body).expect("json")
}

/// The status page of a data deletion, as JSON, once it is complete.
pub(crate) async fn completed(meta: &mut Owner, confirmation: &Value) -> Value {
    let url = confirmation["url"].as_str().expect("url").to_string();
    let deadline = Instant::now() + ONBOARDING_LIMIT;
    loop {
        let (status, value) = meta.get_json(&url).await;
        assert_eq!(status, StatusCode::OK, "{value}");
        if value["status"] == "complete" {
            return value;
        }
        assert!(Instant::now() < deadline, "{value}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn deauthorization_and_data_deletion_act_on_the_one_person_they_name_with_two_people_on_one_shop()
 {
    let env = OwnerEnv::start(DbKind::Sqlite, StoreKind::Local).await;
    env.graph.set_person("1001", &[PAGE_A, SHARED]);
    env.graph.set_person("1002", &[PAGE_B, SHARED]);
    let mut owner = env.owner();
    let mut meta = env.owner();
    owner.install_shop("team.myshopify.com").await;
    owner.connect_facebook(&env, "1001").await;
    owner.wait_onboarded(&[PAGE_A, SHARED]).await;
    owner.connect_facebook(&env, "1002").await;
    let status = owner.wait_onboarded(&[PAGE_A, PAGE_B, SHARED]).await;
    let user = status["user_uuid"].as_str().expect("uuid").to_string();
    assert_eq!(folders(&env, &user).await, [PAGE_A, PAGE_B, SHARED]);

    // 1002 removes the app: only what 1002 alone connected stops; the shared Page goes on
    // with 1001's token, and 1001's own Page is untouched.
    let signed = signed_request(LOGIN_APP_SECRET, "1002");
    assert_eq!(
        callback(&mut meta, "/facebook/deauthorize", &signed).await["success"],
        true
    );
    assert_eq!(listed(&env).await, [PAGE_A, SHARED]);
    let shared = env
        .pages_list()
        .await
        .into_iter()
        .find(|page| page["page_id"] == SHARED)
        .expect("the shared Page");
    assert_eq!(shared["status"], "active", "{shared}");

    // 1002 connects again; then 1001 asks for their data to be deleted: their own Page and its
    // folder go; the shared Page stays with 1002's token, its folder too.
    owner.connect_facebook(&env, "1002").await;
    owner.wait_onboarded(&[PAGE_A, PAGE_B, SHARED]).await;
    let signed = signed_request(LOGIN_APP_SECRET, "1001");
    let confirmation = callback(&mut meta, "/facebook/data-deletion", &signed).await;
    let done = completed(&mut meta, &confirmation).await;
    assert_eq!(done["removed_pages"], serde_json::json!([PAGE_A]), "{done}");
    assert_eq!(done["kept_pages"], serde_json::json!([SHARED]), "{done}");
    assert_eq!(done["shops_emptied"], 0, "{done}");
    assert_eq!(listed(&env).await, [PAGE_B, SHARED]);
    assert_eq!(folders(&env, &user).await, [PAGE_B, SHARED]);
    let page = meta.get(confirmation["url"].as_str().expect("url")).await;
    assert!(page.body.contains(PAGE_A), "{}", page.body);
    assert!(
        page.body.contains("another person of the same shop"),
        "{}",
        page.body
    );
    assert_eq!(
        page_ids(&owner.status().await),
        [PAGE_B, SHARED],
        "1002's session goes on"
    );

    // 1002 asks too: nobody is left, so the shop's whole folder, token and sessions go.
    let signed = signed_request(LOGIN_APP_SECRET, "1002");
    let confirmation = callback(&mut meta, "/facebook/data-deletion", &signed).await;
    let done = completed(&mut meta, &confirmation).await;
    assert_eq!(
        done["removed_pages"],
        serde_json::json!([PAGE_B, SHARED]),
        "{done}"
    );
    assert_eq!(done["shops_emptied"], 1, "{done}");
    assert_eq!(done["sessions_removed"], 1, "{done}");
    assert!(listed(&env).await.is_empty());
    assert!(env.keys_of(&user).await.is_empty());
    assert_eq!(owner.get_json("/connect").await.0, StatusCode::UNAUTHORIZED);
    env.finish(
        &["1001", "1002"],
        &[PAGE_A, PAGE_B, SHARED],
        &["team.myshopify.com"],
    )
    .await;
}

#[tokio::test]
async fn a_signed_request_issued_long_ago_is_refused_and_a_replayed_one_changes_nothing() {
    let env = OwnerEnv::start(DbKind::Sqlite, StoreKind::Local).await;
    env.graph.set_person("2001", &[PAGE_A]);
    let mut owner = env.owner();
    let mut meta = env.owner();
    owner.install_shop("replays.myshopify.com").await;
    owner.connect_facebook(&env, "2001").await;
    owner.wait_onboarded(&[PAGE_A]).await;

    let day_ago = signed_request_issued(
        LOGIN_APP_SECRET,
        "2001",
        fbsync_shared::now_ms() / 1000 - 86_400,
    );
    for path in ["/facebook/deauthorize", "/facebook/data-deletion"] {
        let answer = meta.post_form(path, &[("signed_request", &day_ago)]).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{path}: {}",
            answer.body
        );
        assert!(
            answer.body.contains("more than an hour ago"),
            "{}",
            answer.body
        );
    }
    assert_eq!(listed(&env).await, [PAGE_A], "nothing changed");

    // A deauthorization, the person reconnects, the same request again: no second effect.
    let signed = signed_request(LOGIN_APP_SECRET, "2001");
    callback(&mut meta, "/facebook/deauthorize", &signed).await;
    assert!(listed(&env).await.is_empty());
    owner.connect_facebook(&env, "2001").await;
    owner.wait_onboarded(&[PAGE_A]).await;
    assert_eq!(
        callback(&mut meta, "/facebook/deauthorize", &signed).await["success"],
        true
    );
    assert_eq!(listed(&env).await, [PAGE_A], "the replay removed nothing");

    // A data deletion, the person reconnects, the same request again: the first code, no
    // second deletion.
    let signed = signed_request(LOGIN_APP_SECRET, "2001");
    let first = callback(&mut meta, "/facebook/data-deletion", &signed).await;
    completed(&mut meta, &first).await;
    assert!(listed(&env).await.is_empty());
    owner.install_shop("replays.myshopify.com").await;
    owner.connect_facebook(&env, "2001").await;
    owner.wait_onboarded(&[PAGE_A]).await;
    let again = callback(&mut meta, "/facebook/data-deletion", &signed).await;
    assert_eq!(again["confirmation_code"], first["confirmation_code"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(listed(&env).await, [PAGE_A], "the replay deleted nothing");
    assert_eq!(
        owner.status().await["pages"].as_array().map(Vec::len),
        Some(1)
    );
    env.finish(&["2001"], &[PAGE_A], &["replays.myshopify.com"])
        .await;
}

#[tokio::test]
async fn a_data_deletion_after_a_deauthorization_still_deletes_what_the_person_connected() {
    let env = OwnerEnv::start(DbKind::Sqlite, StoreKind::Local).await;
    env.graph.set_person("4001", &[PAGE_A]);
    let mut owner = env.owner();
    let mut meta = env.owner();
    owner.install_shop("leaving.myshopify.com").await;
    owner.connect_facebook(&env, "4001").await;
    let status = owner.wait_onboarded(&[PAGE_A]).await;
    let user = status["user_uuid"].as_str().expect("uuid").to_string();
    assert_eq!(folders(&env, &user).await, [PAGE_A]);

    // Meta's order when a person removes the app: deauthorize first, the deletion later.
    let signed = signed_request(LOGIN_APP_SECRET, "4001");
    callback(&mut meta, "/facebook/deauthorize", &signed).await;
    assert!(listed(&env).await.is_empty());
    assert_eq!(
        folders(&env, &user).await,
        [PAGE_A],
        "deauthorizing deletes no data"
    );
    let confirmation = callback(&mut meta, "/facebook/data-deletion", &signed).await;
    let done = completed(&mut meta, &confirmation).await;
    assert_eq!(done["removed_pages"], serde_json::json!([PAGE_A]), "{done}");
    assert_eq!(done["shops_emptied"], 1, "{done}");
    assert!(
        env.keys_of(&user).await.is_empty(),
        "the person's data is gone"
    );
    env.finish(&["4001"], &[PAGE_A], &["leaving.myshopify.com"])
        .await;
}
