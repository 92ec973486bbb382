//! The operator's commands beside the roles: one module per `fbsync` subcommand group.

pub mod backup;
pub mod check;
pub mod dlq;
pub mod pages;
pub mod poll;
