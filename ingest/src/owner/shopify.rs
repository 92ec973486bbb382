//! Shopify OAuth, the first step of the connect flow: `/shopify/login` sends the owner to the
//! shop's authorize page, the state bound to this browser (`browser_binding.rs`);
//! `/shopify/callback` checks Shopify's `hmac` over the raw query (constant time), the state,
//! its browser and its shop, exchanges the code for the shop's token (stored sealed), finds or
//! creates the shop's user UUID and starts a session. A browser already signed in to another
//! shop is asked first (`POST /shopify/switch` confirms). Only `*.myshopify.com` shops are
//! ever contacted.

use std::sync::Arc;

use axum::Form;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use fbsync_shared::ids::{ShopDomain, UserUuid};
use fbsync_shared::now_ms;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use super::browser_binding::BrowserBinding;
use super::error::OwnerError;
use super::page::{escape, html, redirect_with};
use super::state::{self, Flow};
use super::{OwnerState, session};

/// A query's parameters, decoded; a name given twice makes the query ambiguous and refused.
fn query_pairs(raw: &str) -> Result<Vec<(String, String)>, OwnerError> {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(raw.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    for (index, (name, _)) in pairs.iter().enumerate() {
        if pairs[..index].iter().any(|(earlier, _)| earlier == name) {
            return Err(OwnerError::refused(
                "Sign-in refused",
                "A parameter of this request is given twice. Please start again from your \
                 Shopify admin.",
            ));
        }
    }
    Ok(pairs)
}

/// The value of `name` in `pairs`.
fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// GET /shopify/login?shop=`<name>.myshopify.com`
pub async fn login(
    State(state): State<Arc<OwnerState>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, OwnerError> {
    let query = query_pairs(raw.as_deref().unwrap_or_default())?;
    let shop = param(&query, "shop")
        .and_then(|shop| ShopDomain::parse(shop).ok())
        .ok_or_else(|| {
            OwnerError::refused(
                "Not a Shopify shop",
                "The shop parameter must be your shop's domain, such as my-shop.myshopify.com.",
            )
        })?;
    let settings = &state.settings;
    let secure = settings.secure_cookies();
    let browser = BrowserBinding::of_request_or_new(&headers, secure);
    let oauth_state = state::issue(
        &settings.state_secret,
        Flow::Shopify,
        shop.as_str(),
        &browser,
        now_ms(),
    );
    let authorize = format!(
        "{}/oauth/authorize",
        admin_url(&settings.shopify_admin_url, &shop)
    );
    let mut response = redirect_with(
        &authorize,
        "SHOPIFY_ADMIN_URL",
        &[
            ("client_id", &settings.shopify_api_key),
            ("scope", &settings.shopify_scopes),
            ("redirect_uri", &settings.shopify_redirect_uri),
            ("state", &oauth_state),
        ],
    )?;
    response
        .headers_mut()
        .insert(header::SET_COOKIE, browser.cookie(secure));
    Ok(response)
}

/// The shop's admin base URL from the SHOPIFY_ADMIN_URL pattern.
fn admin_url(pattern: &str, shop: &ShopDomain) -> String {
    pattern.replace("{shop}", shop.as_str())
}

/// Whether the `hmac` of Shopify's callback query `raw` is right, by Shopify's rule: every
/// other parameter (`signature` too is left out), decoded, then `%` and `&` escaped in names
/// and values and `=` in names, as `name=value`, sorted by name, joined by `&`; hex
/// HMAC-SHA256 under the API secret, compared in constant time. The escaping is what keeps a
/// value that holds `&host=...` from passing for two parameters.
pub fn hmac_is_valid(secret: &SecretString, raw: &str) -> bool {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(raw.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let Some(given) = param(&pairs, "hmac").and_then(|v| hex::decode(v).ok()) else {
        return false;
    };
    let escape = |text: &str, escape_equals: bool| {
        let text = text.replace('%', "%25").replace('&', "%26");
        if escape_equals {
            text.replace('=', "%3D")
        } else {
            text
        }
    };
    let mut signed: Vec<(String, String)> = pairs
        .iter()
        .filter(|(k, _)| k != "hmac" && k != "signature")
        .map(|(k, v)| (escape(k, true), escape(v, false)))
        .collect();
    signed.sort();
    let message = signed
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(message.as_bytes());
    mac.verify_slice(&given).is_ok()
}

/// GET /shopify/callback?code&hmac&shop&state&timestamp
pub async fn callback(
    State(state): State<Arc<OwnerState>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, OwnerError> {
    let raw = raw.unwrap_or_default();
    let settings = &state.settings;
    if !hmac_is_valid(&settings.shopify_api_secret, &raw) {
        tracing::warn!("a Shopify callback with a bad hmac was refused");
        return Err(OwnerError::refused(
            "Sign-in refused",
            "This request does not carry Shopify's valid signature (hmac). Please start the \
             installation again from your Shopify admin.",
        ));
    }
    let query = query_pairs(&raw)?;
    let Some(Ok(shop)) = param(&query, "shop").map(ShopDomain::parse) else {
        return Err(OwnerError::refused(
            "Not a Shopify shop",
            "The callback does not name a *.myshopify.com shop.",
        ));
    };
    let secure = settings.secure_cookies();
    let browser = BrowserBinding::of_request(&headers, secure);
    let now = now_ms();
    let claims = state::verify(
        &settings.state_secret,
        Flow::Shopify,
        param(&query, "state"),
        browser.as_ref(),
        now,
    )?;
    if claims.subject != shop.as_str() {
        return Err(state::StateError::WrongSubject("shop").into());
    }
    if let Some(reloaded) = state.use_state_once(&claims, &headers, now).await? {
        return Ok(reloaded);
    }
    let code = param(&query, "code")
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            OwnerError::refused("Sign-in refused", "Shopify sent no authorization code.")
        })?;
    let token = exchange_code(&state, &shop, code).await.map_err(|why| {
        tracing::warn!(%shop, reason = %why, "Shopify code exchange failed");
        OwnerError::Refused {
            status: StatusCode::BAD_GATEWAY,
            title: "Shopify did not confirm the installation",
            message: "Shopify did not hand out an access token for your shop. Please start the \
                      installation again."
                .into(),
        }
    })?;
    let sealed = state
        .cipher
        .seal(&format!("shop:{}", shop.as_str()), &token);
    let user = state
        .owners
        .connect_shop(&shop, &UserUuid::new_random(), sealed, now_ms())
        .await?;
    tracing::info!(%shop, %user, "shop connected");
    let Some(browser) = browser else {
        return Err(state::StateError::OtherBrowser.into());
    };
    match session::current_user(&state, &headers).await? {
        Some(current) if current != user => {
            switch_question(&state, &browser, &current, &user, &shop).await
        }
        _ => signed_in(&state, &headers, &user, &shop).await,
    }
}

/// The browser now holds a session for `user` (the one it had ends) and its sign-in is done.
async fn signed_in(
    state: &OwnerState,
    headers: &HeaderMap,
    user: &UserUuid,
    shop: &ShopDomain,
) -> Result<Response, OwnerError> {
    let cookie = session::start(state, headers, user, None).await?;
    let body = format!(
        "<p>Your shop <strong id=\"shop\">{}</strong> is connected.</p>\n\
         <p>Next, let us read your Facebook Pages' Messenger conversations:</p>\n\
         <p><a id=\"connect-facebook\" href=\"/facebook/login\">Connect Facebook Pages</a></p>",
        escape(shop.as_str())
    );
    let mut response = html(StatusCode::OK, "Shop connected", &body);
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(response)
}

/// The browser is signed in to another shop: it is asked before its session is replaced, so
/// no link can swap a signed-in owner's session silently. The shop is connected already (its
/// token stored); only the browser's session waits for the answer.
async fn switch_question(
    state: &OwnerState,
    browser: &BrowserBinding,
    current: &UserUuid,
    user: &UserUuid,
    shop: &ShopDomain,
) -> Result<Response, OwnerError> {
    let current_shop = state
        .owners
        .user_shop(current)
        .await?
        .map(|shop| shop.as_str().to_string())
        .unwrap_or_else(|| "another shop".to_string());
    let switch_state = state::issue(
        &state.settings.state_secret,
        Flow::Switch,
        user.as_str(),
        browser,
        now_ms(),
    );
    let body = format!(
        "<p>This browser is signed in to <strong id=\"current-shop\">{current}</strong>. \
         Your shop <strong id=\"shop\">{new}</strong> is connected; do you want to switch to \
         it?</p>\n\
         <form method=\"post\" action=\"/shopify/switch\">\
         <input type=\"hidden\" name=\"state\" value=\"{switch_state}\">\
         <button id=\"switch-shop\" type=\"submit\">Switch to {new}</button></form>\n\
         <p><a id=\"stay\" href=\"/connect\">Stay signed in to {current}</a></p>",
        current = escape(&current_shop),
        new = escape(shop.as_str()),
        switch_state = escape(&switch_state),
    );
    // The answer gets the switch state's whole lifetime: the sign-in cookie is renewed with it.
    let mut response = html(StatusCode::OK, "Switch shops?", &body);
    response.headers_mut().insert(
        header::SET_COOKIE,
        browser.cookie(state.settings.secure_cookies()),
    );
    Ok(response)
}

/// POST /shopify/switch (state): the confirmed answer to `switch_question`.
pub async fn switch(
    State(state): State<Arc<OwnerState>>,
    headers: HeaderMap,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<Response, OwnerError> {
    let browser = BrowserBinding::of_request(&headers, state.settings.secure_cookies());
    let now = now_ms();
    let claims = state::verify(
        &state.settings.state_secret,
        Flow::Switch,
        param(&form, "state"),
        browser.as_ref(),
        now,
    )?;
    let user = UserUuid::parse(&claims.subject)
        .map_err(|_| OwnerError::refused("Sign-in refused", "The state names no user."))?;
    if let Some(reloaded) = state.use_state_once(&claims, &headers, now).await? {
        return Ok(reloaded);
    }
    let cookie = session::start(&state, &headers, &user, None).await?;
    tracing::info!(%user, "a browser switched shops");
    let mut response = Redirect::to("/connect").into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(response)
}

/// Exchanges the code at the shop's `/admin/oauth/access_token`; a reason in words on failure
/// (never the answer's body: it would hold the token).
async fn exchange_code(
    state: &OwnerState,
    shop: &ShopDomain,
    code: &str,
) -> Result<SecretString, String> {
    let settings = &state.settings;
    let url = format!(
        "{}/oauth/access_token",
        admin_url(&settings.shopify_admin_url, shop)
    );
    let body = serde_json::json!({
        "client_id": settings.shopify_api_key,
        "client_secret": settings.shopify_api_secret.expose_secret(),
        "code": code,
    });
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT, "application/json".parse().expect("header"));
    let response = state
        .http
        .post(url)
        .headers(headers)
        .json(&body)
        .send()
        .await
        .map_err(|e| {
            if e.is_timeout() {
                "timed out".to_string()
            } else {
                "could not connect".to_string()
            }
        })?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    let answer: serde_json::Value = response
        .json()
        .await
        .map_err(|_| "the answer is not JSON".to_string())?;
    answer
        .get("access_token")
        .and_then(serde_json::Value::as_str)
        .filter(|token| !token.is_empty())
        .map(|token| SecretString::from(token.to_string()))
        .ok_or_else(|| "the answer holds no access_token".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shopify's published example (shopify.dev, "Verify a request", read 2026-12-04).
    const EXAMPLE: &str = "code=0907a61c0c8d55e99db179b68161bc00\
         &hmac=700e2dadb827fcc8609e9d5ce208b2e9cdaab9df07390d2cbca10d7c328fc4bf\
         &shop=some-shop.myshopify.com&state=0.6784241404160823&timestamp=1337178173";

    #[test]
    fn shopifys_documented_example_verifies_and_any_change_does_not() {
        let secret = SecretString::from("hush");
        assert!(hmac_is_valid(&secret, EXAMPLE));
        let altered = EXAMPLE.replace("some-shop", "other-shop");
        assert!(!hmac_is_valid(&secret, &altered));
        let without = EXAMPLE.replace("&hmac=700e", "&xmac=700e");
        assert!(!hmac_is_valid(&secret, &without));
    }

    #[test]
    fn a_value_holding_an_ampersand_does_not_pass_for_two_parameters() {
        let secret = SecretString::from("hush");
        let sign = |message: &str| {
            let mut mac = Hmac::<Sha256>::new_from_slice(b"hush").expect("key");
            mac.update(message.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        };
        // Shopify signed code, host and shop as three parameters...
        let hmac = sign("code=abc&host=aG9zdA&shop=a.myshopify.com");
        let genuine = format!("code=abc&host=aG9zdA&shop=a.myshopify.com&hmac={hmac}");
        assert!(hmac_is_valid(&secret, &genuine));
        // ...re-split, `host` moves into `code`'s value: the escaped `&` no longer matches.
        let resplit = format!("code=abc%26host%3DaG9zdA&shop=a.myshopify.com&hmac={hmac}");
        assert!(!hmac_is_valid(&secret, &resplit));
        // A value with `%` and `&` verifies when signed as Shopify escapes it.
        let hmac = sign("code=a%25b%26c&shop=a.myshopify.com");
        assert!(hmac_is_valid(
            &secret,
            &format!("code=a%25b%26c&shop=a.myshopify.com&hmac={hmac}")
        ));
    }

    #[test]
    fn a_parameter_given_twice_is_refused() {
        assert!(query_pairs("shop=a.myshopify.com&shop=b.myshopify.com").is_err());
        assert_eq!(query_pairs("a=1&b=2").expect("pairs").len(), 2);
    }
}
