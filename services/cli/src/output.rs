//! Human-readable tables and the `--json` output.

use chrono::{DateTime, Utc};
use hodei_protocol::api::{AuditEntry, JobView, Page, WorkerView};
use uuid::Uuid;

pub fn json<T: serde::Serialize + ?Sized>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("serializable")
    );
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

fn opt<T: ToString>(value: &Option<T>) -> String {
    value
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_else(|| "-".into())
}

fn time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

fn command_line(job: &JobView) -> String {
    let mut s = std::iter::once(&job.command)
        .chain(&job.args)
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    if s.chars().count() > 60 {
        s = s.chars().take(57).collect::<String>() + "...";
    }
    s
}

fn next_page(next: &Option<String>) {
    if let Some(cursor) = next {
        println!("(more: --cursor '{cursor}')");
    }
}

pub fn job_summary(job: &JobView) -> String {
    let exit = job
        .exit_code
        .map(|c| format!(", exit code {c}"))
        .unwrap_or_default();
    let error = job
        .error
        .as_ref()
        .map(|e| format!(": {e}"))
        .unwrap_or_default();
    format!("hodei: job {} {}{exit}{error}", job.job_id, job.state)
}

pub fn explanation(job: &JobView) {
    println!(
        "{} {}: {}",
        job.job_id,
        job.state,
        job.waiting_reason.as_deref().unwrap_or("-")
    );
}

pub fn job_details(job: &JobView) {
    let rows = [
        ("job", job.job_id.to_string()),
        ("state", job.state.to_string()),
        ("why", opt(&job.waiting_reason)),
        ("image", opt(&job.image)),
        (
            "concurrency",
            job.concurrency
                .as_ref()
                .map(|c| format!("key {} (at most {} placed at once)", c.key, c.max))
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "command",
            std::iter::once(&job.command)
                .chain(&job.args)
                .cloned()
                .collect::<Vec<_>>()
                .join(" "),
        ),
        ("working dir", opt(&job.working_dir)),
        ("attempt", job.attempt.to_string()),
        ("worker", opt(&job.worker_id)),
        ("exit code", opt(&job.exit_code)),
        ("error", opt(&job.error)),
        ("correlation id", job.correlation_id.clone()),
        ("idempotency key", opt(&job.idempotency_key)),
        ("created", time(&job.created_at)),
        ("updated", time(&job.updated_at)),
    ];
    for (name, value) in rows {
        println!("{name:<16} {value}");
    }
    for (k, v) in &job.labels {
        println!("{:<16} {k}={v}", "label");
    }
}

pub fn jobs_table(page: &Page<JobView>) {
    let rows = page
        .items
        .iter()
        .map(|j| {
            vec![
                j.job_id.to_string(),
                j.state.to_string(),
                opt(&j.exit_code),
                time(&j.created_at),
                command_line(j),
            ]
        })
        .collect();
    table(&["JOB", "STATE", "EXIT", "CREATED", "COMMAND"], rows);
    next_page(&page.next_cursor);
}

pub fn workers_table(page: &Page<WorkerView>) {
    let rows = page
        .items
        .iter()
        .map(|w| {
            vec![
                w.worker_id.to_string(),
                w.state.to_string(),
                w.provider.clone(),
                if w.pooled {
                    format!("pool {}/{}", w.jobs_run, w.max_jobs)
                } else {
                    "ephemeral".to_owned()
                },
                opt(&w.current_job_id.or(w.reserved_job_id)),
                opt(&w.last_heartbeat_at.as_ref().map(time)),
                time(&w.created_at),
            ]
        })
        .collect();
    table(
        &[
            "WORKER",
            "STATE",
            "PROVIDER",
            "KIND",
            "JOB",
            "LAST HEARTBEAT",
            "CREATED",
        ],
        rows,
    );
    next_page(&page.next_cursor);
}

pub fn audit_table(page: &Page<AuditEntry>) {
    let rows = page
        .items
        .iter()
        .map(|e| {
            vec![
                time(&e.occurred_at),
                e.event_type.clone(),
                format!("{}:{}", e.aggregate_type, e.aggregate_id),
                e.actor.clone(),
                e.correlation_id.clone(),
            ]
        })
        .collect();
    table(
        &["OCCURRED", "EVENT", "AGGREGATE", "ACTOR", "CORRELATION"],
        rows,
    );
    next_page(&page.next_cursor);
}

/// One step of a job's timeline (`hodei trace`).
#[derive(serde::Serialize)]
pub struct TraceStep {
    pub occurred_at: DateTime<Utc>,
    /// Milliseconds since the job was created.
    pub since_start_ms: f64,
    /// Milliseconds since the step before (since the job was created, for the first).
    pub since_previous_ms: f64,
    pub event_type: String,
    pub actor: String,
    pub aggregate_type: String,
    pub aggregate_id: Uuid,
}

