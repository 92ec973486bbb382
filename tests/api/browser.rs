//! The connect flow in a real headless browser (Debian's `chromium` and `chromium-driver`, which
//! `.ci/run` installs), driven over WebDriver: the owner opens the Shopify login, the browser
//! follows every redirect through the fake Shopify and the fake Facebook dialog with its own
//! cookies, clicks "Connect Facebook Pages", and ends on the status page, which names the shop
//! and the Page and moves, refreshing itself, to "History: Done". Every page of the flow is read
//! at 390 px (a phone: no horizontal scroll, the document's width measured) and at 1280 px, and
//! checked by axe-core (injected over WebDriver; `.ci/run` installs it from the npm registry): no
//! serious or critical violation. Then the login CSRF of the security review: an attacker's
//! Shopify callback URL opened in this browser is refused, and the browser's session and status
//! page stay the owner's; the status page's button signs out.

use std::process::Stdio;
use std::time::Duration;

use fantoccini::{ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;
use tokio::time::Instant;

use crate::common::fake_dialog::DialogAnswer;
use crate::common::pipeline::{DbKind, StoreKind};
use crate::onboarding::OwnerEnv;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// axe-core as `.ci/run` installs it (`npm install --prefix target/npm axe-core@4.14.1`).
const AXE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/target/npm/node_modules/axe-core/axe.min.js"
);
const CHROMIUM: &str = "/usr/bin/chromium";
const PAGE: &str = "510249619162304";

/// chromedriver on a free port; killed when dropped.
struct Chromedriver {
    child: tokio::process::Child,
    url: String,
}

