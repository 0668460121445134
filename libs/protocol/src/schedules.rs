//! `hodei.api.schedules.*`: create, list, get, pause, resume and delete schedules.

use chrono::{DateTime, Utc};
use hodei_domain::schedule::{CatchUp, Overlap, Trigger};
use hodei_domain::{Schedule, ScheduleState};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::api::SubmitJob;
use crate::schema_version;

/// `hodei.api.schedules.create`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSchedule {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    /// Unique among schedules not deleted.
    pub name: String,
    pub trigger: Trigger,
    #[serde(default)]
    pub overlap: Overlap,
    #[serde(default)]
    pub catch_up: CatchUp,
    /// The job each tick creates (without an idempotency key: each tick's job has
    /// `<schedule id>:<tick time>`).
    pub job: SubmitJob,
}

/// `hodei.api.schedules.get|pause|resume|delete`: one schedule, by id or by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRef {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub schedule: String,
}

/// `hodei.api.schedules.list`: newest first; deleted ones only when asked for by state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListSchedules {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    #[serde(default)]
    pub state: Option<ScheduleState>,
    /// At most 500; 50 when absent.
    #[serde(default)]
    pub limit: Option<u32>,
    #[serde(default)]
    pub cursor: Option<String>,
}

/// A schedule as clients see it: its job's environment by name only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleView {
    pub schedule_id: Uuid,
    pub name: String,
    pub state: ScheduleState,
    pub trigger: Trigger,
    pub overlap: Overlap,
    pub catch_up: CatchUp,
    pub command: String,
    pub args: Vec<String>,
    pub env_keys: Vec<String>,
    pub next_tick_at: Option<DateTime<Utc>>,
    pub last_tick_at: Option<DateTime<Utc>>,
    pub last_job_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<&Schedule> for ScheduleView {
    fn from(s: &Schedule) -> Self {
        let d = &s.definition;
        ScheduleView {
            schedule_id: s.id,
            name: s.name.clone(),
            state: s.state,
            trigger: d.trigger.clone(),
            overlap: d.overlap,
            catch_up: d.catch_up,
            command: d.spec.command.clone(),
            args: d.spec.args.clone(),
            env_keys: d.spec.env.keys().cloned().collect(),
            next_tick_at: s.next_tick_at,
            last_tick_at: s.last_tick_at,
            last_job_id: s.last_job_id,
            created_at: s.created_at,
            updated_at: s.updated_at,
        }
    }
}
