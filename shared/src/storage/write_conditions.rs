//! Conditional writes verified, not assumed. fbsync's second line of defence against a lost
//! update (after the claims) is that a write names what it read (`If-Match`) or that the object
//! must be new (`If-None-Match: *`). DigitalOcean documents no support for either on PUT (read
//! 2026-12-04), and a store that silently ignores them would turn that defence off without a
//! sign. So `fbsync check` and every worker at start write a probe object under
//! `_fbsync/probe/`, then send the two writes that must be refused (412): a second
//! `If-None-Match: *` PUT, and an `If-Match` PUT naming a wrong ETag. The probe is deleted.
//!
//! Invariant: a store that accepts either is never trusted to refuse a conflicting write; the
//! workers then read before every write and rely on their claims alone.

use bytes::Bytes;

use crate::config::ConditionalWrites;
use crate::storage::budgeted_store::{BudgetedError, BudgetedStore};
use crate::storage::object_store::{ObjectKey, StoreError, WriteCondition};

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Both writes that must be refused were refused.
    Honoured,
    /// The store accepted these writes, each of which it should have refused.
    Ignored(Vec<&'static str>),
    /// SPACES_CONDITIONAL_WRITES=off: no condition is sent, none was probed.
    NotSent,
}

impl Verdict {
    /// Whether a write's condition can be relied on to refuse a conflicting write.
    pub fn is_honoured(&self) -> bool {
        *self == Verdict::Honoured
    }

    /// The verdict in words, with what it means.
    pub fn describe(&self) -> String {
        match self {
            Verdict::Honoured => "conditional writes honoured (a second If-None-Match: * PUT and an If-Match PUT naming a wrong ETag were both refused)".into(),
            Verdict::Ignored(accepted) => format!(
                "conditional writes ignored: the store accepted {}, which it must refuse; overlapping writers are kept apart by fbsync's claims alone, and every flush reads before it writes (SPACES_CONDITIONAL_WRITES=required refuses to start on such a store)",
                accepted.join(" and ")
            ),
            Verdict::NotSent => "conditional writes not sent (SPACES_CONDITIONAL_WRITES=off): overlapping writers are kept apart by fbsync's claims alone".into(),
        }
    }
}

/// The gauge's value for a verdict: 1 honoured, 0 not.
pub fn gauge_value(verdict: &Verdict) -> f64 {
    if verdict.is_honoured() { 1.0 } else { 0.0 }
}

/// Probes `store` (four writes from the bucket's budget: three PUTs and a DELETE).
pub async fn probe(
    store: &BudgetedStore,
    mode: ConditionalWrites,
) -> Result<Verdict, BudgetedError> {
    if mode == ConditionalWrites::Off {
        return Ok(Verdict::NotSent);
    }
    let key = ObjectKey::probe();
    let outcome = probe_at(store, &key).await;
    // The probe object goes whatever the probe found; a failed delete leaves one small object
    // under `_fbsync/probe/`, which nothing reads.
    let deleted = store.delete(&key).await;
    let verdict = outcome?;
    deleted?;
    Ok(verdict)
}

async fn probe_at(store: &BudgetedStore, key: &ObjectKey) -> Result<Verdict, BudgetedError> {
    let body = Bytes::from_static(b"{\"probe\":\"conditional writes\"}");
    store
        .put(key, body.clone(), &WriteCondition::Absent)
        .await?;
    let mut accepted = Vec::new();
    let must_be_refused = [
        ("a second If-None-Match: * PUT", WriteCondition::Absent),
        (
            "an If-Match PUT naming a wrong ETag",
            WriteCondition::Matches("\"00000000000000000000000000000000\"".into()),
        ),
    ];
    for (what, condition) in must_be_refused {
        match store.put(key, body.clone(), &condition).await {
            Err(BudgetedError::Store(StoreError::Conflict)) => {}
            Ok(_) => accepted.push(what),
            Err(e) => return Err(e),
        }
    }
    Ok(if accepted.is_empty() {
        Verdict::Honoured
    } else {
        Verdict::Ignored(accepted)
    })
}
