//! The worker's runtime: what carries jobs, apart from what they do.
//!
//! - [`consume`]: the AMQP consumers, one per queue, reconnecting; each message decoded once.
//! - [`settle`]: the one place that acks, dead-letters, parks or gives back a job's message.
//! - [`forward`]: moving a delivery elsewhere (confirmed copy, then ack).
//! - [`park`]: delay queues for jobs that must wait long.
//! - [`health`]: whether the database and the store are up (pauses consumers, `/readyz`).

pub mod consume;
pub mod forward;
pub mod health;
pub mod park;
pub mod settle;
