//! The `workers` table.

use chrono::{DateTime, Utc};
use hodei_domain::{Worker, WorkerState};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{corrupt, Result, StoreError};

#[derive(sqlx::FromRow)]
struct WorkerRow {
    id: Uuid,
    state: String,
    provider: String,
    reserved_job_id: Option<Uuid>,
    pooled: bool,
    max_jobs: i32,
    jobs_run: i32,
    current_job_id: Option<Uuid>,
    token_hash: Option<String>,
    correlation_id: String,
    last_heartbeat_at: Option<DateTime<Utc>>,
    deadline_at: Option<DateTime<Utc>>,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<WorkerRow> for Worker {
    type Error = StoreError;
    fn try_from(row: WorkerRow) -> Result<Worker> {
        Ok(Worker {
            id: row.id,
            state: row.state.parse().map_err(corrupt("worker state"))?,
            provider: row.provider,
            reserved_job_id: row.reserved_job_id,
            pooled: row.pooled,
            max_jobs: u32::try_from(row.max_jobs)
                .map_err(|e| corrupt("worker max_jobs")(e.to_string()))?,
            jobs_run: u32::try_from(row.jobs_run)
                .map_err(|e| corrupt("worker jobs_run")(e.to_string()))?,
            current_job_id: row.current_job_id,
            token_hash: row.token_hash,
            correlation_id: row.correlation_id,
            last_heartbeat_at: row.last_heartbeat_at,
            deadline_at: row.deadline_at,
            version: row.version,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

macro_rules! columns {
    () => {
        "id, state, provider, reserved_job_id, pooled, max_jobs, jobs_run, current_job_id, \
         token_hash, correlation_id, last_heartbeat_at, deadline_at, version, created_at, updated_at"
    };
}
const COLUMNS: &str = columns!();

pub async fn insert(conn: &mut PgConnection, worker: &Worker) -> Result<()> {
    sqlx::query(
        "INSERT INTO workers (id, state, provider, reserved_job_id, current_job_id, token_hash, \
                              correlation_id, last_heartbeat_at, version, created_at, updated_at, deadline_at, \
                              pooled, max_jobs, jobs_run) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
    )
    .bind(worker.id)
    .bind(worker.state.as_str())
    .bind(&worker.provider)
    .bind(worker.reserved_job_id)
    .bind(worker.current_job_id)
    .bind(&worker.token_hash)
    .bind(&worker.correlation_id)
    .bind(worker.last_heartbeat_at)
    .bind(worker.version)
    .bind(worker.created_at)
    .bind(worker.updated_at)
    .bind(worker.deadline_at)
    .bind(worker.pooled)
    .bind(count(worker.max_jobs))
    .bind(count(worker.jobs_run))
    .execute(conn)
    .await?;
    Ok(())
}

/// Write a changed worker if nobody changed it since it was loaded; bumps `worker.version`.
pub async fn update(conn: &mut PgConnection, worker: &mut Worker) -> Result<()> {
    update_many(conn, &mut [worker], None).await
}

/// Write the changed workers in one statement, each only if its row still has the version it
/// was loaded with (a worker changed meanwhile fails them all).
/// The statement begins with `before` (a `WITH` clause that writes outbox rows,
/// [`crate::Tx::save_all`]), if any.
pub(crate) async fn update_many<'q>(
    conn: &mut PgConnection,
    workers: &mut [&mut Worker],
    before: Option<sqlx::QueryBuilder<'q, sqlx::Postgres>>,
) -> Result<()> {
    if workers.is_empty() {
        return Ok(());
    }
    let mut update = before.unwrap_or_else(|| sqlx::QueryBuilder::new(""));
    update.push(
        "UPDATE workers SET state = v.state, reserved_job_id = v.reserved_job_id, \
                            current_job_id = v.current_job_id, token_hash = v.token_hash, \
                            last_heartbeat_at = v.last_heartbeat_at, updated_at = v.updated_at, \
                            version = workers.version + 1, deadline_at = v.deadline_at, \
                            jobs_run = v.jobs_run \
         FROM (",
    );
    // A row of the VALUES list per worker: an id given twice would have one of its writes lost.
    debug_assert_eq!(
        workers
            .iter()
            .map(|one| one.id)
            .collect::<std::collections::HashSet<_>>()
            .len(),
        workers.len(),
        "each worker once"
    );
    update.push_values(workers.iter(), |mut row, worker| {
        row.push_bind(worker.id)
            .push_bind(worker.state.as_str())
            .push_bind(worker.reserved_job_id)
            .push_bind(worker.current_job_id)
            .push_bind(worker.token_hash.clone())
            .push_bind(worker.last_heartbeat_at)
            .push_bind(worker.updated_at)
            .push_bind(worker.version)
            .push_bind(worker.deadline_at)
            .push_bind(count(worker.jobs_run));
    });
    update.push(
        ") AS v(id, state, reserved_job_id, current_job_id, token_hash, last_heartbeat_at, \
                updated_at, version, deadline_at, jobs_run) \
         WHERE workers.id = v.id AND workers.version = v.version RETURNING workers.id",
    );
    let written: Vec<Uuid> = update.build_query_scalar().fetch_all(&mut *conn).await?;
    if let Some(stale) = workers.iter().find(|worker| !written.contains(&worker.id)) {
        return Err(StoreError::VersionConflict {
            aggregate: "worker",
            id: stale.id,
            expected: stale.version,
        });
    }
    for worker in workers.iter_mut() {
        worker.version += 1;
    }
    Ok(())
}

/// Which of `ids` are warm-pool workers with jobs left (no lock; one look for a batch; the
/// ids a list of parameters, [`crate::push_id_list`]).
pub async fn pooled_with_jobs_left(pool: &sqlx::PgPool, ids: &[Uuid]) -> Result<Vec<Uuid>> {
    let rows: Vec<(Uuid,)> = crate::fetch_listed(
        pool,
        "SELECT id FROM workers WHERE id IN ",
        ids,
        " AND pooled AND jobs_run < max_jobs",
    )
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// The workers of `ids` (those that exist), locked for the rest of the transaction in id
/// order, as every transaction that locks several workers locks them: two such never wait
/// for each other in a circle.
pub async fn lock_all(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Worker>> {
    let before = format!("SELECT {COLUMNS} FROM workers WHERE id IN ");
    let rows: Vec<WorkerRow> =
        crate::fetch_listed(conn, &before, ids, " ORDER BY id FOR UPDATE").await?;
    rows.into_iter().map(Worker::try_from).collect()
}

/// The workers of `ending` (those that exist), locked as [`lock_all`] locks them, after the
/// placement lock ([`crate::Store::begin_placing`]), which is taken first, and only if one
/// of `may_go_on` is a warm-pool worker with jobs left (one that may take a next job); and
/// whether it was taken (false too when no worker of `ending` exists). The agents' reports'
/// look, lock and workers in one statement: the look and the lock come first (the workers'
/// rows are locked in a lateral subquery that waits for them), so the lock order is every
/// placement's. The workers' `pooled` and `max_jobs` never change, and `jobs_run` only when
/// the worker takes a job, which a worker reporting its job's end is not doing.
pub async fn lock_reporting(
    conn: &mut PgConnection,
    ending: &[Uuid],
    may_go_on: &[Uuid],
) -> Result<(bool, Vec<Worker>)> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        worker: WorkerRow,
        placing: bool,
    }
    if ending.is_empty() {
        return Ok((false, Vec::new()));
    }
    let mut select = sqlx::QueryBuilder::new("WITH look AS MATERIALIZED (SELECT ");
    match may_go_on.is_empty() {
        true => select.push("false"),
        false => {
            select.push(
                "CASE WHEN EXISTS (SELECT 1 FROM workers WHERE pooled AND jobs_run < max_jobs AND id IN ",
            );
            crate::push_id_list(&mut select, may_go_on);
            select
                .push(") THEN pg_advisory_xact_lock(")
                .push_bind(crate::PLACEMENT_LOCK)
                .push(") IS NOT NULL ELSE false END")
        }
    };
    select.push(format!(
        " AS placing) SELECT w.*, look.placing FROM look CROSS JOIN LATERAL (SELECT {COLUMNS} \
          FROM workers WHERE look.placing IS NOT NULL AND id IN "
    ));
    crate::push_id_list(&mut select, ending);
    select.push(" ORDER BY id FOR UPDATE) w");
    let rows: Vec<Row> = select.build_query_as().fetch_all(conn).await?;
    let placing = rows.first().is_some_and(|row| row.placing);
    let workers = rows
        .into_iter()
        .map(|row| Worker::try_from(row.worker))
        .collect::<Result<_>>()?;
    Ok((placing, workers))
}

pub async fn lock(conn: &mut PgConnection, id: Uuid) -> Result<Option<Worker>> {
    let sql = format!("SELECT {COLUMNS} FROM workers WHERE id = $1 FOR UPDATE");
    let row: Option<WorkerRow> = sqlx::query_as(&sql).bind(id).fetch_optional(conn).await?;
    row.map(Worker::try_from).transpose()
}

/// The job a worker is provisioned for, as its provisioning needs it ([`lock_with_job`]).
#[derive(Debug, Clone)]
pub struct ProvisionedFor {
    pub job_id: Uuid,
    pub spec: hodei_domain::JobSpec,
    pub policy: hodei_domain::JobPolicy,
}

/// [`lock`], with the job the worker was provisioned for (none for a pool worker, or once
/// that job is gone), read in the same statement.
pub async fn lock_with_job(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<(Worker, Option<ProvisionedFor>)>> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        worker: WorkerRow,
        job_id: Option<Uuid>,
        job_spec: Option<sqlx::types::Json<hodei_domain::JobSpec>>,
        job_policy: Option<sqlx::types::Json<hodei_domain::JobPolicy>>,
    }
    let row: Option<Row> = sqlx::query_as(LOCK_WITH_JOB_SQL)
        .bind(id)
        .fetch_optional(conn)
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let job = match (row.job_id, row.job_spec, row.job_policy) {
        (Some(job_id), Some(spec), Some(policy)) => Some(ProvisionedFor {
            job_id,
            spec: spec.0,
            policy: policy.0,
        }),
        _ => None,
    };
    Ok(Some((Worker::try_from(row.worker)?, job)))
}
/// [`lock_with_job`]: the worker's row locked in a subquery, its job joined to it unlocked.
pub const LOCK_WITH_JOB_SQL: &str = concat!(
    "SELECT w.*, j.id AS job_id, j.spec AS job_spec, j.policy AS job_policy FROM (SELECT ",
    columns!(),
    " FROM workers WHERE id = $1 FOR UPDATE) w \
     LEFT JOIN jobs j ON j.id = w.reserved_job_id AND NOT w.pooled"
);

/// [`lock`], and whether any job waits for this worker's teardown (is fenced by it:
/// [`crate::jobs::lock_fenced_by`] would find one), in one statement. A job is fenced by a
/// worker only in the transaction that tears the worker down as lost (the registry's
/// monitor, which locks the worker's row first), so a teardown, which comes after that
/// transaction's commit, sees every such job here.
pub async fn lock_fencing(conn: &mut PgConnection, id: Uuid) -> Result<Option<(Worker, bool)>> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        worker: WorkerRow,
        fences: bool,
    }
    let row: Option<Row> = sqlx::query_as(LOCK_FENCING_SQL)
        .bind(id)
        .fetch_optional(conn)
        .await?;
    row.map(|row| Ok((Worker::try_from(row.worker)?, row.fences)))
        .transpose()
}
/// [`lock_fencing`].
pub const LOCK_FENCING_SQL: &str = concat!(
    "SELECT w.*, EXISTS (SELECT 1 FROM jobs WHERE fenced_by = w.id) AS fences FROM (SELECT ",
    columns!(),
    " FROM workers WHERE id = $1 FOR UPDATE) w"
);

/// The oldest free ready worker, locked ([`lock_free_ready`]).
pub const FREE_READY_SQL: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM workers WHERE state = 'Ready' AND reserved_job_id IS NULL \
      ORDER BY created_at, id LIMIT 1 FOR UPDATE"
);
/// Capacity and pool size ([`count_live`]).
pub const COUNT_LIVE_SQL: &str =
    "SELECT count(*), count(*) FILTER (WHERE pooled AND state <> 'Terminating') \
                                  FROM workers WHERE state <> 'Terminated'";