impl Chromedriver {
    async fn start() -> Self {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
            "the browser test needs Debian's chromium and chromium-driver (.ci/run installs them)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

/// The serious and critical accessibility violations axe-core finds on the current page.
async fn serious_violations(browser: &fantoccini::Client) -> Vec<serde_json::Value> {
    let axe = std::fs::read_to_string(AXE)
        .unwrap_or_else(|e| panic!("{AXE}: {e} (.ci/run installs axe-core with npm)"));
    browser
        .execute(&axe, vec![])
        .await
        .expect("inject axe-core");
    let found = browser
        .execute_async(
            "const done = arguments[arguments.length - 1];\
             axe.run(document, {resultTypes: ['violations']})\
               .then(r => done(r.violations\
                 .filter(v => v.impact === 'serious' || v.impact === 'critical')\
                 .map(v => ({id: v.id, impact: v.impact, help: v.help,\
                   nodes: v.nodes.map(n => n.html)}))))\
               .catch(e => done([{id: 'axe-failed', impact: String(e)}]));",
            vec![],
        )
        .await
        .expect("run axe-core");
    found.as_array().cloned().unwrap_or_default()
}

/// Asserts the current page fits its window's width (no horizontal scroll) and passes axe.
async fn assert_readable(browser: &fantoccini::Client, what: &str) {
    let widths = browser
        .execute(
            "return [document.documentElement.scrollWidth, document.documentElement.clientWidth];",
            vec![],
        )
        .await
        .expect("measure");
    let (scroll, client) = (widths[0].as_i64(), widths[1].as_i64());
    assert!(
        scroll <= client,
        "{what}: the document is {scroll:?} px wide in a {client:?} px window"
    );
    let violations = serious_violations(browser).await;
    assert!(violations.is_empty(), "{what}: {violations:#?}");
}

/// Waits until the current page's `h1` reads `heading`.
async fn wait_for_heading(browser: &fantoccini::Client, heading: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let shown = match browser.find(Locator::Css("h1")).await {
            Ok(h1) => h1.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if shown == heading {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "waiting for {heading:?}: {shown:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_owner_connects_in_a_real_browser_and_an_attackers_sign_in_link_cannot_replace_the_session()
 {
    let env = OwnerEnv::start(DbKind::Sqlite, StoreKind::Local).await;
    env.graph.set_person("9001", &[PAGE]);
    env.graph.set_page(PAGE, "Handmade Shop");
    env.graph
        .add_conversation(PAGE, "psid-browser", 2, 1_700_000_000_000);
    env.dialog
        .answer(DialogAnswer::Approve(env.graph.login_code("9001")));
    let mut driver = Chromedriver::start().await;
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        }),
    );
    // chromedriver is on loopback: plain HTTP.
    let browser = ClientBuilder::new(HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a WebDriver session");

    let shop = "browser.myshopify.com";
    browser
        .set_window_size(390, 844)
        .await
        .expect("a phone-sized window");
    browser
        .goto(&format!("{}/", env.base))
        .await
        .expect("open the front page");
    wait_for_heading(&browser, "Connect your Facebook Pages").await;
    assert_readable(&browser, "the front page at 390 px").await;
    browser
        .goto(&format!("{}/shopify/login?shop={shop}", env.base))
        .await
        .expect("open the Shopify login");
    // Through the fake Shopify and back to the callback's page.
    env.record(browser.source().await.expect("source"));
    let heading = browser.find(Locator::Css("h1")).await.expect("h1");
    assert_eq!(heading.text().await.expect("text"), "Shop connected");
    assert_readable(&browser, "the shop-connected page at 390 px").await;
    let cookie = browser
        .get_named_cookie("session_id")
        .await
        .expect("the session cookie");
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(cookie.path(), Some("/"));
    browser
        .find(Locator::Id("connect-facebook"))
        .await
        .expect("the Connect Facebook Pages link")
        .click()
        .await
        .expect("click");
    // Through the fake dialog and the callback, onto /connect, which refreshes itself (no
    // script, no click) until the history is copied.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut refreshes_itself = false;
    loop {
        let url = browser.current_url().await.expect("url");
        let source = browser.source().await.expect("source");
        env.record(source.clone());
        if url.path() == "/connect" {
            refreshes_itself |=
                source.contains("<meta http-equiv=\"refresh\" content=\"5; url=/connect\">");
            if source.contains("Done") && source.contains("Receiving messages") {
                assert!(
                    !source.contains("http-equiv=\"refresh\""),
                    "a settled page stays still: {source}"
                );
                break;
            }
        }
        assert!(Instant::now() < deadline, "{url}: {source}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let history = browser
        .find(Locator::Css("dd.history"))
        .await
        .expect("history");
    let history = history.text().await.expect("text");
    assert!(history.starts_with("Done"), "{history}");
    assert!(
        refreshes_itself,
        "the page reloads itself while the Page is set up"
    );
    let name = browser
        .find(Locator::Css("h2 .name"))
        .await
        .expect("the Page's name");
    assert_eq!(name.text().await.expect("text"), "Handmade Shop");
    assert_readable(&browser, "/connect at 390 px").await;
    browser
        .set_window_size(1280, 900)
        .await
        .expect("a desktop-sized window");
    browser.refresh().await.expect("refresh");
    assert_readable(&browser, "/connect at 1280 px").await;
    let shown_shop = browser.find(Locator::Id("shop")).await.expect("#shop");
    assert_eq!(shown_shop.text().await.expect("text"), shop);
    let rows = browser
        .find_all(Locator::Css("section.page"))
        .await
        .expect("the Pages");
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].attr("data-page-id").await.expect("attr").as_deref(),
        Some(PAGE)
    );
    let scripts = browser
        .find_all(Locator::Css("script"))
        .await
        .expect("scripts");
    assert!(scripts.is_empty(), "the status page runs no script");

    let before = browser
        .get_named_cookie("session_id")
        .await
        .expect("the session cookie");
    // An attacker signs in to their own shop elsewhere and keeps the callback URL...
    let mut attacker = env.owner();
    let login = attacker
        .get("/shopify/login?shop=attacker.myshopify.com")
        .await;
    let link = attacker.get(&login.location()).await.location();
    // ...and the owner's browser opens it: refused, the session as it was.
    browser.goto(&link).await.expect("open the attacker's link");
    let source = browser.source().await.expect("source");
    env.record(source.clone());
    assert!(source.contains("another browser"), "{source}");
    assert_readable(&browser, "the refused sign-in's page at 1280 px").await;
    browser
        .set_window_size(390, 844)
        .await
        .expect("a phone-sized window");
    assert_readable(&browser, "the refused sign-in's page at 390 px").await;
    let after = browser
        .get_named_cookie("session_id")
        .await
        .expect("the session cookie is still there");
    assert_eq!(
        after.value(),
        before.value(),
        "the session was not replaced"
    );
    browser
        .goto(&format!("{}/connect", env.base))
        .await
        .expect("open the status page");
    let shown_shop = browser.find(Locator::Id("shop")).await.expect("#shop");
    assert_eq!(shown_shop.text().await.expect("text"), shop);
    // Signing out from the status page's button.
    browser
        .find(Locator::Id("logout"))
        .await
        .expect("the Sign out button")
        .click()
        .await
        .expect("click");
    // The click returns before the next page has loaded: wait for it.
    wait_for_heading(&browser, "Signed out").await;
    assert_readable(&browser, "the signed-out page at 390 px").await;
    // The other error pages an owner can meet, each with its way on.
    for (path, heading) in [
        ("/connect", "Not signed in"),
        (
            "/facebook/callback?error=access_denied&error_reason=user_denied",
            "Facebook Pages not connected",
        ),
        ("/shopify/callback?shop=x.myshopify.com", "Sign-in refused"),
        ("/shopify/login?shop=not-a-shop", "Not a Shopify shop"),
    ] {
        browser
            .goto(&format!("{}{path}", env.base))
            .await
            .expect("open an error page");
        wait_for_heading(&browser, heading).await;
        let source = browser.source().await.expect("source");
        env.record(source.clone());
        assert!(source.contains("href=\"/"), "{path}: a way on: {source}");
        assert_readable(&browser, path).await;
    }
    assert!(
        browser.get_named_cookie("session_id").await.is_err(),
        "the session cookie is gone"
    );
    browser.close().await.expect("close the session");
    let _ = driver.child.kill().await;
    env.finish(&["9001"], &[PAGE], &[shop, "attacker.myshopify.com"])
        .await;
}
