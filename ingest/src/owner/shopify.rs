//! Shopify OAuth, the first step of the connect flow: `/shopify/login` sends the owner to the
//! shop's authorize page; `/shopify/callback` checks Shopify's `hmac` (constant time), the
//! state and its shop, exchanges the code for the shop's token (stored sealed), finds or creates
//! the shop's user UUID and starts a session. Only `*.myshopify.com` shops are ever contacted.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use fbsync_shared::ids::{ShopDomain, UserUuid};
use fbsync_shared::now_ms;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use super::error::OwnerError;
use super::page::{escape, html, redirect_with};
use super::state::{self, Flow};
use super::{OwnerState, session};

/// GET /shopify/login?shop=`<name>.myshopify.com`
pub async fn login(
    State(state): State<Arc<OwnerState>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Response, OwnerError> {
    let shop = query
        .iter()
        .find(|(k, _)| k == "shop")
        .and_then(|(_, v)| ShopDomain::parse(v).ok())
        .ok_or_else(|| {
            OwnerError::refused(
                "Not a Shopify shop",
                "The shop parameter must be your shop's domain, such as my-shop.myshopify.com.",
            )
        })?;
    let settings = &state.settings;
    let oauth_state = state::issue(
        &settings.state_secret,
        Flow::Shopify,
        shop.as_str(),
        now_ms(),
    );
    let authorize = format!(
        "{}/oauth/authorize",
        admin_url(&settings.shopify_admin_url, &shop)
    );
    redirect_with(
        &authorize,
        "SHOPIFY_ADMIN_URL",
        &[
            ("client_id", &settings.shopify_api_key),
            ("scope", &settings.shopify_scopes),
            ("redirect_uri", &settings.shopify_redirect_uri),
            ("state", &oauth_state),
        ],
    )
}

/// The shop's admin base URL from the SHOPIFY_ADMIN_URL pattern.
fn admin_url(pattern: &str, shop: &ShopDomain) -> String {
    pattern.replace("{shop}", shop.as_str())
}

/// Whether `hmac` of Shopify's callback query is right: every other parameter (`signature`
/// too is left out) as `key=value`, sorted, joined by `&`, hex HMAC-SHA256 under the API
/// secret, compared in constant time.
pub fn hmac_is_valid(secret: &SecretString, query: &[(String, String)]) -> bool {
    let Some(given) = query
        .iter()
        .find(|(k, _)| k == "hmac")
        .and_then(|(_, v)| hex::decode(v).ok())
    else {
        return false;
    };
    let mut pairs: Vec<String> = query
        .iter()
        .filter(|(k, _)| k != "hmac" && k != "signature")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    pairs.sort();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(pairs.join("&").as_bytes());
    mac.verify_slice(&given).is_ok()
}

/// GET /shopify/callback?code&hmac&shop&state&timestamp
pub async fn callback(
    State(state): State<Arc<OwnerState>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Response, OwnerError> {
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let settings = &state.settings;
    if !hmac_is_valid(&settings.shopify_api_secret, &query) {
        tracing::warn!("a Shopify callback with a bad hmac was refused");
        return Err(OwnerError::refused(
            "Sign-in refused",
            "This request does not carry Shopify's valid signature (hmac). Please start the \
             installation again from your Shopify admin.",
        ));
    }
    let Some(Ok(shop)) = param("shop").map(ShopDomain::parse) else {
        return Err(OwnerError::refused(
            "Not a Shopify shop",
            "The callback does not name a *.myshopify.com shop.",
        ));
    };
    let claims = state::accept(
        &state.owners,
        &settings.state_secret,
        Flow::Shopify,
        param("state"),
        now_ms(),
    )
    .await?;
    if claims.subject != shop.as_str() {
        return Err(state::StateError::WrongSubject("shop").into());
    }
    let code = param("code").filter(|c| !c.is_empty()).ok_or_else(|| {
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
    let cookie = session::start(&state, &user).await?;
    tracing::info!(%shop, %user, "shop connected");
    let body = format!(
        "<p>Your shop <strong>{}</strong> is connected.</p>\n\
         <p>Next, let us read your Facebook Pages' Messenger conversations:</p>\n\
         <p><a id=\"connect-facebook\" href=\"/facebook/login\">Connect Facebook Pages</a></p>",
        escape(shop.as_str())
    );
    let mut response = html(StatusCode::OK, "Shop connected", &body);
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

    fn pairs(text: &str) -> Vec<(String, String)> {
        text.split('&')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shopifys_documented_example_verifies() {
        let secret = SecretString::from("hush");
        let query = pairs(
            "shop=some-shop.myshopify.com&code=0907a61c0c8d55e99db179b68161bc00\
             &timestamp=1337178173&state=0.6784241404160823\
             &hmac=700e2dadb827fcc8609e9d5ce208b2e9cdaab9df07390d2cbca10d7c328fc4bf",
        );
        assert!(hmac_is_valid(&secret, &query));
        let mut altered = query.clone();
        altered[0].1 = "other-shop.myshopify.com".into();
        assert!(!hmac_is_valid(&secret, &altered));
        let without: Vec<_> = query.into_iter().filter(|(k, _)| k != "hmac").collect();
        assert!(!hmac_is_valid(&secret, &without));
    }
}
