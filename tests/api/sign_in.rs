//! The owners' sign-in against the attacks of the security review, through the real binary:
//! a callback URL of someone else's sign-in opened in a victim's browser (login CSRF) is
//! refused and leaves the victim's session as it was, and the refusal burns nothing for the
//! flow's real owner; a browser signed in to one shop is asked before it switches to another;
//! signing out ends the session; Shopify's `hmac` is checked over the raw query, so a
//! re-split query does not verify; Facebook's free-text error description is never shown.
//! (The same CSRF link in a real browser: `browser.rs`.)

use reqwest::StatusCode;

use crate::common::fake_dialog::DialogAnswer;
use crate::common::pipeline::{DbKind, StoreKind};
use crate::onboarding::{Answer, Owner, OwnerEnv, user_of};

/// The callback URL Shopify hands `owner`'s browser for `shop`, not yet opened.
async fn shopify_callback_url(owner: &mut Owner, shop: &str) -> String {
    let login = owner.get(&format!("/shopify/login?shop={shop}")).await;
    assert_eq!(login.status, StatusCode::SEE_OTHER, "{}", login.body);
    owner.get(&login.location()).await.location()
}

/// The shop `/connect` shows for `owner`'s session.
async fn shop_of(owner: &mut Owner) -> String {
    owner.status().await["shop"]
        .as_str()
        .expect("a shop")
        .to_string()
}

/// The value of the hidden `state` field of the switch form.
fn switch_state(answer: &Answer) -> String {
    let field = "name=\"state\" value=\"";
    let start = answer.body.find(field).expect("a switch form") + field.len();
    let end = start + answer.body[start..].find('"').expect("end of the value");
    answer.body[start..end].to_string()
}

#[tokio::test]
async fn a_sign_in_link_opened_in_another_browser_is_refused_and_leaves_that_browsers_session_alone()
 {
    let env = OwnerEnv::start(DbKind::Sqlite, StoreKind::Local).await;
    env.graph.set_person("8101", &["810000000000001"]);
    let mut attacker = env.owner();
    let mut victim = env.owner();
    victim.install_shop("victim.myshopify.com").await;
    let victim_user = user_of(&mut victim).await;
    let session_before = victim.cookies["session_id"].clone();

    // The attacker runs the sign-in for their own shop and keeps the callback URL.
    let link = shopify_callback_url(&mut attacker, "attacker.myshopify.com").await;
    let mut fresh_browser = env.owner();
    for browser in [&mut victim, &mut fresh_browser] {
        let answer = browser.get(&link).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
        assert!(answer.body.contains("another browser"), "{}", answer.body);
        assert!(answer.set_cookies().is_empty(), "no cookie is set");
    }
    assert_eq!(victim.cookies["session_id"], session_before);
    assert_eq!(
        user_of(&mut victim).await,
        victim_user,
        "the victim's session is untouched"
    );
    assert_eq!(shop_of(&mut victim).await, "victim.myshopify.com");
    assert!(fresh_browser.get_json("/connect").await.0 == StatusCode::UNAUTHORIZED);

    // The refusals used nothing up: the attacker's own browser still completes its sign-in.
    let answer = attacker.get(&link).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(shop_of(&mut attacker).await, "attacker.myshopify.com");

    // Facebook's side: the attacker's Facebook Login callback opened by the victim.
    env.dialog
        .answer(DialogAnswer::Approve(env.graph.login_code("8101")));
    let login = attacker.get("/facebook/login").await;
    let facebook_link = attacker.get(&login.location()).await.location();
    let answer = victim.get(&facebook_link).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
    assert!(answer.body.contains("another browser"), "{}", answer.body);
    assert!(
        victim.status().await["pages"]
            .as_array()
            .expect("pages")
            .is_empty()
    );
    assert!(env.pages_list().await.is_empty(), "nothing was connected");
    let answer = attacker.get(&facebook_link).await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.body);
    env.finish(
        &["8101"],
        &["810000000000001"],
        &["victim.myshopify.com", "attacker.myshopify.com"],
    )
    .await;
}

