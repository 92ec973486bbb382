//! Reliability tests: the real `fbsync` processes under faults (a worker killed with SIGKILL,
//! the broker restarted, storage down, duplicate deliveries), checked against the guarantees of
//! docs/ARCHITECTURE.md: a 200 is never lost, nothing is stored twice, dead letters can be
//! replayed.
//!
//! These tests restart the one shared RabbitMQ, so every test takes
//! [`shared_services::serial`] first and they run one at a time (cargo runs test binaries one
//! after another, so the `api` target never sees the broker go away). The harness they share
//! with the `api` target is in `tests/common/`.

#[path = "../common/mod.rs"]
mod common;

mod backfill;
mod bench_pipeline;
mod broker_restart;
mod bucket_limits;
mod chaos;
mod database_outage;
mod durability;
mod flush_cost;
mod saturated_bucket;
mod shared_services;
mod slow_store;
mod stalled_worker;
mod table;
mod visibility;
mod worker_cost;
mod worker_crash;
