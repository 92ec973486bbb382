//! Where data rests: the database (Page registry, staged events, conversation claims, request
//! budgets), the object store (Spaces/S3 or a local directory) and the arithmetic of Spaces'
//! request limits.

pub mod budget;
pub mod db;
pub mod object_store;