fn count(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The oldest Ready worker that was not provisioned for a particular job, locked. Call it
/// under the placement lock ([`crate::Store::begin_placing`]): it waits for a row another
/// transaction holds (a heartbeat) instead of skipping it, so a free worker is never missed;
/// a row that no longer matches once that transaction ends is passed over for the next.
pub async fn lock_free_ready(conn: &mut PgConnection) -> Result<Option<Worker>> {
    let row: Option<WorkerRow> = sqlx::query_as(FREE_READY_SQL).fetch_optional(conn).await?;
    row.map(Worker::try_from).transpose()
}

/// The free ready worker [`lock_free_ready`] would lock, locked, but only if a new process
/// job of concurrency key `key` (limit `max`), not written yet, would be the next to place,
/// as [`crate::jobs::lock_next_pending`] would find it once written: no process job waits to
/// be placed, and its key has a slot free. Else `None`, and nothing is locked. Call it under
/// the placement lock ([`crate::Store::begin_placing`]).
pub async fn lock_free_ready_for_first(
    conn: &mut PgConnection,
    key: &str,
    max: Option<i32>,
) -> Result<Option<Worker>> {
    let row: Option<WorkerRow> = sqlx::query_as(FREE_READY_FOR_FIRST_SQL)
        .bind(key)
        .bind(max)
        .fetch_optional(conn)
        .await?;
    row.map(Worker::try_from).transpose()
}
/// [`lock_free_ready_for_first`]: the job's condition has no row of its own, so PostgreSQL
/// evaluates it once, before the scan of the free workers (the first pending entry of the
/// queue's index that is a process job; the key's placed jobs only if it has a limit).
pub const FREE_READY_FOR_FIRST_SQL: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM workers WHERE state = 'Ready' AND reserved_job_id IS NULL \
        AND (SELECT 1 FROM jobs WHERE state = 'Pending' AND not_before IS NULL \
                                  AND NOT (spec ? 'image') \
             ORDER BY concurrency_key LIMIT 1) IS NULL \
        AND ($2::int4 IS NULL OR (SELECT count(*) FROM jobs WHERE concurrency_key = $1 \
                                     AND state IN ('Assigned', 'Scheduled', 'Running')) < $2) \
      ORDER BY created_at, id LIMIT 1 FOR UPDATE"
);

