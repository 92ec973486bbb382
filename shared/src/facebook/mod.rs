//! What comes from Facebook and goes back to it: the webhook event model, webhook signatures,
//! the Graph API client and Facebook Login's calls.

pub mod event;
pub mod graph;
pub mod login;
pub mod signature;