#[tokio::test]
async fn a_browser_signed_in_to_one_shop_is_asked_before_switching_and_signing_out_ends_the_session()
 {
    let env = OwnerEnv::start(DbKind::Sqlite, StoreKind::Local).await;
    let mut owner = env.owner();
    owner.install_shop("first.myshopify.com").await;
    let first_session = owner.cookies.clone();

    let question = owner.install_shop("second.myshopify.com").await;
    assert_eq!(question.status, StatusCode::OK, "{}", question.body);
    assert!(question.body.contains("Switch shops?"), "{}", question.body);
    assert!(
        question.body.contains("first.myshopify.com"),
        "{}",
        question.body
    );
    assert!(
        question.set_cookie().is_none(),
        "the session is not replaced yet"
    );
    assert_eq!(shop_of(&mut owner).await, "first.myshopify.com");
    let state = switch_state(&question);

    // The answer only counts from this browser.
    let mut stranger = env.owner();
    let answer = stranger
        .post_form("/shopify/switch", &[("state", &state)])
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
    assert!(answer.set_cookie().is_none());

    let switched = owner
        .post_form("/shopify/switch", &[("state", &state)])
        .await;
    assert_eq!(switched.status, StatusCode::SEE_OTHER, "{}", switched.body);
    assert_eq!(switched.location(), "/connect");
    assert_eq!(shop_of(&mut owner).await, "second.myshopify.com");
    let mut old = env.owner();
    old.cookies = first_session;
    assert_eq!(
        old.get_json("/connect").await.0,
        StatusCode::UNAUTHORIZED,
        "the replaced session ended"
    );

    // The way in: a signed-in owner goes on to the status page.
    let root = owner.get("/").await;
    assert_eq!(root.status, StatusCode::SEE_OTHER, "{}", root.body);
    assert_eq!(root.location(), "/connect");

    // Signing out: a button on the status page, a POST that ends the session.
    let page = owner.get("/connect").await;
    assert!(page.body.contains("action=\"/logout\""), "{}", page.body);
    let kept = owner.cookies.clone();
    let out = owner.post_form("/logout", &[]).await;
    assert_eq!(out.status, StatusCode::OK, "{}", out.body);
    assert!(out.body.contains("signed out"), "{}", out.body);
    assert!(
        !owner.cookies.contains_key("session_id"),
        "the cookie is cleared"
    );
    assert_eq!(owner.get_json("/connect").await.0, StatusCode::UNAUTHORIZED);
    let root = owner.get("/").await;
    assert_eq!(root.status, StatusCode::OK, "{}", root.body);
    assert!(
        root.body.contains("action=\"/shopify/login\""),
        "how to start: {}",
        root.body
    );
    let mut copy = env.owner();
    copy.cookies = kept;
    assert_eq!(
        copy.get_json("/connect").await.0,
        StatusCode::UNAUTHORIZED,
        "the session is gone on the server, not only from the browser"
    );
    env.finish(&[], &[], &["first.myshopify.com", "second.myshopify.com"])
        .await;
}

#[tokio::test]
async fn a_shopify_query_re_split_to_move_a_parameter_into_a_value_does_not_verify() {
    let env = OwnerEnv::start(DbKind::Sqlite, StoreKind::Local).await;
    let mut owner = env.owner();
    let link = shopify_callback_url(&mut owner, "resplit.myshopify.com").await;
    let url = reqwest::Url::parse(&link).expect("url");
    let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    let value = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .expect(name)
    };
    // `host` moved inside `code`'s value; Shopify's hmac kept.
    let mut resplit = url.clone();
    resplit
        .query_pairs_mut()
        .clear()
        .append_pair("code", &format!("{}&host={}", value("code"), value("host")))
        .append_pair("hmac", &value("hmac"))
        .append_pair("shop", &value("shop"))
        .append_pair("state", &value("state"))
        .append_pair("timestamp", &value("timestamp"));
    let answer = owner.get(resplit.as_str()).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
    assert!(answer.body.contains("hmac"), "{}", answer.body);
    assert!(answer.set_cookie().is_none());
    // A parameter given twice is ambiguous: refused too.
    let doubled = format!("{link}&shop=other.myshopify.com");
    assert_eq!(owner.get(&doubled).await.status, StatusCode::BAD_REQUEST);
    // The genuine query still verifies.
    assert_eq!(owner.get(&link).await.status, StatusCode::OK);
    env.finish(&[], &[], &["resplit.myshopify.com"]).await;
}

#[tokio::test]
async fn facebooks_error_description_is_never_shown_only_fixed_words() {
    let env = OwnerEnv::start(DbKind::Sqlite, StoreKind::Local).await;
    let mut owner = env.owner();
    let answer = owner
        .get(
            "/facebook/callback?error=server_error&error_description=Your+shop+is+suspended.+Call+\
             %2B1-555-0100&error_reason=Call+555",
        )
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
    assert!(
        answer.body.contains("Facebook reported an error"),
        "{}",
        answer.body
    );
    assert!(!answer.body.contains("555"), "{}", answer.body);
    assert!(!answer.body.contains("suspended"), "{}", answer.body);
    env.finish(&[], &[], &[]).await;
}
