//! An event's identity: what every later stage de-duplicates by, in one form. The storage
//! contract (docs/ARCHITECTURE.md) names each kind's; anything else is named by a hash of its
//! canonical JSON.

use std::fmt;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The stable identity of one event; its [`Display`](fmt::Display) is the text staged rows,
/// queue messages and the merge use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A message or an echo, by its `mid`.
    Message { mid: String },
    /// A postback, by its `mid`.
    Postback { mid: String },
    /// Every reaction event is kept (react, unreact and react again are three events): the
    /// timestamp tells them apart, and a retried delivery carries the same one.
    Reaction {
        mid: String,
        action: String,
        emoji: String,
        timestamp_ms: i64,
    },
    /// Each version of a message is kept once: the `mid` and the edit's number name it.
    Edit { mid: String, num_edit: String },
    /// A delivery receipt, by its watermark (as JSON text).
    Delivery { watermark: String },
    /// A read receipt, by its watermark (as JSON text).
    Read { watermark: String },
    /// Anything else: the [`canonical_hash`] of the whole event.
    Hash(String),
    /// A Page change: the [`canonical_hash`] of the change with its entry's time.
    Change(String),
}

impl Identity {
    /// The identity of an event named by its content alone.
    pub fn hash_of(event: &Value) -> Self {
        Identity::Hash(canonical_hash(event))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Message { mid } => write!(f, "mid:{mid}"),
            Identity::Postback { mid } => write!(f, "postback:{mid}"),
            Identity::Reaction {
                mid,
                action,
                emoji,
                timestamp_ms,
            } => write!(f, "reaction:{mid}:{action}:{emoji}:{timestamp_ms}"),
            Identity::Edit { mid, num_edit } => write!(f, "edit:{mid}:{num_edit}"),
            Identity::Delivery { watermark } => write!(f, "delivery:{watermark}"),
            Identity::Read { watermark } => write!(f, "read:{watermark}"),
            Identity::Hash(hash) => write!(f, "hash:{hash}"),
            Identity::Change(hash) => write!(f, "change:{hash}"),
        }
    }
}

/// SHA-256 of the JSON with object keys sorted at every level, so two copies of the same event
/// hash alike whatever their key order or escaping.
pub fn canonical_hash(value: &Value) -> String {
    fn write_canonical(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, key) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(key.clone()).to_string());
                    out.push(':');
                    write_canonical(&map[key], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_canonical(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut text = String::new();
    write_canonical(value, &mut text);
    hex::encode(Sha256::digest(text.as_bytes()))
}
