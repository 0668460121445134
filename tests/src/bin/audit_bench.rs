//! `hodei-audit-bench`: how fast the audit API's queries are over a large audit log.
//!
//! It creates a database of its own (`hodei_bench_<random>`) on the PostgreSQL server, runs the
//! migrations, loads `--rows` audit rows shaped like real ones (11 events per job under the
//! job's correlation id, the actors that cause them, a month of time, small payloads) in one
//! `INSERT ... SELECT` from `generate_series`, and then times every kind of query the audit API
//! answers through `hodei_store::audit::query`, the code path the audit service runs. It prints
//! each kind's plan (`EXPLAIN (ANALYZE, BUFFERS)` of the same statement) and exits 1 when a plan
//! reads the whole table (`Seq Scan on audit_log`). Its database is dropped at the end.
//!
//! ```sh
//! cargo run -p hodei-tests --bin hodei-audit-bench -- --rows 1000000 --out BENCHMARKS.md
//! ```

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use hodei_protocol::api::AuditQuery;
use hodei_store::audit;
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// The life of a job as the audit log records it: event type, aggregate, actor (`agent` is the
/// job's worker, `worker:<id>`), milliseconds after the job was created, and whether the job's
/// own run time comes before it.
const STEPS: [(&str, &str, &str, u32, bool); 11] = [
    ("JobCreated", "job", "scheduler", 0, false),
    ("JobQueued", "job", "scheduler", 2, false),
    ("JobAssigned", "job", "dispatcher", 9, false),
    (
        "WorkerProvisioningRequested",
        "worker",
        "dispatcher",
        9,
        false,
    ),
    ("WorkerProvisioned", "worker", "provider-manager", 48, false),
    ("WorkerRegistered", "worker", "agent", 310, false),
    ("WorkerStatusChanged", "worker", "registry", 321, false),
    ("JobStatusChanged", "job", "agent", 335, false),
    ("JobCompleted", "job", "agent", 335, true),
    ("WorkerTerminating", "worker", "registry", 338, true),
    ("WorkerTerminated", "worker", "provider-manager", 390, true),
];

const SERVICES: [&str; 4] = ["scheduler", "dispatcher", "registry", "provider-manager"];

/// The month the loaded events occurred in.
const FIRST_EVENT: &str = "2026-10-01T00:00:00Z";
const SPAN_MS: u64 = 30 * 24 * 3600 * 1000;

/// Load the audit log with `--rows` events of jobs' lives and time every kind of audit query
/// (by correlation id, event type, time range, actor), with each query's plan.
#[derive(clap::Parser)]
#[command(name = "hodei-audit-bench")]
struct Options {
    /// Audit rows to load (at least one job's life).
    #[arg(long, value_name = "N", default_value = "1000000", value_parser = rows)]
    rows: u64,
    /// Timed queries per kind, each with another key.
    #[arg(long, value_name = "N", default_value = "200", value_parser = repeat)]
    repeat: usize,
    /// Append the results, the machine and the command line to FILE (markdown).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// A database on the server to create the benchmark's own from (default
    /// $HODEI_TEST_ADMIN_DATABASE_URL, else postgres://postgres@127.0.0.1:5432/postgres).
    #[arg(long, value_name = "URL", default_value_t = hodei_tests::admin_url(), hide_default_value = true)]
    admin_url: String,
    /// Seed of the choice of keys.
    #[arg(long, value_name = "N", default_value = "1", value_parser = hodei_tests::parse_number::<u64>)]
    seed: u64,
}

fn rows(value: &str) -> Result<u64, String> {
    match hodei_tests::parse_number(value)? {
        n if n < STEPS.len() as u64 => {
            Err(format!("at least {} rows (one job's life)", STEPS.len()))
        }
        n => Ok(n),
    }
}

