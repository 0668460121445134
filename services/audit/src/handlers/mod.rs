//! One file per message the audit service understands.

pub mod dlq;
pub mod query;
pub mod record;
