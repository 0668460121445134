//! The Docker provider: a worker is a container of the job's image on a Docker Engine (or
//! Podman's compatible API), reached through its socket with bollard. The agent is the
//! container's first process: the statically linked `hodei-agent`, bind-mounted read-only,
//! so any image works unchanged. Its credential and bootstrap token come in a folder mounted
//! for that container only (never in its environment or arguments). The container has the
//! job's CPU and memory (and the agent's, [`AGENT_MEMORY_MB`]), no host environment, no
//! capabilities, no new privileges, the labels `hodei.worker_id` and `hodei.job_id`, and is
//! removed at teardown.

use std::collections::HashMap;
use std::path::PathBuf;

use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use uuid::Uuid;

use super::{Provider, ProviderError, Teardown, WorkerSpec};

/// Where the agent and its secrets are inside every container.
const AGENT_IN_CONTAINER: &str = "/hodei/hodei-agent";
const SECRETS_IN_CONTAINER: &str = "/run/hodei";
/// Memory the container has beyond its job's, for the agent beside it (its resident pages,
/// mostly its own binary's, are charged to the container): a job that fills its limit does
/// not push the agent's out, and the agent reports the OOM kill.
const AGENT_MEMORY_MB: u32 = 32;

/// Settings of the Docker provider.
#[derive(Debug, Clone)]
pub struct DockerSettings {
    /// The engine's socket.
    pub socket: String,
    /// The statically linked agent on the engine's host.
    pub agent_bin: PathBuf,
    /// NATS as containers reach it.
    pub nats_url: String,
    /// The network containers join (`bridge`, a network's name, `host`).
    pub network: String,
    /// Folder (on the engine's host) of each worker's mounted secrets.
    pub secrets_dir: PathBuf,
    /// uid:gid the container's processes run as.
    pub user: String,
    /// Defaults for jobs that ask for nothing.
    pub default_cpu_millis: u32,
    pub default_memory_mb: u32,
    /// Every container of this provider-manager carries `hodei.owner=<owner>`; reconciling
    /// looks only at those (several installations, or tests, can share one engine).
    pub owner: String,
}

pub struct DockerProvider {
    docker: Docker,
    settings: DockerSettings,
}

/// Why the provider could not create a worker, for the job: an image the engine does not
/// have fails the job instead of being retried.
pub const IMAGE_NOT_FOUND: &str = "IMAGE_NOT_FOUND";

fn engine(what: &str) -> impl FnOnce(DockerError) -> ProviderError + '_ {
    move |error| ProviderError(format!("docker engine: {what}: {error}"))
}

fn name_of(worker_id: Uuid) -> String {
    format!("hodei-worker-{worker_id}")
}