/// Whether any pool worker is alive and not on its way out, as [`count_live`] counts them
/// (no lock).
pub async fn any_live_pooled(pool: &PgPool) -> Result<bool> {
    let (any,): (bool,) = sqlx::query_as(ANY_LIVE_POOLED_SQL).fetch_one(pool).await?;
    Ok(any)
}
pub const ANY_LIVE_POOLED_SQL: &str = "SELECT EXISTS (SELECT 1 FROM workers \
                                       WHERE pooled AND state <> 'Terminated' AND state <> 'Terminating')";

/// Up to `limit` Ready pool workers (newest first: the oldest keep serving), locked.
pub async fn lock_idle_pooled(conn: &mut PgConnection, limit: u32) -> Result<Vec<Worker>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM workers WHERE state = 'Ready' AND pooled \
         ORDER BY created_at DESC, id DESC LIMIT $1 FOR UPDATE"
    );
    let rows: Vec<WorkerRow> = sqlx::query_as(&sql)
        .bind(i64::from(limit))
        .fetch_all(conn)
        .await?;
    rows.into_iter().map(Worker::try_from).collect()
}

/// Workers alive (not Terminated): all of them, and the pool's members that are not going
/// away (the pool's size counts those).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Live {
    pub workers: u32,
    pub pool_members: u32,
}

