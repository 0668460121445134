//! What a provider offers: its labels and the most a job may ask of it. A job runs only on
//! a provider whose labels include every label of the job's `selector`, of the job's kind
//! (an image needs containers), and large enough for the job's resources.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::JobSpec;

/// The memory of a container whose job asked for none (MiB), unless the provider-manager
/// is told otherwise.
pub const DEFAULT_CONTAINER_MEMORY_MB: u32 = 512;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderOffer {
    /// `process` or `docker`.
    pub provider: String,
    pub labels: BTreeMap<String, String>,
    /// Its capacity in all (a job may not ask for more; jobs wait while it is in use).
    pub cpu_millis: u32,
    pub memory_mb: u32,
}

impl ProviderOffer {
    /// Why `spec` cannot run here, if it cannot.
    pub fn refuses(&self, spec: &JobSpec) -> Option<String> {
        let needs = if spec.image.is_some() {
            "docker"
        } else {
            "process"
        };
        if self.provider != needs {
            return Some(format!("{}: runs {} jobs", self.provider, self.provider));
        }
        if let Some((key, value)) = spec
            .selector
            .iter()
            .find(|(k, v)| self.labels.get(*k) != Some(*v))
        {
            return Some(format!("{}: no label {key}={value}", self.provider));
        }
        if spec
            .resources
            .cpu_millis
            .is_some_and(|c| c > self.cpu_millis)
        {
            return Some(format!(
                "{}: at most {} CPU millis",
                self.provider, self.cpu_millis
            ));
        }
        if spec.resources.memory_mb.is_some_and(|m| m > self.memory_mb) {
            return Some(format!("{}: at most {} MiB", self.provider, self.memory_mb));
        }
        None
    }
}

/// Whether some provider of `offers` can ever run `spec`; the reasons of each when none can.
/// With no offer known yet (no provider-manager has started), nothing is refused.
pub fn satisfiable(offers: &[ProviderOffer], spec: &JobSpec) -> Result<(), String> {
    if offers.is_empty() {
        return Ok(());
    }
    let reasons: Vec<String> = offers.iter().filter_map(|o| o.refuses(spec)).collect();
    if reasons.len() < offers.len() {
        Ok(())
    } else {
        Err(reasons.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_runs_where_its_selector_kind_and_resources_fit() {
        let offers = [
            ProviderOffer {
                provider: "process".into(),
                labels: BTreeMap::from([("os".into(), "linux".into())]),
                cpu_millis: 2000,
                memory_mb: 4096,
            },
            ProviderOffer {
                provider: "docker".into(),
                labels: BTreeMap::from([("gpu".into(), "none".into())]),
                cpu_millis: 2000,
                memory_mb: 1024,
            },
        ];
        let mut spec = JobSpec {
            command: "true".into(),
            ..Default::default()
        };
        assert!(satisfiable(&offers, &spec).is_ok());
        spec.selector.insert("os".into(), "linux".into());
        assert!(satisfiable(&offers, &spec).is_ok());
        spec.image = Some("img".into());
        let why = satisfiable(&offers, &spec).unwrap_err();
        assert!(why.contains("docker: no label os=linux"), "{why}");
        spec.selector.clear();
        spec.resources.memory_mb = Some(2048);
        assert!(satisfiable(&offers, &spec)
            .unwrap_err()
            .contains("at most 1024 MiB"));
        assert!(
            satisfiable(&[], &spec).is_ok(),
            "nothing known: nothing refused"
        );
    }
}
