//! What comes from Facebook and goes back to it: the webhook event model, webhook signatures,
//! the Graph API client and the conversations it polls.

pub mod conversations;
pub mod event;
pub mod graph;
pub mod signature;
