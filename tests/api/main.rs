//! End-to-end tests against the real RabbitMQ (and, from the worker on, PostgreSQL, SQLite
//! files and an S3-compatible server). Each test has its own queue prefix, bucket and database
//! (see the harness in `tests/common/`), so they run in parallel against one broker.

#[path = "../common/mod.rs"]
mod common;

mod browser;
mod compose;
mod deploy;
mod dlq;
mod harness;
mod hostile_clients;
mod ingest;
mod meta_callbacks;
mod onboarding;
mod operations;
mod owner_jobs;
mod page_data;
mod polling;
mod quick_start;
mod sign_in;
mod store;
mod store_budgets;
mod subscriptions;
mod worker;
