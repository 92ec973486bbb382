//! Everything the fbsync roles share, by layer:
//!
//! - [`facebook`]: the webhook event model, signatures and the Graph API client.
//! - [`jobs`]: every unit of work on the broker and its one wire codec.
//! - [`queue`]: the RabbitMQ topology and the confirming publisher.
//! - [`storage`]: the database, the object store and Spaces' request budgets.
//! - [`ids`]: validated Page, user and conversation-partner ids.
//! - [`config`], [`crypto`], [`retry`], [`telemetry`]: configuration, token encryption, the one
//!   retry policy, logs and metrics.
//! - [`private_files`]: files and folders created for their owner alone (0600, 0700).

pub mod config;
pub mod crypto;
pub mod facebook;
pub mod ids;
pub mod jobs;
pub mod private_files;
pub mod queue;
pub mod retry;
pub mod storage;
pub mod telemetry;

/// Milliseconds since the Unix epoch: the one time unit of messages, staging rows and budgets.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod layering_tests;
