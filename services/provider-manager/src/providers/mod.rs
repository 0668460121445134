//! Providers create and destroy the resource a worker runs in.

pub mod docker;
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
    /// The job it is provisioned for (none: a warm-pool worker).
    pub job_id: Option<Uuid>,
    /// The job's container image (the Docker provider); none: a local process.
    pub image: Option<String>,
    pub resources: hodei_domain::Resources,
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

/// Which provider a worker needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Process,
    Docker,
}

impl Kind {
    pub fn of(image: Option<&str>) -> Kind {
        if image.is_some() {
            Kind::Docker
        } else {
            Kind::Process
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Process => "process",
            Kind::Docker => "docker",
        }
    }
}

/// The providers of this provider-manager, each behind its own circuit breaker: the process
/// provider always, the Docker provider when configured.
pub struct Providers {
    pub process: process::ProcessProvider,
    pub process_breaker: hodei_runtime::breaker::Breaker,
    pub docker: Option<(docker::DockerProvider, hodei_runtime::breaker::Breaker)>,
}

impl Providers {
    pub fn breaker(&self, kind: Kind) -> Option<&hodei_runtime::breaker::Breaker> {
        match kind {
            Kind::Process => Some(&self.process_breaker),
            Kind::Docker => self.docker.as_ref().map(|(_, breaker)| breaker),
        }
    }

    pub async fn create(&self, kind: Kind, spec: WorkerSpec) -> Result<String, ProviderError> {
        match (kind, &self.docker) {
            (Kind::Process, _) => self.process.create(spec).await,
            (Kind::Docker, Some((docker, _))) => docker.create(spec).await,
            (Kind::Docker, None) => Err(ProviderError(
                "this provider-manager has no docker provider (HODEI_DOCKER_SOCKET)".into(),
            )),
        }
    }

    /// Destroy the worker wherever it is: with `provider` as recorded, or (nothing recorded:
    /// the provider-manager died between creating and recording) in every provider.
    pub async fn destroy(
        &self,
        provider: Option<&str>,
        worker_id: Uuid,
        resource_id: Option<&str>,
    ) -> Result<Teardown, ProviderError> {
        let docker = self.docker.as_ref().map(|(docker, _)| docker);
        match (provider, docker) {
            (Some("docker"), Some(docker)) => docker.destroy(worker_id, resource_id).await,
            (Some("docker"), None) => Ok(Teardown::Unconfirmed(
                "its container's provider is not configured here".into(),
            )),
            (Some(_), _) => self.process.destroy(worker_id, resource_id).await,
            (None, Some(docker)) => {
                docker.destroy(worker_id, None).await?;
                self.process.destroy(worker_id, None).await
            }
            (None, None) => self.process.destroy(worker_id, None).await,
        }
    }

    /// Workers of which any provider still holds something, with that provider.
    pub async fn leftovers(&self) -> Vec<(Uuid, &'static str)> {
        let mut all: Vec<(Uuid, &'static str)> = self
            .process
            .leftovers()
            .into_iter()
            .map(|id| (id, "process"))
            .collect();
        if let Some((docker, _)) = &self.docker {
            match docker.containers().await {
                Ok(ids) => all.extend(ids.into_iter().map(|id| (id, "docker"))),
                Err(error) => {
                    tracing::warn!(%error, "cannot list the docker provider's containers")
                }
            }
        }
        all
    }

    /// Each provider with the state of its circuit (`hodei.api.providers.list`).
    pub fn views(&self) -> Vec<serde_json::Value> {
        let mut views = vec![(Kind::Process, &self.process_breaker)];
        if let Some((_, breaker)) = &self.docker {
            views.push((Kind::Docker, breaker));
        }
        views
            .into_iter()
            .map(|(kind, breaker)| {
                let mut view = serde_json::to_value(breaker.view()).expect("serializable");
                view["provider"] = kind.name().into();
                view
            })
            .collect()
    }
}
