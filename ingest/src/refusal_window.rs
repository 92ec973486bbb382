//! The window in which ingest refused deliveries because the broker could not take them (503).
//! Facebook retries a refused delivery for a while and then gives up, and its events cannot be
//! queried afterwards; what it gave up on can still be read from the Conversations API, soon.
//! So when a window of refusals lasting at least INGEST_RECONCILE_AFTER_MS ends (a delivery is
//! accepted again), ingest publishes one reconciliation job: the workers poll every active Page
//! back to the window's start (`worker/src/jobs/reconcile.rs`).
//!
//! Ingest that was down refused nothing itself, yet Facebook could not deliver:
//! it notes it is alive in `DATA_DIR/ingest.alive` every [`ALIVE_EVERY`], and a start that finds
//! the note older than the threshold opens the window at the note's time
//! ([`unreachable_since`]).
//!
//! Invariant: a window is closed only by a reconciliation the broker confirmed; one that could
//! not be published stays open, to be published with the next accepted delivery.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use fbsync_shared::jobs::Reconcile;
use fbsync_shared::{now_ms, private_files};
use tokio_util::sync::CancellationToken;

/// How often ingest notes that it is alive.
pub const ALIVE_EVERY: Duration = Duration::from_secs(10);

/// The note's file name in DATA_DIR.
pub const ALIVE_FILE: &str = "ingest.alive";

/// When ingest was last alive before this start, if that is at least `threshold` ago (a start
/// after an outage Facebook saw as unreachable); `None` for a first start or a quick restart.
pub fn unreachable_since(path: &Path, threshold: Duration, now: i64) -> Option<i64> {
    let text = std::fs::read_to_string(path).ok()?;
    let last: i64 = text.trim().parse().ok().filter(|last| *last > 0)?;
    let gap = u128::try_from(now.checked_sub(last)?).unwrap_or(0);
    (gap >= threshold.as_millis()).then_some(last)
}

/// Notes that ingest is alive every [`ALIVE_EVERY`] until `shutdown` (a note that cannot be
/// written is logged once; the rest of ingest does not depend on it).
pub async fn keep_alive(path: PathBuf, shutdown: CancellationToken) {
    let mut warned = false;
    loop {
        let written = private_files::create(&path)
            .and_then(|mut file| file.write_all(now_ms().to_string().as_bytes()));
        if let Err(e) = written
            && !warned
        {
            tracing::warn!(path = %path.display(), error = %e, "ingest cannot note that it is alive; an outage while it is down will not be reconciled");
            warned = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(ALIVE_EVERY) => {}
        }
    }
}

/// How much before the first refusal the polls read: deliveries that timed out just before it.
const MARGIN_MS: i64 = 60_000;

/// The refusals since the last accepted delivery. Every accepted delivery asks it whether a
/// window closes, so that question is one atomic load while none is open.
pub struct RefusalWindow {
    /// When the first refusal of the open window came (ms); 0: no window open.
    started_ms: AtomicI64,
    /// How long a window must last to be reconciled (INGEST_RECONCILE_AFTER_MS).
    reconcile_after: Duration,
}

impl RefusalWindow {
    pub fn new(reconcile_after: Duration) -> Self {
        Self {
            started_ms: AtomicI64::new(0),
            reconcile_after,
        }
    }

    /// A delivery was refused at `now` (the window opens, unless one is open already).
    pub fn refused(&self, now: i64) {
        let _ =
            self.started_ms
                .compare_exchange(0, now.max(1), Ordering::AcqRel, Ordering::Acquire);
    }

    /// A delivery was accepted at `now`: the window it closes, when it lasted long enough to
    /// reconcile (the window is then the caller's to publish, or to [`reopen`](Self::reopen)).
    pub fn accepted(&self, now: i64) -> Option<Reconcile> {
        if self.started_ms.load(Ordering::Acquire) == 0 {
            return None;
        }
        let start = self.started_ms.swap(0, Ordering::AcqRel);
        if start == 0 {
            return None;
        }
        let lasted = u128::try_from(now - start).unwrap_or(0);
        (lasted >= self.reconcile_after.as_millis()).then_some(Reconcile {
            since_ms: (start - MARGIN_MS).max(0),
            until_ms: now,
        })
    }

    /// The reconciliation of `window` could not be published: the window stays open (from the
    /// earlier of its start and one opened since).
    pub fn reopen(&self, window: &Reconcile) {
        let start = (window.since_ms + MARGIN_MS).max(1);
        let _ = self
            .started_ms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                Some(if open == 0 { start } else { open.min(start) })
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_window_long_enough_is_reconciled_and_one_not_published_stays_open() {
        let window = RefusalWindow::new(Duration::from_secs(60));
        assert_eq!(window.accepted(1_000), None, "no window open");
        window.refused(1_000);
        window.refused(30_000);
        assert_eq!(window.accepted(40_000), None, "39 s: too short");
        window.refused(100_000);
        let closed = window.accepted(170_000).expect("70 s: reconciled");
        assert_eq!(closed.since_ms, 100_000 - MARGIN_MS);
        assert_eq!(closed.until_ms, 170_000);
        window.reopen(&closed);
        let again = window.accepted(171_000).expect("still open");
        assert_eq!(again.since_ms, closed.since_ms);
    }

    #[test]
    fn a_start_long_after_the_last_alive_note_opens_the_window_there() {
        let dir = std::env::temp_dir().join(format!("fbsync-alive-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(ALIVE_FILE);
        let minute = Duration::from_secs(60);
        assert_eq!(
            unreachable_since(&path, minute, 1_000_000),
            None,
            "a first start"
        );
        std::fs::write(&path, "900000").expect("note");
        assert_eq!(
            unreachable_since(&path, minute, 930_000),
            None,
            "a quick restart"
        );
        assert_eq!(unreachable_since(&path, minute, 960_000), Some(900_000));
        std::fs::write(&path, "garbage").expect("note");
        assert_eq!(unreachable_since(&path, minute, 960_000), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