fn not_found(error: &DockerError) -> bool {
    matches!(
        error,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

impl DockerProvider {
    pub async fn connect(settings: DockerSettings) -> Result<DockerProvider, ProviderError> {
        let socket = settings.socket.trim_start_matches("unix://");
        let docker = Docker::connect_with_unix(socket, 30, bollard::API_DEFAULT_VERSION)
            .map_err(engine("connecting"))?;
        // The engine may speak an older API than bollard's default: agree on one.
        let docker = match docker.clone().negotiate_version().await {
            Ok(negotiated) => negotiated,
            Err(error) => {
                tracing::warn!(%error, socket, "docker engine not answering yet; using the default API version");
                docker
            }
        };
        std::fs::create_dir_all(&settings.secrets_dir)
            .map_err(|e| ProviderError(format!("{}: {e}", settings.secrets_dir.display())))?;
        Ok(DockerProvider { docker, settings })
    }

    fn secrets_of(&self, worker_id: Uuid) -> PathBuf {
        self.settings.secrets_dir.join(worker_id.to_string())
    }

    /// The folder mounted at /run/hodei: the credential and the token, readable by the
    /// container's user only.
    fn write_secrets(&self, spec: &WorkerSpec) -> Result<PathBuf, ProviderError> {
        let dir = self.secrets_of(spec.worker_id);
        let fail = |e: String| ProviderError(format!("{}: {e}", dir.display()));
        hodei_auth::write_owner_only(&dir.join("token"), &spec.token, false)
            .map_err(|e| fail(e.to_string()))?;
        if let Some(creds) = &spec.creds {
            hodei_auth::write_owner_only(&dir.join("nats.creds"), creds, false)
                .map_err(|e| fail(e.to_string()))?;
        }
        let (uid, gid) = self
            .settings
            .user
            .split_once(':')
            .and_then(|(u, g)| Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)))
            .ok_or_else(|| fail(format!("user {} is not uid:gid", self.settings.user)))?;
        for path in [dir.clone(), dir.join("token"), dir.join("nats.creds")] {
            if path.exists() {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .map_err(|e| fail(e.to_string()))?;
            }
        }
        Ok(dir)
    }

    /// Remove the container of `worker_id` (and its secrets); Ok when it is gone.
    async fn remove(&self, worker_id: Uuid) -> Result<(), ProviderError> {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match self
            .docker
            .remove_container(&name_of(worker_id), Some(options))
            .await
        {
            Ok(()) => {}
            Err(error) if not_found(&error) => {}
            Err(error) => return Err(engine("removing a container")(error)),
        }
        let _ = std::fs::remove_dir_all(self.secrets_of(worker_id));
        Ok(())
    }

    /// Workers whose containers exist (running or not), by their labels.
    pub async fn containers(&self) -> Result<Vec<Uuid>, ProviderError> {
        let filters: HashMap<&str, Vec<String>> = HashMap::from([(
            "label",
            vec![format!("hodei.owner={}", self.settings.owner)],
        )]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(engine("listing containers"))?;
        Ok(containers
            .into_iter()
            .filter_map(|c| c.labels?.get("hodei.worker_id")?.parse().ok())
            .collect())
    }

    /// The engine's CPUs (thousandths) and memory (MiB).
    pub async fn capacity(&self) -> Option<(u32, u32)> {
        let info = self.docker.info().await.ok()?;
        let cpus = u32::try_from(info.ncpu?).ok()?;
        let memory = u64::try_from(info.mem_total?).ok()? / (1024 * 1024);
        Some((cpus * 1000, memory as u32))
    }
}

impl Provider for DockerProvider {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn create(&self, spec: WorkerSpec) -> Result<String, ProviderError> {
        let image = spec
            .image
            .clone()
            .ok_or_else(|| ProviderError("the docker provider needs an image".into()))?;
        let secrets = self.write_secrets(&spec)?;
        let s = &self.settings;
        let memory_mb = spec.resources.memory_mb.unwrap_or(s.default_memory_mb);
        let cpu_millis = spec.resources.cpu_millis.unwrap_or(s.default_cpu_millis);
        let mut env = vec![
            format!("HODEI_WORKER_ID={}", spec.worker_id),
            format!("HODEI_NATS_URL={}", s.nats_url),
            format!("HODEI_BOOTSTRAP_TOKEN_FILE={SECRETS_IN_CONTAINER}/token"),
            format!("HODEI_CORRELATION_ID={}", spec.correlation_id),
            "HODEI_LOG_FORMAT=json".to_owned(),
        ];
        if spec.creds.is_some() {
            env.push(format!(
                "HODEI_NATS_CREDS={SECRETS_IN_CONTAINER}/nats.creds"
            ));
        }
        env.extend(
            spec.trace_context
                .iter()
                .map(|(name, value)| format!("{}={value}", name.to_ascii_uppercase())),
        );
        let mut labels = HashMap::from([
            ("hodei.worker_id".to_owned(), spec.worker_id.to_string()),
            ("hodei.owner".to_owned(), s.owner.clone()),
        ]);
        if let Some(job_id) = spec.job_id {
            labels.insert("hodei.job_id".to_owned(), job_id.to_string());
        }
        let memory = i64::from(memory_mb + AGENT_MEMORY_MB) * 1024 * 1024;
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            entrypoint: Some(vec![AGENT_IN_CONTAINER.to_owned()]),
            cmd: Some(Vec::new()),
            env: Some(env),
            labels: Some(labels),
            user: Some(s.user.clone()),
            host_config: Some(HostConfig {
                binds: Some(vec![
                    format!("{}:{AGENT_IN_CONTAINER}:ro", s.agent_bin.display()),
                    format!("{}:{SECRETS_IN_CONTAINER}:ro", secrets.display()),
                ]),
                memory: Some(memory),
                memory_swap: Some(memory),
                nano_cpus: Some(i64::from(cpu_millis) * 1_000_000),
                pids_limit: Some(4096),
                network_mode: Some(s.network.clone()),
                cap_drop: Some(vec!["ALL".to_owned()]),
                security_opt: Some(vec!["no-new-privileges".to_owned()]),
                init: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = name_of(spec.worker_id);
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        if let Err(error) = self.docker.create_container(Some(options), body).await {
            let _ = std::fs::remove_dir_all(&secrets);
            if not_found(&error) {
                return Err(ProviderError(format!(
                    "{IMAGE_NOT_FOUND}: the image {image} is not on the docker engine ({error})"
                )));
            }
            return Err(engine("creating a container")(error));
        }
        if let Err(error) = self.docker.start_container(&name, None).await {
            let _ = self.remove(spec.worker_id).await;
            return Err(engine("starting a container")(error));
        }
        tracing::info!(worker_id = %spec.worker_id, %image, memory_mb, cpu_millis, "container started");
        Ok(name)
    }

    async fn destroy(
        &self,
        worker_id: Uuid,
        _resource_id: Option<&str>,
    ) -> Result<Teardown, ProviderError> {
        // The engine ends every process of the container with it: removed is gone.
        self.remove(worker_id).await?;
        Ok(Teardown::Confirmed)
    }
}
