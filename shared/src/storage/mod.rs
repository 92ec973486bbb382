//! Where data rests: the database (Page registry, staged events, conversation claims, request
//! budgets), the object store (Spaces/S3 or a local directory) with its typed keys, the
//! arithmetic of Spaces' request limits, and the budgeted store the roles hold, which charges
//! the bucket's budget before every request.

pub mod budget;
pub mod budgeted_store;
pub mod db;
pub mod object_key;
pub mod object_store;