/// The job's audit entries as steps in the order they occurred (ties in recording order).
pub fn timeline(job: &JobView, mut entries: Vec<AuditEntry>) -> Vec<TraceStep> {
    entries.sort_by_key(|e| (e.occurred_at, e.seq));
    let ms = |later: DateTime<Utc>, earlier: DateTime<Utc>| {
        (later - earlier).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
    };
    let mut previous = job.created_at;
    entries
        .into_iter()
        .map(|e| {
            let step = TraceStep {
                occurred_at: e.occurred_at,
                since_start_ms: ms(e.occurred_at, job.created_at),
                since_previous_ms: ms(e.occurred_at, previous),
                event_type: e.event_type,
                actor: e.actor,
                aggregate_type: e.aggregate_type,
                aggregate_id: e.aggregate_id,
            };
            previous = step.occurred_at;
            step
        })
        .collect()
}

/// `worker:<uuid>` as `worker:<short id>`; other names as they are.
fn short_actor(actor: &str) -> String {
    match actor
        .strip_prefix("worker:")
        .and_then(|id| id.parse::<Uuid>().ok())
    {
        Some(id) => format!("worker:{}", short_id(&id)),
        None => actor.to_owned(),
    }
}

/// The last 8 hex digits: ids are UUIDv7, which begin with their creation time, so a job and
/// the worker made for it in the same millisecond share their first digits, not their last.
fn short_id(id: &Uuid) -> String {
    id.simple().to_string()[24..].to_owned()
}

pub fn trace_table(job: &JobView, steps: &[TraceStep]) {
    let exit = job
        .exit_code
        .map(|c| format!(", exit code {c}"))
        .unwrap_or_default();
    println!(
        "job {} {}{exit}, created {}, correlation {}",
        job.job_id,
        job.state,
        time(&job.created_at),
        job.correlation_id
    );
    if steps.is_empty() {
        println!("no audit entries yet for this job");
        return;
    }
    let rows = steps
        .iter()
        .map(|s| {
            let aggregate = match s.aggregate_type.as_str() {
                "job" => "job".to_owned(),
                other => format!("{other}:{}", short_id(&s.aggregate_id)),
            };
            vec![
                time(&s.occurred_at),
                format!("+{:.1}", s.since_start_ms),
                format!("{:.1}", s.since_previous_ms),
                s.event_type.clone(),
                short_actor(&s.actor),
                aggregate,
            ]
        })
        .collect();
    table(
        &["OCCURRED", "+MS", "ΔMS", "EVENT", "ACTOR", "AGGREGATE"],
        rows,
    );
}

pub fn dead_letters_table(page: &Page<hodei_protocol::api::DeadLetter>) {
    let rows = page
        .items
        .iter()
        .map(|d| {
            let mut reason: String = d.reason.chars().take(60).collect();
            if d.reason.chars().count() > 60 {
                reason.push_str("...");
            }
            vec![
                d.seq.to_string(),
                time(&d.stored_at),
                d.consumer.clone(),
                d.original_subject.clone(),
                reason,
            ]
        })
        .collect();
    table(&["SEQ", "STORED", "GAVE UP", "SUBJECT", "REASON"], rows);
    next_page(&page.next_cursor);
}

pub fn providers_table(providers: &[serde_json::Value]) {
    let field = |p: &serde_json::Value, name: &str| match &p[name] {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let rows = providers
        .iter()
        .map(|p| {
            vec![
                field(p, "provider"),
                field(p, "circuit"),
                field(p, "consecutive_failures"),
                field(p, "retry_in_ms"),
            ]
        })
        .collect();
    table(&["PROVIDER", "CIRCUIT", "FAILURES", "PROBE IN (MS)"], rows);
}

pub fn schedules_table(page: &Page<hodei_protocol::schedules::ScheduleView>) {
    let rows = page
        .items
        .iter()
        .map(|s| {
            vec![
                s.schedule_id.to_string(),
                s.name.clone(),
                s.state.to_string(),
                s.trigger.to_string(),
                opt(&s.next_tick_at.as_ref().map(time)),
                opt(&s.last_job_id),
            ]
        })
        .collect();
    table(
        &["SCHEDULE", "NAME", "STATE", "WHEN", "NEXT TICK", "LAST JOB"],
        rows,
    );
    if let Some(cursor) = &page.next_cursor {
        println!("(more: --cursor '{cursor}')");
    }
}

pub fn schedule_details(s: &hodei_protocol::schedules::ScheduleView) {
    let rows = [
        ("schedule", s.schedule_id.to_string()),
        ("name", s.name.clone()),
        ("state", s.state.to_string()),
        ("when", s.trigger.to_string()),
        ("overlap", format!("{:?}", s.overlap).to_lowercase()),
        ("catch-up", format!("{:?}", s.catch_up).to_lowercase()),
        (
            "command",
            std::iter::once(&s.command)
                .chain(&s.args)
                .cloned()
                .collect::<Vec<_>>()
                .join(" "),
        ),
        ("env", s.env_keys.join(", ")),
        ("next tick", opt(&s.next_tick_at.as_ref().map(time))),
        ("last tick", opt(&s.last_tick_at.as_ref().map(time))),
        ("last job", opt(&s.last_job_id)),
        ("created", time(&s.created_at)),
    ];
    for (name, value) in rows {
        println!("{name:<11} {value}");
    }
}