pub async fn count_live(conn: &mut PgConnection) -> Result<Live> {
    let (workers, pool_members): (i64, i64) =
        sqlx::query_as(COUNT_LIVE_SQL).fetch_one(conn).await?;
    Ok(Live {
        workers: u32::try_from(workers).unwrap_or(u32::MAX),
        pool_members: u32::try_from(pool_members).unwrap_or(u32::MAX),
    })
}

/// Liveness is recorded on the rows of the workers that sent a heartbeat (and moves the
/// deadline of a Ready, Busy or Draining worker to `lost_at`): one statement for a batch, its
/// rows locked in id order (two registries' batches never deadlock). It is not a state change
/// and emits no event. Returns how many workers it recorded (unknown and ended ones are not).
pub async fn record_heartbeats(
    pool: &PgPool,
    ids: &[Uuid],
    at: DateTime<Utc>,
    lost_at: DateTime<Utc>,
) -> Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    // The ids a list of parameters ([`crate::push_id_list`]).
    let mut update =
        sqlx::QueryBuilder::new("WITH beating AS (SELECT id FROM workers WHERE id IN ");
    crate::push_id_list(&mut update, ids);
    update
        .push(
            " AND state <> 'Terminated' ORDER BY id FOR UPDATE) \
             UPDATE workers w SET last_heartbeat_at = ",
        )
        .push_bind(at)
        .push(", deadline_at = CASE WHEN w.state IN ('Ready', 'Busy', 'Draining') THEN ")
        .push_bind(lost_at)
        .push(" ELSE w.deadline_at END FROM beating WHERE w.id = beating.id");
    let result = update.build().execute(pool).await?;
    Ok(result.rows_affected())
}

