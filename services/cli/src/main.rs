//! `hodei`: the command line of Hodei. It speaks only the public NATS contract
//! (docs/asyncapi.yaml): request/reply APIs, and the job's logs and events from JetStream.

mod follow;
mod output;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use hodei_domain::{JobState, WorkerState};
use hodei_messaging::api::request;
use hodei_protocol::api::{
    AuditEntry, AuditQuery, CancelJob, DeadLetter, DeadLetterRef, GetJob, JobView, ListDeadLetters,
    ListJobs, ListWorkers, Page, SubmitAccepted, SubmitJob, WorkerView,
};
use hodei_protocol::subjects;
use uuid::Uuid;

/// Run and inspect jobs on Hodei.
///
/// Exit status of `hodei run`: the job's own exit code when it ran; 1 when it failed without
/// one (it could not start, or was killed); 124 on Timeout; 130 when Cancelled. Any command
/// exits 3 when Hodei refuses the request or cannot be reached.
#[derive(Parser)]
#[command(name = "hodei", version, about, long_about)]
struct Cli {
    /// NATS server URL.
    #[arg(
        long,
        global = true,
        env = "HODEI_NATS_URL",
        default_value = DEFAULT_NATS_URL
    )]
    nats_url: String,

    /// NATS credentials (a `.creds` file: a submitter's or an operator's, see `hodei auth`).
    #[arg(long, global = true, env = "HODEI_NATS_CREDS")]
    creds: Option<std::path::PathBuf>,

    /// A NATS context (`~/.config/nats/context/NAME.json`, as the `nats` CLI writes it): its
    /// `url` and `creds` are used unless --nats-url or --creds are given.
    #[arg(long, global = true, env = "NATS_CONTEXT")]
    context: Option<String>,

    /// Print JSON (one document per command) instead of tables.
    #[arg(long, global = true)]
    json: bool,

    /// Seconds to wait for an answer from a service.
    #[arg(long, global = true, env = "HODEI_TIMEOUT_SECS", default_value_t = 10)]
    timeout_secs: u64,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit a job, stream its output, and exit with its exit code.
    Run(JobArgs),
    /// Submit a job and print its id.
    Submit(JobArgs),
    /// Show one job.
    Get { job_id: Uuid },
    /// Say why a job is where it is, from live state: what it waits for (a retry, a slot of
    /// its concurrency key, capacity, a free pool worker, its provider or its worker), where
    /// it runs (worker, since when, last heartbeat), or how it ended.
    Explain { job_id: Uuid },
    /// List jobs, newest first.
    List {
        /// Only jobs in this state (Pending, Assigned, Scheduled, Running, Succeeded, Failed, Cancelled, Timeout).
        #[arg(long)]
        state: Option<JobState>,
        /// Only jobs of this concurrency key.
        #[arg(long)]
        concurrency_key: Option<String>,
        /// Only jobs with this label, NAME=VALUE (repeatable: all of them).
        #[arg(short, long = "label", value_parser = key_value)]
        label: Vec<(String, String)>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// The next_cursor printed by the previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Print a job's output; with -f, wait for the rest until the job ends.
    Logs {
        job_id: Uuid,
        #[arg(short, long)]
        follow: bool,
    },
    /// List workers, newest first.
    Workers {
        /// Only workers in this state (Creating, Connecting, Ready, Busy, Draining, Terminating, Terminated).
        #[arg(long)]
        state: Option<WorkerState>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Query the audit log; every criterion given must match.
    Audit(AuditArgs),
    /// Show a job's timeline from the audit log: each event, when it occurred, how long after
    /// the job was created (+ms) and after the step before (Δms), who caused it, and to what.
    Trace { job_id: Uuid },
    /// Cancel a job that has not ended; a running job's process (and its children) is killed.
    Cancel {
        job_id: Uuid,
        /// Why, for the job and its audit trail.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Providers and the state of their circuit breakers.
    Providers,
    /// Schedules: a job run on a cron expression or at an interval, each tick's job made
    /// once (idempotency key `<schedule id>:<tick time>`).
    Schedule {
        #[command(subcommand)]
        command: ScheduleCommand,
    },
    /// Dead letters: messages a consumer gave up on, outbox rows that could not be published.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Keys and credentials of an installation (works offline, on the state folder).
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
}

#[derive(Subcommand)]
enum AuthCommand {
    /// Create (once) the operator, the accounts and every service's and role's credential
    /// under DIR, and write DIR/nats-server.conf; running it again changes nothing that exists.
    Init {
        /// The state folder (keys and credentials: never commit it).
        #[arg(long, default_value = ".hodei/nats")]
        dir: std::path::PathBuf,
        /// Address nats-server listens on.
        #[arg(long, default_value = "127.0.0.1:4222")]
        listen: String,
        /// JetStream's store.
        #[arg(long, default_value = ".hodei/nats/store")]
        store_dir: std::path::PathBuf,
    },
    /// Make a credential for another client: a `submitter` (submit, get, list, cancel,
    /// follow) or an `operator` (also workers, providers, audit, dead letters). Its inbox
    /// prefix is `_INBOX.<NAME>`: set it in clients that are not `hodei`.
    Creds {
        /// submitter or operator.
        #[arg(long)]
        role: ClientRole,
        /// The credential's name: letters, digits, '-' and '_'.
        #[arg(long)]
        name: String,
        /// Valid for this many seconds (default: no expiry).
        #[arg(long)]
        ttl_secs: Option<u64>,
        /// The state folder made by `hodei auth init`.
        #[arg(long, default_value = ".hodei/nats")]
        dir: std::path::PathBuf,
        /// Where to write it (owner-only); printed to stdout when not given.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ClientRole {
    Submitter,
    Operator,
}

// Parsed once per run: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum ScheduleCommand {
    /// Create a schedule that runs the command after `--` on --cron (in --time-zone) or
    /// --every N seconds; takes the job options of `hodei submit` (but not --key).
    Create {
        /// Its name: letters, digits, '-', '_' and '.', unique among schedules not deleted.
        name: String,
        /// A cron expression: "MIN HOUR DAY MONTH WEEKDAY", or with seconds first
        /// ("SEC MIN HOUR DAY MONTH WEEKDAY [YEAR]").
        #[arg(long, required_unless_present = "every", conflicts_with = "every")]
        cron: Option<String>,
        /// The IANA time zone the cron expression is read in (e.g. Europe/Madrid).
        #[arg(long, default_value = "UTC", requires = "cron")]
        time_zone: String,
        /// Run every this many seconds (at least 1), counted from the creation.
        #[arg(long)]
        every: Option<f64>,
        /// A tick while the previous run has not ended: skip it (recorded) or allow it.
        #[arg(long, default_value = "skip", value_parser = ["skip", "allow"])]
        overlap: String,
        /// Ticks missed while no scheduler ran: none run, or the last of them runs.
        #[arg(long, default_value = "none", value_parser = ["none", "last"])]
        catch_up: String,
        #[command(flatten)]
        job: JobArgs,
    },
    /// List schedules, newest first (deleted ones only with --state Deleted).
    List {
        /// Only schedules in this state (Active, Paused, Deleted).
        #[arg(long)]
        state: Option<hodei_domain::ScheduleState>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show one schedule (by id or name).
    Get { schedule: String },
    /// Stop a schedule's ticks until it is resumed.
    Pause { schedule: String },
    /// Tick again, counting from now (ticks of the pause are not caught up).
    Resume { schedule: String },
    /// End a schedule for good (its record and audit trail stay).
    Delete { schedule: String },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show one dead letter with its message.
    Show { seq: u64 },
    /// Publish a dead letter again to its original subject (audited), and remove it.
    Replay {
        seq: u64,
        /// Who is acting, for the audit log.
        #[arg(long, env = "USER", default_value = "operator")]
        actor: String,
    },
    /// Remove a dead letter for good (audited).
    Discard {
        seq: u64,
        #[arg(long, env = "USER", default_value = "operator")]
        actor: String,
    },
}

#[derive(Args)]
struct JobArgs {
    /// Environment variable for the job, NAME=VALUE (repeatable).
    #[arg(short, long = "env", value_parser = key_value)]
    env: Vec<(String, String)>,
    /// Working directory of the job.
    #[arg(short = 'C', long)]
    workdir: Option<String>,
    /// Label NAME=VALUE (repeatable).
    #[arg(short, long = "label", value_parser = key_value)]
    label: Vec<(String, String)>,
    /// Idempotency key: submitting the same key again returns the first job.
    #[arg(short, long)]
    key: Option<String>,
    /// Seconds the job may wait to start (default 300); then it ends in Timeout.
    #[arg(long)]
    start_timeout: Option<f64>,
    /// Seconds the job may run (default 3600); then its process is killed and it ends in Timeout.
    #[arg(long)]
    run_timeout: Option<f64>,
    /// Attempts in all when an attempt fails or its worker is lost (default 1: no retry).
    #[arg(long)]
    attempts: Option<u32>,
    /// First retry backoff in seconds (doubling, with jitter, up to 60 s).
    #[arg(long)]
    backoff: Option<f64>,
    /// Higher runs first when jobs wait for workers (-1000 to 1000).
    #[arg(long, allow_hyphen_values = true)]
    priority: Option<i32>,
    /// Run in a container of this image (the Docker provider) instead of a local process.
    #[arg(long)]
    image: Option<String>,
    /// CPU for the job, in thousandths of a CPU (1000: one CPU).
    #[arg(long)]
    cpu_millis: Option<u32>,
    /// Memory limit in MiB; a job that exceeds it fails, saying so.
    #[arg(long)]
    memory_mb: Option<u32>,
    /// A label its provider must have, NAME=VALUE (repeatable); a job no provider can run is
    /// refused (NO_PROVIDER).
    #[arg(long = "select", value_parser = key_value)]
    selector: Vec<(String, String)>,
    /// Concurrency key (a tenant, a kind of job): with --max-concurrent, at most that many
    /// jobs of this key are placed at once; waiting keys of equal priority take turns.
    #[arg(long, requires = "max_concurrent")]
    concurrency_key: Option<String>,
    /// The most jobs of --concurrency-key placed (Assigned, Scheduled or Running) at once.
    #[arg(long, requires = "concurrency_key")]
    max_concurrent: Option<u32>,
    /// The command and its arguments, after `--`.
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

#[derive(Args)]
struct AuditArgs {
    /// Events of one correlation id (a job's, as `hodei get` shows).
    #[arg(long)]
    correlation_id: Option<String>,
    /// Events of one type, e.g. JobCompleted.
    #[arg(long)]
    event_type: Option<String>,
    /// Events of one job or worker.
    #[arg(long)]
    aggregate_id: Option<Uuid>,
    /// Events caused by one actor, e.g. `scheduler` or `worker:<id>`.
    #[arg(long)]
    actor: Option<String>,
    /// Events that occurred at or after this time (RFC 3339).
    #[arg(long)]
    from: Option<DateTime<Utc>>,
    /// Events that occurred before this time (RFC 3339).
    #[arg(long)]
    to: Option<DateTime<Utc>>,
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// The next_cursor printed by the previous page.
    #[arg(long)]
    cursor: Option<String>,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected NAME=VALUE, got '{s}'"))
}

#[tokio::main]
async fn main() -> ExitCode {
    // Like any Unix filter: `hodei logs ... | head` ends quietly when the reader stops,
    // instead of panicking on the broken pipe.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts writing.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("hodei: {error:#}");
            ExitCode::from(3)
        }
    }
}

/// Print `value` as JSON (`--json`) or with its human form; success.
fn shown<T: serde::Serialize + ?Sized>(json: bool, value: &T, human: fn(&T)) -> ExitCode {
    if json {
        output::json(value);
    } else {
        human(value);
    }
    ExitCode::SUCCESS
}

async fn run(mut cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Auth { command } = &cli.command {
        return auth(command);
    }
    if let Some(name) = cli.context.clone() {
        apply_context(&mut cli, &name)?;
    }
    let client = hodei_messaging::options("hodei-cli", cli.creds.as_deref())
        .await?
        .event_callback(|event| async move {
            if let async_nats::Event::ServerError(error) = event {
                if let Ok(mut refusals) = REFUSALS.lock() {
                    refusals.push(error.to_string());
                }
            }
        })
        .connect(hodei_messaging::servers(&cli.nats_url)?)
        .await
        .with_context(|| format!("cannot reach NATS at {}", cli.nats_url))?;
    let timeout = Duration::from_secs(cli.timeout_secs);
    let call = |subject: &'static str| (client.clone(), subject, timeout);
    match cli.command {
        Command::Run(args) => {
            let accepted = submit(call(subjects::API_JOBS_SUBMIT), args).await?;
            let js = async_nats::jetstream::new(client.clone());
            let job = follow::run_to_end(&client, &js, accepted.job_id, timeout).await?;
            if cli.json {
                output::json(&job);
            } else {
                eprintln!("{}", output::job_summary(&job));
            }
            Ok(ExitCode::from(exit_status(&job)))
        }
        Command::Submit(args) => {
            let accepted = submit(call(subjects::API_JOBS_SUBMIT), args).await?;
            if cli.json {
                output::json(&accepted);
            } else {
                println!("{}", accepted.job_id);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Get { job_id } => {
            let job = get_job(call(subjects::API_JOBS_GET), job_id).await?;
            Ok(shown(cli.json, &job, output::job_details))
        }
        Command::Explain { job_id } => {
            let job = get_job(call(subjects::API_JOBS_GET), job_id).await?;
            Ok(shown(cli.json, &job, output::explanation))
        }
        Command::List {
            state,
            concurrency_key,
            label,
            limit,
            cursor,
        } => {
            let page: Page<JobView> = ask(
                call(subjects::API_JOBS_LIST),
                &ListJobs {
                    schema_version: 1,
                    state,
                    concurrency_key,
                    labels: label.into_iter().collect(),
                    limit: Some(limit),
                    cursor,
                },
            )
            .await?;
            Ok(shown(cli.json, &page, output::jobs_table))
        }
        Command::Logs { job_id, follow } => {
            let js = async_nats::jetstream::new(client.clone());
            follow::logs(&js, job_id, follow, cli.json).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Workers {
            state,
            limit,
            cursor,
        } => {
            let page: Page<WorkerView> = ask(
                call(subjects::API_WORKERS_LIST),
                &ListWorkers {
                    schema_version: 1,
                    state,
                    limit: Some(limit),
                    cursor,
                },
            )
            .await?;
            Ok(shown(cli.json, &page, output::workers_table))
        }
        Command::Audit(a) => {
            let query = AuditQuery {
                schema_version: 1,
                correlation_id: a.correlation_id,
                event_type: a.event_type,
                aggregate_id: a.aggregate_id,
                actor: a.actor,
                from: a.from,
                to: a.to,
                limit: Some(a.limit),
                cursor: a.cursor,
            };
            let page: Page<AuditEntry> = ask(call(subjects::API_AUDIT_QUERY), &query).await?;
            Ok(shown(cli.json, &page, output::audit_table))
        }
        Command::Providers => {
            let providers: Vec<serde_json::Value> =
                ask(call(subjects::API_PROVIDERS_LIST), &serde_json::json!({})).await?;
            Ok(shown(
                cli.json,
                providers.as_slice(),
                output::providers_table,
            ))
        }
        Command::Cancel { job_id, reason } => {
            let job: JobView = ask(
                call(subjects::API_JOBS_CANCEL),
                &CancelJob {
                    schema_version: 1,
                    job_id,
                    reason,
                },
            )
            .await?;
            if cli.json {
                output::json(&job);
            } else {
                println!("{}", output::job_summary(&job));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Schedule { command } => {
            use hodei_protocol::schedules::{
                CreateSchedule, ListSchedules, ScheduleRef, ScheduleView,
            };
            let one = |schedule: String| ScheduleRef {
                schema_version: 1,
                schedule,
            };
            let view: ScheduleView = match command {
                ScheduleCommand::Create {
                    name,
                    cron,
                    time_zone,
                    every,
                    overlap,
                    catch_up,
                    job,
                } => {
                    let trigger = match (cron, every) {
                        (Some(expression), _) => hodei_domain::schedule::Trigger::Cron {
                            expression,
                            time_zone,
                        },
                        (None, Some(secs)) => hodei_domain::schedule::Trigger::Interval {
                            every_ms: (secs * 1000.0).round().max(0.0) as u64,
                        },
                        (None, None) => bail!("give --cron or --every"),
                    };
                    let request = CreateSchedule {
                        schema_version: 1,
                        name,
                        trigger,
                        overlap: serde_json::from_value(overlap.into())?,
                        catch_up: serde_json::from_value(catch_up.into())?,
                        job: job_of(job)?,
                    };
                    ask(call(subjects::API_SCHEDULES_CREATE), &request).await?
                }
                ScheduleCommand::List {
                    state,
                    limit,
                    cursor,
                } => {
                    let page: Page<ScheduleView> = ask(
                        call(subjects::API_SCHEDULES_LIST),
                        &ListSchedules {
                            schema_version: 1,
                            state,
                            limit: Some(limit),
                            cursor,
                        },
                    )
                    .await?;
                    return Ok(shown(cli.json, &page, output::schedules_table));
                }
                ScheduleCommand::Get { schedule } => {
                    ask(call(subjects::API_SCHEDULES_GET), &one(schedule)).await?
                }
                ScheduleCommand::Pause { schedule } => {
                    ask(call(subjects::API_SCHEDULES_PAUSE), &one(schedule)).await?
                }
                ScheduleCommand::Resume { schedule } => {
                    ask(call(subjects::API_SCHEDULES_RESUME), &one(schedule)).await?
                }
                ScheduleCommand::Delete { schedule } => {
                    ask(call(subjects::API_SCHEDULES_DELETE), &one(schedule)).await?
                }
            };
            Ok(shown(cli.json, &view, output::schedule_details))
        }
        Command::Dlq { command } => {
            let dead_letter = |seq, actor| DeadLetterRef {
                schema_version: 1,
                seq,
                actor,
            };
            match command {
                DlqCommand::List { limit, cursor } => {
                    let page: Page<DeadLetter> = ask(
                        call(subjects::API_DLQ_LIST),
                        &ListDeadLetters {
                            schema_version: 1,
                            limit: Some(limit),
                            cursor,
                        },
                    )
                    .await?;
                    if cli.json {
                        output::json(&page);
                    } else {
                        output::dead_letters_table(&page);
                    }
                }
                DlqCommand::Show { seq } => {
                    let dead: DeadLetter =
                        ask(call(subjects::API_DLQ_SHOW), &dead_letter(seq, None)).await?;
                    output::json(&dead);
                }
                DlqCommand::Replay { seq, actor } => {
                    let dead: DeadLetter = ask(
                        call(subjects::API_DLQ_REPLAY),
                        &dead_letter(seq, Some(actor)),
                    )
                    .await?;
                    if cli.json {
                        output::json(&dead)
                    } else {
                        println!("replayed {} to {}", dead.seq, dead.original_subject)
                    }
                }
                DlqCommand::Discard { seq, actor } => {
                    let dead: DeadLetter = ask(
                        call(subjects::API_DLQ_DISCARD),
                        &dead_letter(seq, Some(actor)),
                    )
                    .await?;
                    if cli.json {
                        output::json(&dead)
                    } else {
                        println!("discarded {}", dead.seq)
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Trace { job_id } => {
            let job: JobView = ask(
                call(subjects::API_JOBS_GET),
                &GetJob {
                    schema_version: 1,
                    job_id,
                },
            )
            .await?;
            let entries = audit_trail(call(subjects::API_AUDIT_QUERY), &job.correlation_id).await?;
            let steps = output::timeline(&job, entries);
            if cli.json {
                output::json(&steps);
            } else {
                output::trace_table(&job, &steps);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Auth { .. } => unreachable!("answered before connecting"),
    }
}

const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// Take the URL and credentials of a NATS context where the command line gave none.
fn apply_context(cli: &mut Cli, name: &str) -> anyhow::Result<()> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(&home).join(".config"));
    let path = config
        .join("nats")
        .join("context")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading NATS context {}", path.display()))?;
    let context: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("NATS context {} is not JSON", path.display()))?;
    if let Some(url) = context["url"].as_str().filter(|u| !u.is_empty()) {
        if cli.nats_url == DEFAULT_NATS_URL {
            cli.nats_url = url.to_owned();
        }
    }
    if let Some(creds) = context["creds"].as_str().filter(|c| !c.is_empty()) {
        cli.creds.get_or_insert_with(|| creds.into());
    }
    Ok(())
}

/// `hodei auth init|creds`: on the state folder, without NATS.
fn auth(command: &AuthCommand) -> anyhow::Result<ExitCode> {
    use hodei_auth::{Authority, Role};
    match command {
        AuthCommand::Init {
            dir,
            listen,
            store_dir,
        } => {
            let authority = Authority::init(dir)?;
            for service in hodei_auth::SERVICES {
                authority.ensure_creds(service, &Role::Service)?;
            }
            authority.ensure_creds("submitter", &Role::Submitter)?;
            authority.ensure_creds("operator", &Role::Operator)?;
            let conf = dir.join("nats-server.conf");
            let store_dir = std::path::absolute(store_dir)?;
            authority.write_server_conf(&conf, listen, &store_dir, "")?;
            println!("{}", conf.display());
        }
        AuthCommand::Creds {
            role,
            name,
            ttl_secs,
            dir,
            out,
        } => {
            let authority = Authority::init(dir)?;
            let role = match role {
                ClientRole::Submitter => Role::Submitter,
                ClientRole::Operator => Role::Operator,
            };
            let ttl = ttl_secs.map(Duration::from_secs);
            match out {
                Some(path) => {
                    authority.signer().write_creds(path, name, &role, ttl)?;
                    eprintln!(
                        "wrote {} ({} {name}; inbox prefix {})",
                        path.display(),
                        role.as_str(),
                        hodei_auth::inbox_prefix(name)
                    );
                }
                None => print!("{}", authority.signer().mint(name, &role, ttl)?),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Every audit entry of one correlation id, page after page.
async fn audit_trail(
    call: (async_nats::Client, &'static str, Duration),
    correlation_id: &str,
) -> anyhow::Result<Vec<AuditEntry>> {
    let mut entries = Vec::new();
    let mut cursor = None;
    loop {
        let query = AuditQuery {
            correlation_id: Some(correlation_id.to_owned()),
            limit: Some(1000),
            cursor: cursor.take(),
            ..AuditQuery::default()
        };
        let page: Page<AuditEntry> = ask(call.clone(), &query).await?;
        entries.extend(page.items);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(entries),
        }
    }
}

async fn ask<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
    (client, subject, timeout): (async_nats::Client, &'static str, Duration),
    body: &Req,
) -> anyhow::Result<Resp> {
    request(&client, subject, None, body, timeout)
        .await
        .map_err(|e| match refused(subject) {
            Some(violation) => anyhow::anyhow!(
                "{subject} is not allowed for this credential (the server said: {violation}); \
                 it needs an operator's credential (FORBIDDEN)"
            ),
            None => anyhow::anyhow!("{} ({})", e.message, e.code.as_str()),
        })
}

/// The server's permission refusals on this connection (a request it refused is dropped
/// and would otherwise look like a timeout).
static REFUSALS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn refused(subject: &str) -> Option<String> {
    REFUSALS
        .lock()
        .ok()?
        .iter()
        .find(|refusal| refusal.contains(subject))
        .cloned()
}

async fn submit(
    call: (async_nats::Client, &'static str, Duration),
    args: JobArgs,
) -> anyhow::Result<SubmitAccepted> {
    ask(call, &job_of(args)?).await
}

async fn get_job(
    call: (async_nats::Client, &'static str, Duration),
    job_id: Uuid,
) -> anyhow::Result<JobView> {
    ask(
        call,
        &GetJob {
            schema_version: 1,
            job_id,
        },
    )
    .await
}

/// The job the arguments describe.
fn job_of(args: JobArgs) -> anyhow::Result<SubmitJob> {
    let mut command = args.command.into_iter();
    let Some(program) = command.next() else {
        bail!("no command given after --")
    };
    Ok(SubmitJob {
        schema_version: 1,
        command: program,
        args: command.collect(),
        env: args.env.into_iter().collect::<BTreeMap<_, _>>(),
        working_dir: args.workdir,
        labels: args.label.into_iter().collect(),
        image: args.image,
        selector: args.selector.into_iter().collect(),
        resources: hodei_domain::Resources {
            cpu_millis: args.cpu_millis,
            memory_mb: args.memory_mb,
        },
        idempotency_key: args.key,
        policy: policy_of(
            &args.start_timeout,
            &args.run_timeout,
            args.attempts,
            args.backoff,
            args.priority,
        ),
        concurrency: args
            .concurrency_key
            .zip(args.max_concurrent)
            .map(|(key, max)| hodei_domain::Concurrency { key, max }),
    })
}

fn policy_of(
    start_timeout: &Option<f64>,
    run_timeout: &Option<f64>,
    attempts: Option<u32>,
    backoff: Option<f64>,
    priority: Option<i32>,
) -> hodei_domain::JobPolicy {
    let ms = |secs: f64| (secs * 1000.0).round().max(0.0) as u64;
    let mut policy = hodei_domain::JobPolicy::default();
    if let Some(secs) = start_timeout {
        policy.schedule_to_start_timeout_ms = ms(*secs);
    }
    if let Some(secs) = run_timeout {
        policy.execution_timeout_ms = ms(*secs);
    }
    if let Some(attempts) = attempts {
        policy.retry.max_attempts = attempts;
    }
    if let Some(secs) = backoff {
        policy.retry.initial_backoff_ms = ms(secs);
        policy.retry.max_backoff_ms = policy.retry.max_backoff_ms.max(ms(secs));
    }
    if let Some(priority) = priority {
        policy.priority = priority;
    }
    policy
}

fn exit_status(job: &JobView) -> u8 {
    match (job.state, job.exit_code) {
        (JobState::Succeeded, _) => 0,
        (JobState::Failed, Some(code)) => u8::try_from(code).unwrap_or(1).max(1),
        (JobState::Timeout, _) => 124,
        (JobState::Cancelled, _) => 130,
        _ => 1,
    }
}
