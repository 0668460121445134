//! The Hodei domain: the job and worker state machines, their aggregates, the domain event
//! catalogue and the errors a refused change produces.
//!
//! No I/O and no async live here. Services load an aggregate, call one of its methods, and
//! persist the new state together with the events the method returned (see `hodei-store`).
//! Start with [`job::JobState`] and [`worker::WorkerState`]: every change of either aggregate
//! goes through their one `can_transition_to`.

pub mod error;
pub mod events;
pub mod job;
pub mod offer;
pub mod policy;
pub mod schedule;
pub mod worker;

pub use error::{DomainError, Result};
pub use events::{Actor, AggregateType, DomainEvent, EventPayload};
pub use job::{Concurrency, Job, JobSpec, JobState, Resources};
pub use offer::{satisfiable, ProviderOffer};
pub use policy::{JobPolicy, RetryOn, RetryPolicy};
pub use schedule::{Schedule, ScheduleState};
pub use worker::{Purpose, Registration, Worker, WorkerFault, WorkerState};