fn repeat(value: &str) -> Result<usize, String> {
    match hodei_tests::parse_number(value)? {
        0 => Err("at least 1".into()),
        n => Ok(n),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let options = <Options as clap::Parser>::parse();
    let name = format!("hodei_bench_{}", Uuid::new_v4().simple());
    let admin = match PgPool::connect(&options.admin_url).await {
        Ok(admin) => admin,
        Err(error) => {
            eprintln!(
                "hodei-audit-bench: cannot reach {}: {error}",
                options.admin_url
            );
            return ExitCode::FAILURE;
        }
    };
    if let Err(error) = sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
    {
        eprintln!("hodei-audit-bench: cannot create database {name}: {error}");
        return ExitCode::FAILURE;
    }
    let base = options
        .admin_url
        .rsplit_once('/')
        .map(|(base, _)| base)
        .unwrap_or(&options.admin_url);
    let url = format!("{base}/{name}");
    eprintln!("database {name}");

    let outcome = bench(&options, &url).await;

    if let Err(error) = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&admin)
        .await
    {
        eprintln!("hodei-audit-bench: could not drop database {name}: {error}");
    }
    admin.close().await;
    match outcome {
        Ok(seq_scans) if seq_scans.is_empty() => ExitCode::SUCCESS,
        Ok(seq_scans) => {
            eprintln!(
                "hodei-audit-bench: FAILED: these queries read the whole audit_log (Seq Scan):"
            );
            for kind in seq_scans {
                eprintln!("  - {kind}");
            }
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("hodei-audit-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Load, measure, report; returns the query kinds whose plan scans the whole table.
async fn bench(options: &Options, url: &str) -> anyhow::Result<Vec<String>> {
    let pool = hodei_store::connect_and_migrate(url, 8)
        .await
        .context("connect and migrate")?;

    let started = Instant::now();
    load(&pool, options.rows)
        .await
        .context("load the audit log")?;
    let load_time = started.elapsed();
    let started = Instant::now();
    sqlx::raw_sql("VACUUM ANALYZE audit_log")
        .execute(&pool)
        .await
        .context("VACUUM ANALYZE")?;
    // The load left gigabytes of dirty pages: written back now, not by the checkpointer while
    // the queries are timed. (A 10,000,000-row run without this had p99s of up to 246 ms
    // where the server's execution stayed under 0.5 ms; with it every p99 was under 5 ms.)
    // A live audit log grows by a few rows a millisecond, not by gigabytes at once.
    sqlx::raw_sql("CHECKPOINT")
        .execute(&pool)
        .await
        .context("CHECKPOINT")?;
    let vacuum_time = started.elapsed();
    let (table_size, index_size): (String, String) = sqlx::query_as(
        "SELECT pg_size_pretty(pg_table_size('audit_log')), pg_size_pretty(pg_indexes_size('audit_log'))",
    )
    .fetch_one(&pool)
    .await?;
    eprintln!(
        "loaded {} rows in {:.1} s, VACUUM ANALYZE and CHECKPOINT {:.1} s; table {table_size}, indexes {index_size}",
        options.rows,
        load_time.as_secs_f64(),
        vacuum_time.as_secs_f64()
    );

    let kinds = query_kinds(&pool, options)
        .await
        .context("choose the keys of the queries")?;
    check_paging(&pool, &kinds)
        .await
        .context("check the pages")?;
    let mut results = Vec::new();
    let mut seq_scans = Vec::new();
    for kind in &kinds {
        let result = measure(&pool, kind)
            .await
            .with_context(|| format!("measure {}", kind.name))?;
        println!("\n### {}\n\n```\n{}\n```", kind.name, result.plan);
        if result.seq_scan {
            seq_scans.push(kind.name.to_owned());
        }
        eprintln!(
            "{:<55} p50 {:>8.2} ms  p99 {:>8.2} ms  ({})",
            kind.name,
            ms(result.percentile(0.50)),
            ms(result.percentile(0.99)),
            result.indexes
        );
        results.push(result);
    }

    let report = report(
        options,
        &pool,
        &kinds,
        &results,
        load_time,
        &table_size,
        &index_size,
    )
    .await?;
    println!("\n{report}");
    if let Some(path) = &options.out {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        write!(file, "\n{report}").with_context(|| format!("write {}", path.display()))?;
        eprintln!("appended to {}", path.display());
    }
    pool.close().await;
    Ok(seq_scans)
}

/// One `INSERT ... SELECT`: job `j` is created at a random moment of its slot of the month, and
/// its events follow at the offsets of [`STEPS`]; rows are inserted in the order they occurred,
/// so `seq` follows `occurred_at` as it does when the audit service records events as they come.
async fn load(pool: &PgPool, rows: u64) -> anyhow::Result<()> {
    let steps = STEPS
        .iter()
        .enumerate()
        .map(|(i, (event_type, aggregate, actor, after_ms, after_run))| {
            format!("({i}, '{event_type}', '{aggregate}', '{actor}', {after_ms}, {after_run})")
        })
        .collect::<Vec<_>>()
        .join(",\n               ");
    let jobs = rows.div_ceil(STEPS.len() as u64);
    let slot_ms = SPAN_MS as f64 / jobs as f64;
    let sql = format!(
        "WITH steps (step, event_type, aggregate_type, actor, after_ms, after_run) AS (
            VALUES {steps}
        ),
        jobs AS (
            SELECT j AS job,
                   md5('job' || j)::uuid AS job_id,
                   md5('worker' || j)::uuid AS worker_id,
                   md5('correlation' || j) AS correlation_id,
                   $2::timestamptz + interval '1 millisecond'
                       * ((j + 0.9 * ((hashint8(j) & 2147483647)::float8 / 2147483648.0)) * $3::float8) AS created_at,
                   100 + (hashint8(j + 1000000007) & 2147483647) % 120000 AS run_ms,
                   (hashint8(j + 7) & 15) = 0 AS failed
            FROM generate_series(0::bigint, $4::bigint - 1) AS j
        ),
        events AS (
            SELECT jobs.*, steps.*,
                   created_at + interval '1 millisecond'
                       * (after_ms + CASE WHEN after_run THEN run_ms ELSE 0 END) AS occurred_at
            FROM jobs CROSS JOIN steps
            WHERE job * {n_steps} + step < $1
        )
        INSERT INTO audit_log (event_id, occurred_at, recorded_at, event_type, aggregate_type, aggregate_id,
                               correlation_id, actor, payload)
        SELECT gen_random_uuid(),
               occurred_at,
               occurred_at + interval '4 milliseconds',
               event_type,
               aggregate_type,
               CASE aggregate_type WHEN 'job' THEN job_id ELSE worker_id END,
               correlation_id,
               CASE actor WHEN 'agent' THEN 'worker:' || worker_id ELSE actor END,
               CASE
                   WHEN step = 0 THEN jsonb_build_object('job_id', job_id, 'command', 'make',
                                                         'args', jsonb_build_array('build', 'job-' || job))
                   WHEN event_type = 'JobCompleted' THEN
                       jsonb_build_object('job_id', job_id, 'state', CASE WHEN failed THEN 'Failed' ELSE 'Succeeded' END,
                                          'exit_code', CASE WHEN failed THEN 2 ELSE 0 END)
                   WHEN aggregate_type = 'job' THEN jsonb_build_object('job_id', job_id, 'worker_id', worker_id)
                   ELSE jsonb_build_object('worker_id', worker_id, 'job_id', job_id, 'provider', 'process')
               END
        FROM events
        ORDER BY occurred_at, job, step",
        n_steps = STEPS.len(),
    );
    let first: DateTime<Utc> = FIRST_EVENT.parse().expect("a valid time");
    let mut conn = pool.acquire().await?;
    // The sort of the whole load fits in memory instead of spilling to temporary files.
    sqlx::query("SET work_mem = '512MB'")
        .execute(&mut *conn)
        .await?;
    let inserted = sqlx::query(&sql)
        .bind(rows as i64)
        .bind(first)
        .bind(slot_ms)
        .bind(jobs as i64)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    sqlx::query("RESET work_mem").execute(&mut *conn).await?;
    if inserted != rows {
        bail!("inserted {inserted} rows instead of {rows}");
    }
    Ok(())
}

/// One kind of query: its name in the table and the queries to time, one per key.
struct Kind {
    name: &'static str,
    queries: Vec<AuditQuery>,
}

/// A small deterministic generator (xorshift64*), so that a run's keys can be chosen again.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `[low, high)`.
    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low).max(1)
    }
    fn fraction(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The keys: rows picked at random (their correlation ids, aggregates, worker actors), hours
/// picked at random between 10 % and 90 % of the month, and cursors in the second half.
async fn query_kinds(pool: &PgPool, options: &Options) -> anyhow::Result<Vec<Kind>> {
    let n = options.repeat;
    let mut rng = Rng(options.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (max_seq, first, last): (i64, DateTime<Utc>, DateTime<Utc>) =
        sqlx::query_as("SELECT max(seq), min(occurred_at), max(occurred_at) FROM audit_log")
            .fetch_one(pool)
            .await?;
    let max_seq = max_seq as u64;

    let picked: Vec<i64> = (0..n * 8)
        .map(|_| rng.between(1, max_seq + 1) as i64)
        .collect();
    let sampled = sqlx::query(
        "SELECT correlation_id, aggregate_id, actor FROM audit_log WHERE seq = ANY($1)",
    )
    .bind(&picked)
    .fetch_all(pool)
    .await?;
    let cycle =
        |values: Vec<String>| -> Vec<String> { values.iter().cycle().take(n).cloned().collect() };
    let correlations = cycle(sampled.iter().map(|r| r.get("correlation_id")).collect());
    let aggregates: Vec<Uuid> = sampled
        .iter()
        .map(|r| r.get("aggregate_id"))
        .cycle()
        .take(n)
        .collect();
    let workers = cycle(
        sampled
            .iter()
            .map(|r| r.get::<String, _>("actor"))
            .filter(|a| a.starts_with("worker:"))
            .collect(),
    );
    if correlations.len() < n || workers.len() < n {
        bail!("too few rows to pick keys from");
    }
    let types: Vec<String> = (0..n)
        .map(|i| STEPS[i % STEPS.len()].0.to_owned())
        .collect();
    let services: Vec<String> = (0..n)
        .map(|i| SERVICES[i % SERVICES.len()].to_owned())
        .collect();
    let span = (last - first).num_milliseconds() as f64;
    let mut moment =
        || first + chrono::Duration::milliseconds((span * (0.1 + 0.8 * rng.fraction())) as i64);
    let hours: Vec<(DateTime<Utc>, DateTime<Utc>)> = (0..n)
        .map(|_| moment())
        .map(|from| (from, from + chrono::Duration::hours(1)))
        .collect();
    let since: Vec<DateTime<Utc>> = (0..n).map(|_| moment()).collect();
    let deep: Vec<String> = (0..n)
        .map(|_| rng.between(max_seq / 2, max_seq * 9 / 10).to_string())
        .collect();

    let q = AuditQuery::default;
    let mut kinds = vec![
        Kind {
            name: "correlation id (one job's trail)",
            queries: correlations
                .iter()
                .map(|c| AuditQuery {
                    correlation_id: Some(c.clone()),
                    ..q()
                })
                .collect(),
        },
        Kind {
            name: "event type, first page",
            queries: types
                .iter()
                .map(|t| AuditQuery {
                    event_type: Some(t.clone()),
                    ..q()
                })
                .collect(),
        },
        Kind {
            name: "event type, a page deep (cursor past half the log)",
            queries: types
                .iter()
                .zip(&deep)
                .map(|(t, c)| AuditQuery {
                    event_type: Some(t.clone()),
                    cursor: Some(c.clone()),
                    ..q()
                })
                .collect(),
        },
        Kind {
            name: "actor = a service, first page",
            queries: services
                .iter()
                .map(|a| AuditQuery {
                    actor: Some(a.clone()),
                    ..q()
                })
                .collect(),
        },
        Kind {
            name: "actor = worker:<id>",
            queries: workers
                .iter()
                .map(|a| AuditQuery {
                    actor: Some(a.clone()),
                    ..q()
                })
                .collect(),
        },
        Kind {
            name: "aggregate id (a job or a worker)",
            queries: aggregates
                .iter()
                .map(|a| AuditQuery {
                    aggregate_id: Some(*a),
                    ..q()
                })
                .collect(),
        },
        Kind {
            name: "time range of 1 h, first page",
            queries: hours
                .iter()
                .map(|(from, to)| AuditQuery {
                    from: Some(*from),
                    to: Some(*to),
                    ..q()
                })
                .collect(),
        },
        Kind {
            name: "time range of 1 h, second page",
            queries: Vec::new(),
        },
        Kind {
            name: "from a time on (no end), first page",
            queries: since
                .iter()
                .map(|from| AuditQuery {
                    from: Some(*from),
                    ..q()
                })
                .collect(),
        },
        Kind {
            name: "event type + time range of 1 h",
            queries: types
                .iter()
                .zip(&hours)
                .map(|(t, (from, to))| AuditQuery {
                    event_type: Some(t.clone()),
                    from: Some(*from),
                    to: Some(*to),
                    ..q()
                })
                .collect(),
        },
        Kind {
            name: "event type + from a time on",
            queries: types
                .iter()
                .zip(&since)
                .map(|(t, from)| AuditQuery {
                    event_type: Some(t.clone()),
                    from: Some(*from),
                    ..q()
                })
                .collect(),
        },
        Kind {
            name: "actor = a service + time range of 1 h",
            queries: services
                .iter()
                .zip(&hours)
                .map(|(a, (from, to))| AuditQuery {
                    actor: Some(a.clone()),
                    from: Some(*from),
                    to: Some(*to),
                    ..q()
                })
                .collect(),
        },
    ];
    // A second page is asked with the cursor a first page handed out (small logs may have none).
    let mut second_pages = Vec::with_capacity(n);
    for first_page in &kinds[6].queries {
        if let (_, Some(next)) = audit::query(pool, first_page).await? {
            second_pages.push(AuditQuery {
                cursor: Some(next),
                ..first_page.clone()
            });
        }
    }
    kinds[7].queries = second_pages.iter().cycle().take(n).cloned().collect();
    kinds.retain(|kind| !kind.queries.is_empty());
    Ok(kinds)
}

/// Paging through a time range, alone and with an event type, or through an event type from a
/// cursor on, yields every matching row once, in the order the store promises.
async fn check_paging(pool: &PgPool, kinds: &[Kind]) -> anyhow::Result<()> {
    let checks = [
        ("time range of 1 h, first page", true),
        ("event type + time range of 1 h", true),
        ("event type + from a time on", true),
        ("event type, a page deep (cursor past half the log)", false),
    ];
    for (name, by_time) in checks {
        let Some(query) = kinds
            .iter()
            .find(|k| k.name == name)
            .and_then(|k| k.queries.first())
        else {
            continue;
        };
        let mut paged = Vec::new();
        let mut page_query = AuditQuery {
            limit: Some(97),
            ..query.clone()
        };
        loop {
            let (page, next) = audit::query(pool, &page_query).await?;
            paged.extend(page.iter().map(|e| e.seq));
            match next {
                Some(cursor) => page_query.cursor = Some(cursor),
                None => break,
            }
        }
        let order = if by_time { "occurred_at, seq" } else { "seq" };
        let expected: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT seq FROM audit_log
             WHERE ($1::text IS NULL OR event_type = $1) AND ($2::timestamptz IS NULL OR occurred_at >= $2)
               AND ($3::timestamptz IS NULL OR occurred_at < $3) AND seq > $4
             ORDER BY {order}"
        ))
        .bind(&query.event_type)
        .bind(query.from)
        .bind(query.to)
        .bind(query.cursor.as_deref().map_or(0, |c| c.parse::<i64>().unwrap_or(0)))
        .fetch_all(pool)
        .await?;
        if paged != expected {
            bail!(
                "paging through \"{name}\" gave {} rows, not the {} expected in order",
                paged.len(),
                expected.len()
            );
        }
        eprintln!(
            "paged through all {} rows of \"{name}\": each once, in order",
            paged.len()
        );
    }
    Ok(())
}

struct Measured {
    /// Sorted, fastest first.
    times: Vec<Duration>,
    rows: usize,
    /// The slowest "Execution Time" of the plans explained, in ms: the server's share.
    server_ms: f64,
    plan: String,
    indexes: String,
    seq_scan: bool,
}

impl Measured {
    /// Nearest-rank percentile.
    fn percentile(&self, p: f64) -> Duration {
        let rank = ((p * self.times.len() as f64).ceil() as usize).clamp(1, self.times.len());
        self.times[rank - 1]
    }
}

/// Warm up on a few keys, then time every query once; explain a few of them.
async fn measure(pool: &PgPool, kind: &Kind) -> anyhow::Result<Measured> {
    for query in kind.queries.iter().take(5) {
        audit::query(pool, query).await?;
    }
    let mut times = Vec::with_capacity(kind.queries.len());
    let mut rows = 0;
    for query in &kind.queries {
        let started = Instant::now();
        let (page, _) = audit::query(pool, query).await?;
        times.push(started.elapsed());
        rows += page.len();
    }
    times.sort();

    let mut plans = Vec::new();
    for query in kind.queries.iter().take(3) {
        plans.push(audit::explain(pool, query).await?);
    }
    let seq_scan = plans
        .iter()
        .any(|plan| plan.contains("Seq Scan on audit_log"));
    let server_ms = plans
        .iter()
        .filter_map(|plan| {
            plan.lines()
                .find_map(|l| l.trim().strip_prefix("Execution Time:"))
        })
        .filter_map(|t| t.trim().trim_end_matches("ms").trim().parse::<f64>().ok())
        .fold(0.0, f64::max);
    let mut indexes: Vec<String> = Vec::new();
    for plan in &plans {
        for line in plan.lines() {
            let used = line
                .split_once(" using ")
                .or_else(|| line.split_once("Bitmap Index Scan on "));
            if let Some(name) = used.and_then(|(_, rest)| rest.split_whitespace().next()) {
                if !indexes.iter().any(|i| i == name) {
                    indexes.push(name.to_owned());
                }
            }
        }
    }
    if seq_scan {
        indexes.push("**Seq Scan on audit_log**".to_owned());
    }
    Ok(Measured {
        rows: rows / kind.queries.len().max(1),
        server_ms,
        plan: plans.swap_remove(0),
        indexes: if indexes.is_empty() {
            "-".to_owned()
        } else {
            indexes.join(", ")
        },
        seq_scan,
        times,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn with_commas(n: u64) -> String {
    let digits = n.to_string();
    let head = digits.len() % 3;
    let groups = digits.as_bytes()[head..]
        .chunks(3)
        .map(|g| std::str::from_utf8(g).expect("ASCII digits"));
    (head > 0)
        .then_some(&digits[..head])
        .into_iter()
        .chain(groups)
        .collect::<Vec<_>>()
        .join(",")
}

/// The markdown section: what was run, on what, and the table.
async fn report(
    options: &Options,
    pool: &PgPool,
    kinds: &[Kind],
    results: &[Measured],
    load_time: Duration,
    table_size: &str,
    index_size: &str,
) -> anyhow::Result<String> {
    let (version, shared_buffers, work_mem): (String, String, String) = sqlx::query_as(
        "SELECT version(), current_setting('shared_buffers'), current_setting('work_mem')",
    )
    .fetch_one(pool)
    .await?;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    // Other work on the machine shows in the tails; say how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into());
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };

    let mut s = String::new();
    writeln!(
        s,
        "## Audit queries over {} rows\n",
        with_commas(options.rows)
    )?;
    writeln!(
        s,
        "Measured {} with:\n\n```sh\n{command}\n```\n",
        Utc::now().format("%Y-%m-%d %H:%M UTC")
    )?;
    writeln!(
        s,
        "- machine: {nproc} CPUs ({cpu}), {memory} of memory; load average at the end {load}"
    )?;
    writeln!(
        s,
        "- PostgreSQL: {version}; shared_buffers {shared_buffers}, work_mem {work_mem}"
    )?;
    writeln!(s, "- client: `hodei-audit-bench`, {profile} build, through `hodei_store::audit::query` (one connection at a time)")?;
    writeln!(
        s,
        "- data: {} rows (~{} per job under one correlation id, 30 days), loaded in {:.0} s; table {table_size}, \
         indexes {index_size}; `VACUUM ANALYZE` and `CHECKPOINT` before measuring",
        with_commas(options.rows),
        STEPS.len(),
        load_time.as_secs_f64()
    )?;
    writeln!(
        s,
        "- each kind: {} queries, each with another key (5 untimed first), page size 100; time from call to \
         decoded page, in ms; \"server\" is the slowest `Execution Time` of three of them under \
         `EXPLAIN (ANALYZE, BUFFERS)`, and \"plan uses\" the indexes of those plans\n",
        options.repeat
    )?;
    writeln!(
        s,
        "| query | rows/page | p50 | p90 | p99 | max | server | plan uses |"
    )?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---|")?;
    for (kind, r) in kinds.iter().zip(results) {
        writeln!(
            s,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            kind.name,
            r.rows,
            ms(r.percentile(0.50)),
            ms(r.percentile(0.90)),
            ms(r.percentile(0.99)),
            ms(*r.times.last().expect("at least one query")),
            r.server_ms,
            r.indexes
        )?;
    }
    Ok(s)
}
