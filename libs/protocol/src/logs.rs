//! Log batches on `hodei.logs.<job_id>` (stream HODEI_LOGS).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::schema_version;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub stream: LogStream,
    pub line: String,
}

/// Batches of one job are numbered from 0 without gaps; the one with `eof` is the last and
/// carries the exit code (absent when the process could not start or died by a signal).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogBatch {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub job_id: Uuid,
    pub attempt: u32,
    pub seq: u64,
    pub lines: Vec<LogLine>,
    #[serde(default)]
    pub eof: bool,
    #[serde(default)]
    pub exit_code: Option<i32>,
}
