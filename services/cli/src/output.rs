//! Human-readable tables and the `--json` output.

use hodei_protocol::api::{AuditEntry, JobView, Page, WorkerView};

pub fn json<T: serde::Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("serializable"));
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

fn opt<T: ToString>(value: &Option<T>) -> String {
    value.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".into())
}

fn time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

fn command_line(job: &JobView) -> String {
    let mut s = std::iter::once(&job.command).chain(&job.args).cloned().collect::<Vec<_>>().join(" ");
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
    let exit = job.exit_code.map(|c| format!(", exit code {c}")).unwrap_or_default();
    let error = job.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default();
    format!("hodei: job {} {}{exit}{error}", job.job_id, job.state)
}

pub fn job_details(job: &JobView) {
    let rows = [
        ("job", job.job_id.to_string()),
        ("state", job.state.to_string()),
        ("command", std::iter::once(&job.command).chain(&job.args).cloned().collect::<Vec<_>>().join(" ")),
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
        .map(|j| vec![j.job_id.to_string(), j.state.to_string(), opt(&j.exit_code), time(&j.created_at), command_line(j)])
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
                opt(&w.current_job_id.or(w.reserved_job_id)),
                opt(&w.last_heartbeat_at.as_ref().map(time)),
                time(&w.created_at),
            ]
        })
        .collect();
    table(&["WORKER", "STATE", "PROVIDER", "JOB", "LAST HEARTBEAT", "CREATED"], rows);
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
    table(&["OCCURRED", "EVENT", "AGGREGATE", "ACTOR", "CORRELATION"], rows);
    next_page(&page.next_cursor);
}
