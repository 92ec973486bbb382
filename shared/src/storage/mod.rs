//! Where data rests: the database (Page registry, staged events, conversation claims, request
//! budgets), the object store (Spaces/S3 or a local directory) with its typed keys, the
//! arithmetic of the store's request limits and the one place that decides them, the budgeted
//! store the roles hold, which charges the bucket's budget before every request at a rate that
//! adapts to SlowDown, and the probe that verifies conditional writes.

pub mod adaptive_rate;
pub mod budget;
pub mod budgeted_store;
pub mod db;
pub mod object_key;
pub mod object_store;
pub mod write_conditions;
