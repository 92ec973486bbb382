//! The operator's commands beside the roles: one module per `fbsync` subcommand group.

pub mod dlq;
pub mod pages;
