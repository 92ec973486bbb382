//! How a job that did not complete (a page change, a poll) asks its consumer to settle its
//! message: dead-letter it with the reason, park it for a long wait, or give it back.

use std::time::Duration;

use crate::dead_letter::DeadLetterInfo;

/// Why a job did not complete, and what becomes of its message.
#[derive(Debug, Clone)]
pub enum JobFailure {
    /// It cannot succeed: park the message in the DLQ with this information.
    DeadLetter(DeadLetterInfo),
    /// Shutdown interrupted a wait: return the message to its queue.
    GiveBack,
    /// The next attempt is far off (a rate limit, an outage, a busy Page): park the message
    /// for this long.
    Park(Duration),
}
