//! Validated domain ids. Each names a part of an object key, so each is checked once, where it
//! enters the system (a webhook event, the command line, a database row), and can then be used
//! in a key without escaping: none can hold `/`, `.` or be empty.
//!
//! Distinct types, so a Page id can never be passed where a person's id belongs.

use std::fmt;

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is not valid: {rule}")]
pub struct InvalidId {
    /// Which kind of id.
    pub what: &'static str,
    /// The refused text (ids are not secrets), its first 100 characters: a refused id may be
    /// of any length, and this goes into logs and answers.
    pub value: String,
    /// What a valid one looks like.
    pub rule: &'static str,
}

/// A Facebook Page id: digits only (`entry[].id` of a webhook, `--page-id`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageId(String);

/// The owner's user UUID: objects go under `users/<uuid>/`. Always lower case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserUuid(String);

/// The page-scoped id of the person a conversation is with; names the conversation file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Psid(String);

/// A Facebook person as this app knows them: the app-scoped user id of Facebook Login's `/me`
/// and of Meta's signed requests (deauthorize, data deletion). Digits only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FacebookUserId(String);

/// A Shopify shop's domain, `<name>.myshopify.com` (Shopify's rule:
/// `^[a-zA-Z0-9][a-zA-Z0-9-]*\.myshopify\.com$`), kept in lower case. It names the host the
/// OAuth flow talks to, so nothing else may pass.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShopDomain(String);

impl ShopDomain {
    pub fn parse(text: &str) -> Result<Self, InvalidId> {
        let name = text.strip_suffix(".myshopify.com").unwrap_or_default();
        let valid = name.len() <= 255
            && name
                .bytes()
                .next()
                .is_some_and(|first| first.is_ascii_alphanumeric())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid {
            return Err(InvalidId {
                what: "shop",
                value: shown(text),
                rule: "a Shopify shop domain such as my-shop.myshopify.com",
            });
        }
        Ok(Self(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A refused id as it is shown: its first 100 characters.
fn shown(text: &str) -> String {
    text.chars().take(100).collect()
}

/// Longest id accepted; Facebook's are about 16 digits.
const MAX_ID_LEN: usize = 64;

/// `text` when it is 1 to [`MAX_ID_LEN`] digits, as Facebook's numeric ids are.
fn digits(text: &str, what: &'static str, rule: &'static str) -> Result<String, InvalidId> {
    if text.is_empty() || text.len() > MAX_ID_LEN || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(InvalidId {
            what,
            value: shown(text),
            rule,
        });
    }
    Ok(text.to_string())
}

impl PageId {
    pub fn parse(text: &str) -> Result<Self, InvalidId> {
        digits(text, "page id", "a Facebook Page id is 1 to 64 digits").map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FacebookUserId {
    pub fn parse(text: &str) -> Result<Self, InvalidId> {
        digits(
            text,
            "Facebook user id",
            "an app-scoped Facebook user id is 1 to 64 digits",
        )
        .map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl UserUuid {
    pub fn parse(text: &str) -> Result<Self, InvalidId> {
        match uuid::Uuid::parse_str(text) {
            Ok(uuid) => Ok(Self(uuid.hyphenated().to_string())),
            Err(_) => Err(InvalidId {
                what: "user UUID",
                value: shown(text),
                rule: "a UUID such as 123e4567-e89b-12d3-a456-426614174000",
            }),
        }
    }

    /// A fresh random UUID, for a new user.
    pub fn new_random() -> Self {
        Self(uuid::Uuid::new_v4().hyphenated().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The thread of a Page's own events (policy enforcement, app roles: a recipient, no person):
/// not a PSID (those are digits), so it never names a person's conversation. Its object is the
/// Page's `page_events.json` (see `storage::object_key`).
pub const PAGE_EVENTS_THREAD: &str = "page_events";

/// What names the conversation of a person known only by a plugin's `user_ref` (checkbox
/// opt-ins, chat-plugin guests): `user_ref_<ref>`, so a later message from them is findable.
pub const USER_REF_PREFIX: &str = "user_ref_";

impl Psid {
    /// The thread of the Page's own events ([`PAGE_EVENTS_THREAD`]).
    pub fn page_events() -> Self {
        Self(PAGE_EVENTS_THREAD.to_string())
    }

    /// Whether this is the thread of the Page's own events.
    pub fn is_page_events(&self) -> bool {
        self.0 == PAGE_EVENTS_THREAD
    }

    pub fn parse(text: &str) -> Result<Self, InvalidId> {
        let allowed = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
        if text.is_empty() || text.len() > MAX_ID_LEN || !text.bytes().all(allowed) {
            return Err(InvalidId {
                what: "conversation partner id",
                value: shown(text),
                rule: "1 to 64 letters, digits, '_' or '-'",
            });
        }
        Ok(Self(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One conversation: a Page and the person it talks to. Names one object in the bucket and one
/// row of flush state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConversationKey {
    pub page_id: PageId,
    pub user_psid: Psid,
}

macro_rules! id_conversions {
    ($($id:ty),*) => {$(
        impl fmt::Display for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }

        /// Rows hold ids as text; a row that no longer parses is reported, not trusted.
        impl TryFrom<String> for $id {
            type Error = InvalidId;
            fn try_from(text: String) -> Result<Self, InvalidId> {
                Self::parse(&text)
            }
        }

        impl std::str::FromStr for $id {
            type Err = InvalidId;
            fn from_str(text: &str) -> Result<Self, InvalidId> {
                Self::parse(text)
            }
        }
    )*};
}

id_conversions!(PageId, UserUuid, Psid, ShopDomain, FacebookUserId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_escape_an_object_key_are_refused() {
        for bad in ["", "../1", "1/2", "12a", " 1"] {
            assert!(PageId::parse(bad).is_err(), "{bad:?}");
        }
        for bad in ["", "..", "a/b", "a.b", "a b"] {
            assert!(Psid::parse(bad).is_err(), "{bad:?}");
        }
        assert!(UserUuid::parse("not-a-uuid").is_err());
        assert_eq!(
            PageId::parse("510249619162304").map(|p| p.0).ok(),
            Some("510249619162304".into())
        );
        assert_eq!(Psid::parse("u_1-A").map(|p| p.0).ok(), Some("u_1-A".into()));
    }

    #[test]
    fn only_myshopify_domains_are_shops() {
        for bad in [
            "",
            ".myshopify.com",
            "-shop.myshopify.com",
            "shop.example.com",
            "evil.com/.myshopify.com",
            "a.b.myshopify.com",
            "shop.myshopify.com.evil.com",
            "shop_1.myshopify.com",
        ] {
            assert!(ShopDomain::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            ShopDomain::parse("My-Shop1.myshopify.com")
                .map(|s| s.0)
                .ok(),
            Some("my-shop1.myshopify.com".into())
        );
    }

    #[test]
    fn user_uuids_are_kept_in_lower_case() {
        let upper = UserUuid::parse("123E4567-E89B-12D3-A456-426614174000").expect("uuid");
        assert_eq!(upper.as_str(), "123e4567-e89b-12d3-a456-426614174000");
    }
}
