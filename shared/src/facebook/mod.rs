//! What comes from Facebook and goes back to it: the webhook event model, webhook signatures,
//! the Graph API client, the conversations it polls, and Facebook Login's calls.

pub mod conversations;
pub mod event;
pub mod graph;
pub mod login;
pub mod signature;
