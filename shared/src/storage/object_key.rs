//! The bucket's layout as types: an [`ObjectKey`] names one object, a [`KeyPrefix`] one folder.
//!
//! The layout is the seed's, which users know:
//! `users/<uuid>/facebook_messenger/<page_id>/conversations/<psid>.json` and
//! `users/<uuid>/facebook_messenger/<page_id>/page_data.json`. Keys are built only from
//! validated ids ([`crate::ids`]: no `/`, `.` or empty part), so a key built here can never step
//! outside its folder; a key a store lists back is taken as the store gives it
//! ([`ObjectKey::listed`]).

use std::fmt;

use crate::ids::{ConversationKey, PageId, UserUuid};

/// Where `fbsync check` and the conditional-write probe write, read and delete their probe
/// objects: never under `users/`.
pub const PROBE_PREFIX: &str = "_fbsync/probe/";

/// The key of one object in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey(String);

impl ObjectKey {
    /// A conversation's file: `users/<uuid>/facebook_messenger/<page_id>/conversations/<psid>.json`;
    /// the thread of the Page's own events is `users/<uuid>/facebook_messenger/<page_id>/page_events.json`.
    pub fn conversation(user_uuid: &UserUuid, conversation: &ConversationKey) -> Self {
        if conversation.user_psid.is_page_events() {
            return Self(format!(
                "users/{user_uuid}/facebook_messenger/{}/page_events.json",
                conversation.page_id
            ));
        }
        let folder = KeyPrefix::conversations(user_uuid, &conversation.page_id);
        Self(format!("{}{}.json", folder.0, conversation.user_psid))
    }

    /// A Page's metadata file: `users/<uuid>/facebook_messenger/<page_id>/page_data.json`.
    pub fn page_data(user_uuid: &UserUuid, page_id: &PageId) -> Self {
        Self(format!(
            "users/{user_uuid}/facebook_messenger/{page_id}/page_data.json"
        ))
    }

    /// A fresh probe object (of `fbsync check`, and of the conditional-write probe every worker
    /// runs at start), under [`PROBE_PREFIX`].
    pub fn probe() -> Self {
        Self(format!(
            "{PROBE_PREFIX}{}.json",
            uuid::Uuid::new_v4().simple()
        ))
    }

    /// A key as a store listed it: whatever the bucket holds is a key (a store that writes to a
    /// filesystem still refuses unsafe ones).
    pub fn listed(key: String) -> Self {
        Self(key)
    }

    /// A key given as text (tests and tools address objects directly).
    pub fn from_text(key: &str) -> Self {
        Self(key.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part after `prefix`, when the key is inside it.
    pub fn strip_prefix(&self, prefix: &KeyPrefix) -> Option<&str> {
        self.0.strip_prefix(prefix.as_str())
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A folder of the layout, for listings and deletions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    /// A Page's conversation objects: `users/<uuid>/facebook_messenger/<page_id>/conversations/`.
    pub fn conversations(user_uuid: &UserUuid, page_id: &PageId) -> Self {
        Self(format!(
            "users/{user_uuid}/facebook_messenger/{page_id}/conversations/"
        ))
    }

    /// Everything of one Page: `users/<uuid>/facebook_messenger/<page_id>/`.
    pub fn page(user_uuid: &UserUuid, page_id: &PageId) -> Self {
        Self(format!("users/{user_uuid}/facebook_messenger/{page_id}/"))
    }

    /// Everything a user owns: `users/<uuid>/`.
    pub fn user(user_uuid: &UserUuid) -> Self {
        Self(format!("users/{user_uuid}/"))
    }

    /// A folder given as text (tests and tools).
    pub fn from_text(prefix: &str) -> Self {
        Self(prefix.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Psid;

    #[test]
    fn keys_follow_the_seed_layout() {
        let user = UserUuid::parse("5f0c6e0e-1b7a-4c1e-9a57-2f1d7f6b9a10").expect("uuid");
        let page = PageId::parse("1234567890").expect("page");
        let conversation = ConversationKey {
            page_id: page.clone(),
            user_psid: Psid::parse("24680").expect("psid"),
        };
        let key = ObjectKey::conversation(&user, &conversation);
        assert_eq!(
            key.as_str(),
            "users/5f0c6e0e-1b7a-4c1e-9a57-2f1d7f6b9a10/facebook_messenger/1234567890/conversations/24680.json"
        );
        let folder = KeyPrefix::conversations(&user, &page);
        assert_eq!(key.strip_prefix(&folder), Some("24680.json"));
        assert_eq!(
            ObjectKey::page_data(&user, &page).as_str(),
            "users/5f0c6e0e-1b7a-4c1e-9a57-2f1d7f6b9a10/facebook_messenger/1234567890/page_data.json"
        );
        assert_eq!(
            KeyPrefix::user(&user).as_str(),
            "users/5f0c6e0e-1b7a-4c1e-9a57-2f1d7f6b9a10/"
        );
        assert!(ObjectKey::probe().as_str().starts_with(PROBE_PREFIX));
        assert_ne!(ObjectKey::probe(), ObjectKey::probe());
    }
}
