//! End-to-end tests against the real RabbitMQ (and, from the worker on, PostgreSQL, SQLite
//! files and an S3-compatible server). Each test has its own queue prefix, so they run in
//! parallel against one broker.

mod dlq;
mod fake_graph;
mod helpers;
mod ingest;
mod page_data;
mod pipeline;
mod spaces_limits;
mod store;
mod test_support;
mod worker;
