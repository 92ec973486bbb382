//! Reliability tests: the real `fbsync` processes under faults (a worker killed with SIGKILL,
//! the broker restarted, storage down, duplicate deliveries), checked against the guarantees of
//! DESIGN.md: a 200 is never lost, nothing is stored twice, dead letters can be replayed.
//!
//! These tests restart the one shared RabbitMQ, so every test takes [`support::serial`] first
//! and they run one at a time (cargo runs test binaries one after another, so the `api` target
//! never sees the broker go away).

#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;
#[allow(dead_code)]
#[path = "../api/pipeline.rs"]
mod pipeline;
#[path = "../api/spaces_limits.rs"]
mod spaces_limits;

mod broker_restart;
mod support;
mod table;
mod visibility;
mod worker_crash;
