//! One file per message the provider-manager understands.

pub mod destroy;
pub mod provision;
