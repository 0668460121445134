//! The console's HTML. maud escapes every value spliced in (`(value)`); nothing here builds
//! markup from strings, and no page has inline script or style (the policy forbids them).

use chrono::{DateTime, Utc};
use hodei_protocol::api::{AuditEntry, DeadLetter, JobView, Page, WorkerView};
use hodei_protocol::schedules::ScheduleView;
use maud::{html, Markup, DOCTYPE};

use crate::session::Session;
use crate::JobFilter;

fn time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

fn opt<T: ToString>(value: &Option<T>) -> String {
    value
        .as_ref()
        .map_or_else(|| "-".to_owned(), ToString::to_string)
}

fn layout(title: &str, session: Option<&Session>, page: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Hodei" }
                link rel="stylesheet" href="/static/console.css";
                script src="/static/console.js" defer {}
            }
            body data-page=(page) {
                header {
                    strong { "Hodei" }
                    @if let Some(session) = session {
                        nav {
                            a href="/jobs" { "Jobs" }
                            a href="/workers" { "Workers" }
                            a href="/schedules" { "Schedules" }
                            a href="/dlq" { "Dead letters" }
                        }
                        form method="post" action="/logout" class="logout" {
                            input type="hidden" name="csrf" value=(session.csrf);
                            span { (session.user) }
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub fn login(error: Option<&str>) -> Markup {
    layout(
        "Log in",
        None,
        "login",
        html! {
            h1 { "Log in" }
            p {
                "Paste an operator's credential (the whole " code { ".creds" } " file, e.g. "
                code { ".hodei/nats/creds/operator.creds" } "). The console connects to NATS "
                "with it for this session only and never stores it."
            }
            @if let Some(error) = error {
                p.error role="alert" { (error) }
            }
            form method="post" action="/login" {
                textarea name="creds" rows="14" cols="80" required autocomplete="off" spellcheck="false" {}
                br;
                button type="submit" id="login" { "Log in" }
            }
        },
    )
}

pub fn error_page(message: &str) -> Markup {
    layout(
        "Error",
        None,
        "error",
        html! {
            h1 { "Something went wrong" }
            p.error role="alert" { (message) }
            p { a href="/jobs" { "Back to the jobs" } }
        },
    )
}

const STATES: [&str; 8] = [
    "Pending",
    "Assigned",
    "Scheduled",
    "Running",
    "Succeeded",
    "Failed",
    "Cancelled",
    "Timeout",
];

pub fn jobs(session: &Session, filter: &JobFilter, page: &Page<JobView>) -> Markup {
    layout(
        "Jobs",
        Some(session),
        "jobs",
        html! {
            h1 { "Jobs" }
            form method="get" action="/jobs" class="filters" {
                label { "State "
                    select name="state" {
                        option value="" { "any" }
                        @for state in STATES {
                            option value=(state) selected[filter.state == state] { (state) }
                        }
                    }
                }
                label { "Concurrency key " input type="text" name="key" value=(filter.key); }
                label { "Label " input type="text" name="label" placeholder="NAME=VALUE" value=(filter.label); }
                button type="submit" { "Filter" }
            }
            table {
                thead { tr { th { "Job" } th { "State" } th { "Command" } th { "Key" } th { "Labels" } th { "Created" } } }
                tbody id="job-rows" { (job_rows(page)) }
            }
        },
    )
}

pub fn job_rows(page: &Page<JobView>) -> Markup {
    html! {
        @for job in &page.items {
            tr data-job=(job.job_id) {
                td { a href={ "/jobs/" (job.job_id) } { (job.job_id) } }
                td.state { (job.state) }
                td { (command_line(job)) }
                td { (job.concurrency.as_ref().map_or("-", |c| c.key.as_str())) }
                td { @for (k, v) in &job.labels { span.label { (k) "=" (v) } " " } }
                td { (time(&job.created_at)) }
            }
        }
        @if page.items.is_empty() {
            tr { td colspan="6" { "No job matches." } }
        }
    }
}

fn command_line(job: &JobView) -> String {
    std::iter::once(&job.command)
        .chain(&job.args)
        .cloned()
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn job(session: &Session, job: &JobView, trail: &[AuditEntry]) -> Markup {
    layout(
        &format!("Job {}", job.job_id),
        Some(session),
        "job",
        html! {
            h1 data-job=(job.job_id) id="job" { "Job " (job.job_id) }
            div id="summary" { (job_summary(job, trail)) }
            h2 { "Logs" }
            pre id="logs" {}
        },
    )
}

pub fn job_summary(job: &JobView, trail: &[AuditEntry]) -> Markup {
    let first = trail.first().map(|e| e.occurred_at);
    html! {
        table.details {
            tr { th { "State" } td id="job-state" { (job.state) } }
            tr { th { "Why" } td id="job-why" { (opt(&job.waiting_reason)) } }
            tr { th { "Command" } td { (command_line(job)) } }
            tr { th { "Image" } td { (opt(&job.image)) } }
            tr { th { "Attempt" } td { (job.attempt) } }
            tr { th { "Worker" } td { (opt(&job.worker_id)) } }
            tr { th { "Exit code" } td { (opt(&job.exit_code)) } }
            tr { th { "Error" } td { (opt(&job.error)) } }
            tr { th { "Labels" } td { @for (k, v) in &job.labels { span.label { (k) "=" (v) } " " } } }
            tr { th { "Correlation id" } td { (job.correlation_id) } }
            tr { th { "Created" } td { (time(&job.created_at)) } }
        }
        h2 { "Timeline" }
        table id="timeline" {
            thead { tr { th { "When" } th { "+ms" } th { "Event" } th { "Actor" } th { "Change" } } }
            tbody {
                @for entry in trail {
                    tr {
                        td { (time(&entry.occurred_at)) }
                        td { (first.map_or(0, |f| (entry.occurred_at - f).num_milliseconds())) }
                        td { (entry.event_type) }
                        td { (entry.actor) }
                        td { (change_of(entry)) }
                    }
                }
            }
        }
    }
}

/// What an event changed, in a few words.
fn change_of(entry: &AuditEntry) -> String {
    let p = &entry.payload;
    let text = |key: &str| p[key].as_str().map(str::to_owned);
    match (text("from"), text("to")) {
        (Some(from), Some(to)) => format!("{from} → {to}"),
        _ => text("reason")
            .or_else(|| text("error"))
            .or_else(|| p["exit_code"].as_i64().map(|c| format!("exit code {c}")))
            .unwrap_or_default(),
    }
}

pub fn workers(session: &Session, page: &Page<WorkerView>) -> Markup {
    layout(
        "Workers",
        Some(session),
        "workers",
        html! {
            h1 { "Workers" }
            table {
                thead { tr { th { "Worker" } th { "State" } th { "Provider" } th { "Kind" } th { "Job" } th { "Last heartbeat" } th { "Created" } } }
                tbody {
                    @for w in &page.items {
                        tr {
                            td { (w.worker_id) }
                            td { (w.state) }
                            td { (w.provider) }
                            td { @if w.pooled { "pool " (w.jobs_run) "/" (w.max_jobs) } @else { "ephemeral" } }
                            td { (opt(&w.current_job_id.or(w.reserved_job_id))) }
                            td { (opt(&w.last_heartbeat_at.as_ref().map(time))) }
                            td { (time(&w.created_at)) }
                        }
                    }
                }
            }
        },
    )
}

pub fn schedules(session: &Session, page: &Page<ScheduleView>) -> Markup {
    layout(
        "Schedules",
        Some(session),
        "schedules",
        html! {
            h1 { "Schedules" }
            table {
                thead { tr { th { "Name" } th { "State" } th { "When" } th { "Command" } th { "Next tick" } th { "Last job" } th {} } }
                tbody {
                    @for s in &page.items {
                        tr data-schedule=(s.name) {
                            td { (s.name) }
                            td.state { (s.state) }
                            td { (s.trigger) }
                            td { (std::iter::once(&s.command).chain(&s.args).cloned().collect::<Vec<_>>().join(" ")) }
                            td { (opt(&s.next_tick_at.as_ref().map(time))) }
                            td { @if let Some(job) = s.last_job_id { a href={ "/jobs/" (job) } { (job) } } @else { "-" } }
                            td {
                                @let action = if s.state == hodei_domain::ScheduleState::Active { "pause" } else { "resume" };
                                form method="post" action={ "/schedules/" (s.schedule_id) "/" (action) } {
                                    input type="hidden" name="csrf" value=(session.csrf);
                                    button type="submit" class=(action) { @if action == "pause" { "Pause" } @else { "Resume" } }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

pub fn dead_letters(session: &Session, page: &Page<DeadLetter>) -> Markup {
    layout(
        "Dead letters",
        Some(session),
        "dlq",
        html! {
            h1 { "Dead letters" }
            table {
                thead { tr { th { "Seq" } th { "Subject" } th { "Consumer" } th { "Reason" } th { "Stored" } th {} } }
                tbody {
                    @for d in &page.items {
                        tr data-seq=(d.seq) {
                            td { (d.seq) }
                            td { (d.original_subject) }
                            td { (d.consumer) }
                            td { (d.reason) }
                            td { (time(&d.stored_at)) }
                            td {
                                @for action in ["replay", "discard"] {
                                    form method="post" action={ "/dlq/" (d.seq) "/" (action) } class="inline" {
                                        input type="hidden" name="csrf" value=(session.csrf);
                                        button type="submit" { (action) }
                                    }
                                }
                            }
                        }
                    }
                    @if page.items.is_empty() {
                        tr { td colspan="6" { "No dead letter." } }
                    }
                }
            }
        },
    )
}
