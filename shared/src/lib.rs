//! Everything the fbsync roles share: configuration, the event model, webhook signatures, the
//! queue topology and publisher, the database, the object store, token encryption and telemetry.

pub mod broker;
pub mod budget;
pub mod config;
pub mod crypto;
pub mod db;
pub mod event;
pub mod graph;
pub mod retry;
pub mod signature;
pub mod store;
pub mod telemetry;

/// Milliseconds since the Unix epoch: the one time unit of messages, staging rows and budgets.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
