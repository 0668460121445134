//! Providers create and destroy the resource a worker runs in.

pub mod process;

use std::future::Future;

use uuid::Uuid;

/// What a provider needs to start one worker's agent.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub worker_id: Uuid,
    /// The one-time bootstrap token; only its hash is stored.
    pub token: String,
    pub correlation_id: String,
    /// W3C trace context (`traceparent`, `tracestate`) the agent continues.
    pub trace_context: std::collections::HashMap<String, String>,
    /// The worker's own NATS credential (`.creds` text), minted for it alone; the provider
    /// hands it over without putting it in an environment or on a command line.
    pub creds: Option<String>,
}

/// How sure a provider is that nothing of a destroyed worker runs any more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Teardown {
    /// Everything the worker started is gone (its job may safely run again elsewhere).
    Confirmed,
    /// The provider did what it could but cannot prove it (why): a job of that worker must
    /// not be retried automatically.
    Unconfirmed(String),
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProviderError(pub String);

pub trait Provider: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Start the worker's agent; returns the provider's id of the resource.
    fn create(
        &self,
        spec: WorkerSpec,
    ) -> impl Future<Output = Result<String, ProviderError>> + Send;

    /// Stop and remove the worker's resource; done when nothing of it is left.
    /// `resource_id` is what `create` returned, for resources this instance did not create.
    fn destroy(
        &self,
        worker_id: Uuid,
        resource_id: Option<&str>,
    ) -> impl Future<Output = Result<Teardown, ProviderError>> + Send;

    /// Workers of which the provider still holds something (found without this instance's
    /// memory: after a restart too).
    fn leftovers(&self) -> Vec<Uuid> {
        Vec::new()
    }
}