pub async fn list(
    pool: &PgPool,
    state: Option<WorkerState>,
    limit: u32,
    cursor: Option<&str>,
) -> Result<(Vec<Worker>, Option<String>)> {
    let (at, id) = crate::page_start(cursor);
    let sql = format!(
        "SELECT {COLUMNS} FROM workers \
         WHERE ($1::text IS NULL OR state = $1) \
           AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3)) \
         ORDER BY created_at DESC, id DESC LIMIT $4"
    );
    let rows: Vec<WorkerRow> = sqlx::query_as(&sql)
        .bind(state.map(WorkerState::as_str))
        .bind(at)
        .bind(id)
        .bind(i64::from(limit) + 1)
        .fetch_all(pool)
        .await?;
    let workers = rows
        .into_iter()
        .map(Worker::try_from)
        .collect::<Result<Vec<_>>>()?;
    Ok(crate::page_of(workers, limit, |x| (x.created_at, x.id)))
}

/// Workers whose deadline is over, most overdue first.
pub async fn due(pool: &PgPool, limit: i64) -> Result<Vec<Uuid>> {
    let rows: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT id FROM workers WHERE deadline_at <= now() ORDER BY deadline_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// The earliest deadline of any worker, to sleep until.
pub async fn next_due(pool: &PgPool) -> Result<Option<DateTime<Utc>>> {
    let (at,): (Option<DateTime<Utc>>,) =
        sqlx::query_as("SELECT min(deadline_at) FROM workers WHERE deadline_at IS NOT NULL")
            .fetch_one(pool)
            .await?;
    Ok(at)
}

/// Those of `ids` that are workers not yet Terminated (by primary key).
pub async fn live_among(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<Uuid>> {
    let rows: Vec<(Uuid,)> = crate::fetch_listed(
        pool,
        "SELECT id FROM workers WHERE id IN ",
        ids,
        " AND state <> 'Terminated'",
    )
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// The workers of `ids` that exist, unlocked: a look that decides whether a change needs
/// them locked at all.
pub async fn get_all(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<Worker>> {
    let before = format!("SELECT {COLUMNS} FROM workers WHERE id IN ");
    let rows: Vec<WorkerRow> = crate::fetch_listed(pool, &before, ids, "").await?;
    rows.into_iter().map(Worker::try_from).collect()
}

/// One worker, unlocked (for views).
pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<Worker>> {
    let sql = format!("SELECT {COLUMNS} FROM workers WHERE id = $1");
    let row: Option<WorkerRow> = sqlx::query_as(&sql).bind(id).fetch_optional(pool).await?;
    row.map(Worker::try_from).transpose()
}

/// Workers alive, and of the warm pool's members alive how many are free (Ready, no job).
pub async fn occupancy(pool: &PgPool) -> Result<(u32, u32, u32)> {
    let (alive, pool_members, free): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE pooled), \
                count(*) FILTER (WHERE pooled AND state = 'Ready' AND reserved_job_id IS NULL) \
         FROM workers WHERE state <> 'Terminated'",
    )
    .fetch_one(pool)
    .await?;
    let n = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
    Ok((n(alive), n(pool_members), n(free)))
}
