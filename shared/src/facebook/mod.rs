//! What comes from Facebook and goes back to it: the webhook event model, webhook signatures
//! and the Graph API client.

pub mod event;
pub mod graph;
pub mod signature;
