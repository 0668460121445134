//! One file per message the registry understands.

pub mod heartbeat;
pub mod job_ended;
pub mod list;
pub mod register;
