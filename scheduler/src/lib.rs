//! The scheduler role: plans the daily poll of every connected Page.
//!
//! Its place in the workspace and in `fbsync up` is reserved; the poll planner itself arrives
//! with the Graph API polling work (poll jobs, backfill), which no role needs yet.
