//! One file per message the scheduler understands.

pub mod cancel;
pub mod explain;
pub mod query;
pub mod reports;
pub mod schedules;
pub mod submit;
