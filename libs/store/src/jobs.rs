//! The `jobs` table.

use chrono::{DateTime, Utc};
use hodei_domain::{Job, JobPolicy, JobSpec, JobState};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{corrupt, Result, StoreError};

#[derive(sqlx::FromRow)]
struct JobRow {
    id: Uuid,
    state: String,
    spec: sqlx::types::Json<JobSpec>,
    attempt: i32,
    worker_id: Option<Uuid>,
    exit_code: Option<i32>,
    error: Option<String>,
    correlation_id: String,
    idempotency_key: Option<String>,
    policy: sqlx::types::Json<JobPolicy>,
    start_by: DateTime<Utc>,
    deadline_at: Option<DateTime<Utc>>,
    not_before: Option<DateTime<Utc>>,
    fenced_by: Option<Uuid>,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<JobRow> for Job {
    type Error = StoreError;
    fn try_from(row: JobRow) -> Result<Job> {
        Ok(Job {
            id: row.id,
            state: row.state.parse().map_err(corrupt("job state"))?,
            spec: row.spec.0,
            attempt: u32::try_from(row.attempt)
                .map_err(|e| corrupt("job attempt")(e.to_string()))?,
            worker_id: row.worker_id,
            exit_code: row.exit_code,
            error: row.error,
            correlation_id: row.correlation_id,
            idempotency_key: row.idempotency_key,
            policy: row.policy.0,
            start_by: row.start_by,
            deadline_at: row.deadline_at,
            not_before: row.not_before,
            fenced_by: row.fenced_by,
            version: row.version,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

macro_rules! columns {
    () => {
        "id, state, spec, attempt, worker_id, exit_code, error, correlation_id, \
         idempotency_key, policy, start_by, deadline_at, not_before, fenced_by, version, created_at, \
         updated_at"
    };
}
const COLUMNS: &str = columns!();

/// The job a worker was provisioned for, if it still waits for it ([`lock_scheduled_on`]).
pub const SCHEDULED_ON_SQL: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM jobs WHERE worker_id = $1 AND state = 'Scheduled' FOR UPDATE"
);
/// The `WITH` part of the queue's statements ([`QueueSql`]): `heads`, every key's jobs of
/// `kinds` that may go, at most `limit` of each, with their key's `placed` and their `rank`
/// in it.
///
/// The kinds and the limit are written into the text: the queue's statements take no
/// parameters, so PostgreSQL plans each once per connection and keeps that plan. With the
/// kinds or the count as parameters it estimated its generic plan (the same plan) dearer
/// than one made for the values, and planned the statement again at every call: 0.4 to 1 ms
/// of a busy server's CPU each time, three times the execution.
fn heads_cte(kinds: Kinds, limit: usize) -> String {
    let of_kinds = match kinds {
        Kinds::Any => "",
        Kinds::Processes => " AND NOT (spec ? 'image')",
        Kinds::Containers => " AND spec ? 'image'",
    };
    format!(
        "WITH RECURSIVE keys(k) AS ( \
         (SELECT concurrency_key FROM jobs WHERE state = 'Pending' AND not_before IS NULL{of_kinds} \
          ORDER BY concurrency_key LIMIT 1) \
         UNION ALL \
         SELECT (SELECT concurrency_key FROM jobs \
                 WHERE state = 'Pending' AND not_before IS NULL AND concurrency_key > keys.k{of_kinds} \
                 ORDER BY concurrency_key LIMIT 1) \
         FROM keys WHERE keys.k IS NOT NULL \
     ), heads AS MATERIALIZED ( \
         SELECT h.id, h.priority, h.created_at, h.rank, p.placed \
         FROM keys \
         CROSS JOIN LATERAL ( \
             SELECT count(*) AS placed FROM jobs WHERE concurrency_key = keys.k \
               AND state IN ('Assigned', 'Scheduled', 'Running')) p \
         CROSS JOIN LATERAL ( \
             SELECT r.id, r.priority, r.created_at, r.rank, \
                    bool_and(r.concurrency_max IS NULL OR p.placed + r.rank < r.concurrency_max) \
                        OVER (ORDER BY r.rank) AS open \
             FROM ( \
                 SELECT id, priority, created_at, concurrency_max, \
                        row_number() OVER (ORDER BY priority DESC, created_at, id) - 1 AS rank \
                 FROM jobs \
                 WHERE concurrency_key = keys.k AND state = 'Pending' AND not_before IS NULL{of_kinds} \
                 ORDER BY priority DESC, created_at, id LIMIT {limit}) r) h \
         WHERE keys.k IS NOT NULL AND h.open \
     ) "
    )
}

/// The next job placement may take, as an id ([`lock_next_pending`]), for views and for the
/// look on accepting a job: of the keys with waiting jobs (`concurrency_key`, '' for jobs
/// without one), each key's jobs by priority then age, the `r`-th (from 0) counted as if the
/// `r` before it were placed; a job goes only while fewer than its own `max` of its key are
/// placed, and one that may not go holds back the rest of its key. Then the highest
/// priority, the key with the fewest jobs placed (so keys of equal priority take turns: a
/// key with 10,000 waiting jobs and one with 10 both progress), the oldest.
///
/// Only the id: the row is read (and locked) by primary key afterwards. Joining the heads
/// back to `jobs` here let the planner, whose statistics on a table this busy are always
/// stale (it took the pending jobs for one row), hash every pending job for each placement:
/// 1.7 ms with a thousand waiting instead of 0.1.
fn next_pending_sql(kinds: Kinds) -> String {
    format!(
        "{}SELECT id FROM heads ORDER BY priority DESC, placed + rank, created_at, id LIMIT 1",
        heads_cte(kinds, 1)
    )
}

/// The first `size` jobs of [`next_pending_sql`]'s order, each read and locked by primary
/// key, in one statement ([`lock_next_pending_many`]): `place` is a job's place in the order
/// (from 1); the rows come, and are locked, in id order. Each row is looked up on its own (a
/// lateral subquery with its own `FOR UPDATE`, which the planner cannot fold into a join):
/// joined, the planner hashed every pending job (see above).
fn lock_next_pending_sql(kinds: Kinds, size: usize) -> String {
    format!(
        "{}, picked AS MATERIALIZED ( \
             SELECT id, row_number() OVER (ORDER BY priority DESC, placed + rank, created_at, id) AS place \
             FROM heads ORDER BY priority DESC, placed + rank, created_at, id LIMIT {size}) \
         SELECT job.*, picked.place FROM (SELECT id, place FROM picked ORDER BY id) picked \
         CROSS JOIN LATERAL (SELECT {COLUMNS} FROM jobs WHERE jobs.id = picked.id FOR UPDATE) job",
        heads_cte(kinds, size)
    )
}

/// The counts of jobs one statement of [`lock_next_pending_many`] takes: each up to 8 (a
/// warm pool's usual batch), then a few larger ones. A count between two takes the smaller
/// and says that more may wait.
const SIZES: [usize; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128];

/// The queue's statements, made once: [`next_pending_sql`] for each [`Kinds`], and
/// [`lock_next_pending_sql`] for each kinds and each of [`SIZES`].
pub struct QueueSql {
    next: [String; 3],
    lock_next: [[String; SIZES.len()]; 3],
}

impl QueueSql {
    fn get() -> &'static QueueSql {
        static SQL: std::sync::LazyLock<QueueSql> = std::sync::LazyLock::new(|| QueueSql {
            next: Kinds::ALL.map(next_pending_sql),
            lock_next: Kinds::ALL.map(|kinds| SIZES.map(|size| lock_next_pending_sql(kinds, size))),
        });
        &SQL
    }

    /// The next job's id ([`next_pending_sql`]).
    pub fn next(kinds: Kinds) -> &'static str {
        &Self::get().next[kinds as usize]
    }

    /// The statement that locks the next jobs, as many as the largest of [`SIZES`] that is at
    /// most `n` (one if `n` is 0), and that count ([`lock_next_pending_sql`]).
    pub fn lock_next(kinds: Kinds, n: usize) -> (&'static str, usize) {
        let at = SIZES.iter().rposition(|size| *size <= n).unwrap_or(0);
        (&Self::get().lock_next[kinds as usize][at], SIZES[at])
    }
}

/// Heads that no longer wait (each a cancellation that held its row) [`lock_next_pending`]
/// passes over before it gives up.
const PASSED_OVER_ROUNDS: usize = 12;
/// Overdue deadlines and finished backoffs ([`due`]).
pub const DUE_SQL: &str = "(SELECT id, deadline_at AS due FROM jobs WHERE deadline_at <= now() ORDER BY deadline_at LIMIT $1) \
                           UNION ALL \
                           (SELECT id, not_before AS due FROM jobs WHERE not_before <= now() AND fenced_by IS NULL ORDER BY not_before LIMIT $1) \
                           ORDER BY due LIMIT $1";
/// When the job monitor must look next ([`next_due`]).
pub const NEXT_DUE_SQL: &str = "SELECT least((SELECT min(deadline_at) FROM jobs WHERE deadline_at IS NOT NULL), \
                                              (SELECT min(not_before) FROM jobs WHERE not_before IS NOT NULL AND fenced_by IS NULL))";
/// Jobs that wait for a lost worker's teardown ([`lock_fenced_by`]).
pub const FENCED_BY_SQL: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM jobs WHERE fenced_by = $1 FOR UPDATE"
);

/// Insert a new job. Returns false (and writes nothing) when its idempotency key is taken.
pub async fn insert(conn: &mut PgConnection, job: &Job) -> Result<bool> {
    Ok(!insert_many(conn, &[job]).await?.is_empty())
}

macro_rules! inserted_columns {
    () => {
        "id, state, spec, attempt, worker_id, exit_code, error, correlation_id, idempotency_key, \
         version, created_at, updated_at, policy, priority, start_by, deadline_at, not_before, \
         fenced_by"
    };
}
/// [`insert_many`]'s INSERT, one array per column (see [`crate::column`]), its rows in the
/// order given: the order in which their idempotency keys are taken.
const INSERT_MANY_SQL: &str = concat!(
    "INSERT INTO jobs (",
    inserted_columns!(),
    ") SELECT ",
    inserted_columns!(),
    " FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::int4[], $5::uuid[], $6::int4[], \
                  $7::text[], $8::text[], $9::text[], $10::int8[], $11::timestamptz[], \
                  $12::timestamptz[], $13::jsonb[], $14::int4[], $15::timestamptz[], \
                  $16::timestamptz[], $17::timestamptz[], $18::uuid[]) \
       WITH ORDINALITY AS r(",
    inserted_columns!(),
    ", n) ORDER BY n ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
);

/// Insert new jobs in one statement; returns the ids of those inserted (a job whose
/// idempotency key is taken, by an older job or by one before it in `jobs`, is not).
pub async fn insert_many(conn: &mut PgConnection, jobs: &[&Job]) -> Result<Vec<Uuid>> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let ids = sqlx::query_scalar(INSERT_MANY_SQL)
        .bind(crate::column(jobs, |job| job.id))
        .bind(crate::column(jobs, |job| job.state.as_str()))
        .bind(crate::column(jobs, |job| sqlx::types::Json(&job.spec)))
        .bind(crate::column(jobs, |job| job.attempt as i32))
        .bind(crate::column(jobs, |job| job.worker_id))
        .bind(crate::column(jobs, |job| job.exit_code))
        .bind(crate::column(jobs, |job| job.error.as_deref()))
        .bind(crate::column(jobs, |job| job.correlation_id.as_str()))
        .bind(crate::column(jobs, |job| job.idempotency_key.as_deref()))
        .bind(crate::column(jobs, |job| job.version))
        .bind(crate::column(jobs, |job| job.created_at))
        .bind(crate::column(jobs, |job| job.updated_at))
        .bind(crate::column(jobs, |job| sqlx::types::Json(&job.policy)))
        .bind(crate::column(jobs, |job| job.policy.priority))
        .bind(crate::column(jobs, |job| job.start_by))
        .bind(crate::column(jobs, |job| job.deadline_at))
        .bind(crate::column(jobs, |job| job.not_before))
        .bind(crate::column(jobs, |job| job.fenced_by))
        .fetch_all(conn)
        .await?;
    Ok(ids)
}

/// Write a changed job if nobody changed it since it was loaded; bumps `job.version`.
pub async fn update(conn: &mut PgConnection, job: &mut Job) -> Result<()> {
    update_many(conn, &mut [job], None).await
}

/// [`update`] for many jobs in one statement (each of them once): each is written only if
/// nobody changed it since it was loaded, else none is (a version conflict).
/// The statement begins with `before` (a `WITH` clause that writes outbox rows,
/// [`crate::Tx::save_all`]), if any.
pub(crate) async fn update_many<'q>(
    conn: &mut PgConnection,
    jobs: &mut [&mut Job],
    before: Option<sqlx::QueryBuilder<'q, sqlx::Postgres>>,
) -> Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let mut update = before.unwrap_or_else(|| sqlx::QueryBuilder::new(""));
    update.push(
        "UPDATE jobs SET state = v.state, attempt = v.attempt, worker_id = v.worker_id, \
                         exit_code = v.exit_code, error = v.error, updated_at = v.updated_at, \
                         version = jobs.version + 1, start_by = v.start_by, \
                         deadline_at = v.deadline_at, not_before = v.not_before, fenced_by = v.fenced_by, \
                         spec = CASE WHEN v.state IN ('Succeeded', 'Failed', 'Cancelled', 'Timeout') \
                                      AND jobs.spec->'env' <> '{}'::jsonb \
                                     THEN jsonb_set(jobs.spec, '{env}', \
                                          (SELECT coalesce(jsonb_object_agg(key, ''), '{}'::jsonb) \
                                           FROM jsonb_object_keys(jobs.spec->'env') AS key)) \
                                     ELSE jobs.spec END \
         FROM (",
    );
    // A row of the VALUES list per job: an id given twice would have one of its writes lost.
    debug_assert_eq!(
        jobs.iter()
            .map(|one| one.id)
            .collect::<std::collections::HashSet<_>>()
            .len(),
        jobs.len(),
        "each job once"
    );
    update.push_values(jobs.iter(), |mut row, job| {
        row.push_bind(job.id)
            .push_bind(job.state.as_str())
            .push_bind(job.attempt as i32)
            .push_bind(job.worker_id)
            .push_bind(job.exit_code)
            .push_bind(job.error.clone())
            .push_bind(job.updated_at)
            .push_bind(job.version)
            .push_bind(job.start_by)
            .push_bind(job.deadline_at)
            .push_bind(job.not_before)
            .push_bind(job.fenced_by);
    });
    update.push(
        ") AS v(id, state, attempt, worker_id, exit_code, error, updated_at, version, start_by, \
                deadline_at, not_before, fenced_by) \
         WHERE jobs.id = v.id AND jobs.version = v.version RETURNING jobs.id",
    );
    let written: Vec<Uuid> = update.build_query_scalar().fetch_all(&mut *conn).await?;
    if let Some(stale) = jobs.iter().find(|job| !written.contains(&job.id)) {
        return Err(StoreError::VersionConflict {
            aggregate: "job",
            id: stale.id,
            expected: stale.version,
        });
    }
    for job in jobs.iter_mut() {
        job.version += 1;
        if job.state.is_terminal() {
            // As the row now holds it: an ended job keeps its environment's names only.
            job.spec.env.values_mut().for_each(String::clear);
        }
    }
    Ok(())
}

/// Load a job and lock its row until the transaction ends.
pub async fn lock(conn: &mut PgConnection, id: Uuid) -> Result<Option<Job>> {
    let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = $1 FOR UPDATE");
    let row: Option<JobRow> = sqlx::query_as(&sql).bind(id).fetch_optional(conn).await?;
    row.map(Job::try_from).transpose()
}

/// Load the jobs of `ids` that exist and lock their rows, in id order, in one statement.
///
/// The ids are a list of parameters ([`crate::push_id_list`]), not an array.
pub async fn lock_all(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Job>> {
    let before = format!("SELECT {COLUMNS} FROM jobs WHERE id IN ");
    let rows: Vec<JobRow> =
        crate::fetch_listed(conn, &before, ids, " ORDER BY id FOR UPDATE").await?;
    rows.into_iter().map(Job::try_from).collect()
}

pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<Job>> {
    let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = $1");
    let row: Option<JobRow> = sqlx::query_as(&sql).bind(id).fetch_optional(pool).await?;
    row.map(Job::try_from).transpose()
}

/// The state of a job, as this connection sees it (a job of its own transaction too).
pub async fn state_of(conn: &mut PgConnection, id: Uuid) -> Result<Option<JobState>> {
    let row: Option<(String,)> = sqlx::query_as("SELECT state FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?;
    row.map(|(state,)| state.parse().map_err(corrupt("job state")))
        .transpose()
}

pub async fn find_by_idempotency_key(conn: &mut PgConnection, key: &str) -> Result<Option<Job>> {
    let sql = format!("SELECT {COLUMNS} FROM jobs WHERE idempotency_key = $1");
    let row: Option<JobRow> = sqlx::query_as(&sql).bind(key).fetch_optional(conn).await?;
    row.map(Job::try_from).transpose()
}

/// The job a worker was provisioned for, if it still waits for that worker.
pub async fn lock_scheduled_on(conn: &mut PgConnection, worker_id: Uuid) -> Result<Option<Job>> {
    let row: Option<JobRow> = sqlx::query_as(SCHEDULED_ON_SQL)
        .bind(worker_id)
        .fetch_optional(conn)
        .await?;
    row.map(Job::try_from).transpose()
}

/// How many jobs of concurrency key `key` are placed (hold its slots), and the oldest
/// `show` of them.
pub async fn placed_of_key(pool: &PgPool, key: &str, show: i64) -> Result<(i64, Vec<Uuid>)> {
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT id, count(*) OVER () FROM jobs WHERE concurrency_key = $1 \
           AND state IN ('Assigned', 'Scheduled', 'Running') ORDER BY created_at, id LIMIT $2",
    )
    .bind(key)
    .bind(show)
    .fetch_all(pool)
    .await?;
    let placed = rows.first().map_or(0, |(_, n)| *n);
    Ok((placed, rows.into_iter().map(|(id, _)| id).collect()))
}

/// The jobs that wait for worker `worker_id`'s teardown to be confirmed, locked.
pub async fn lock_fenced_by(conn: &mut PgConnection, worker_id: Uuid) -> Result<Vec<Job>> {
    let rows: Vec<JobRow> = sqlx::query_as(FENCED_BY_SQL)
        .bind(worker_id)
        .fetch_all(conn)
        .await?;
    rows.into_iter().map(Job::try_from).collect()
}

/// The next Pending job to place ([`next_pending_sql`]: highest priority, keys taking
/// turns, none beyond its key's concurrency limit, then oldest) that is not waiting out a
/// retry's backoff, read and locked in one statement ([`lock_next_pending_many`] of one).
/// Call it under the placement lock ([`crate::Store::begin_placing`]): it waits for a row
/// another transaction holds (a cancellation) instead of skipping it; a head that no longer
/// waits once that transaction ends is passed over, and the heads are read again, which
/// then sees that transaction's change.
pub async fn lock_next_pending(conn: &mut PgConnection, kinds: Kinds) -> Result<Option<Job>> {
    for _round in 0..PASSED_OVER_ROUNDS {
        let (mut next, passed_over) = lock_next_pending_many(&mut *conn, kinds, 1).await?;
        if let Some(job) = next.pop() {
            return Ok(Some(job));
        }
        if !passed_over {
            return Ok(None);
        }
    }
    Ok(None)
}

/// The next `n` Pending jobs to place, as [`lock_next_pending`] would give them one after
/// the other, locked, in one statement ([`lock_next_pending_sql`]); and whether more may be
/// placeable than these: a head that no longer waits once its lock is granted (a
/// cancellation that held it) is left out, and the caller then asks again for the rest,
/// after writing these (whose placements the next heads must count); so too when one
/// statement takes fewer than `n` ([`SIZES`]: 13 takes 8). Call it under the placement lock
/// ([`crate::Store::begin_placing`]).
pub async fn lock_next_pending_many(
    conn: &mut PgConnection,
    kinds: Kinds,
    n: usize,
) -> Result<(Vec<Job>, bool)> {
    use sqlx::{FromRow, Row};
    if n == 0 {
        return Ok((Vec::new(), false));
    }
    let (sql, taken) = QueueSql::lock_next(kinds, n);
    let rows = sqlx::query(sql).fetch_all(conn).await?;
    let mut placed: Vec<(i64, Job)> = Vec::with_capacity(rows.len());
    for row in &rows {
        placed.push((
            row.try_get("place")?,
            Job::try_from(JobRow::from_row(row)?)?,
        ));
    }
    placed.sort_unstable_by_key(|(place, _)| *place);
    let mut jobs = Vec::with_capacity(placed.len());
    let mut passed_over = false;
    for (_, job) in placed {
        match job.state == JobState::Pending && job.not_before.is_none() {
            true => jobs.push(job),
            false => passed_over = true,
        }
    }
    // Asked for more than one statement takes: more may wait.
    let passed_over = passed_over || (n > taken && jobs.len() == taken);
    Ok((jobs, passed_over))
}

/// Whether the pending job `id`, written by this transaction (so its row is this
/// transaction's), is the one [`lock_next_pending`] would return: one query when it heads
/// the queue, as a job accepted into an idle queue does.
pub async fn is_next_pending(conn: &mut PgConnection, kinds: Kinds, id: Uuid) -> Result<bool> {
    if next_pending_id(&mut *conn, kinds).await? == Some(id) {
        return Ok(true);
    }
    Ok(lock_next_pending(conn, kinds)
        .await?
        .is_some_and(|next| next.id == id))
}

async fn next_pending_id(conn: impl sqlx::PgExecutor<'_>, kinds: Kinds) -> Result<Option<Uuid>> {
    Ok(sqlx::query_scalar(QueueSql::next(kinds))
        .fetch_optional(conn)
        .await?)
}

/// Which pending jobs placement looks at: a warm-pool process takes only jobs without an
/// image, and once the next container job cannot be placed (its memory is taken), the
/// process jobs behind it still can (and the other way round).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kinds {
    Any = 0,
    /// Jobs without an image.
    Processes = 1,
    /// Jobs with an image.
    Containers = 2,
}

impl Kinds {
    const ALL: [Kinds; 3] = [Kinds::Any, Kinds::Processes, Kinds::Containers];
}

/// The job placement takes next ([`lock_next_pending`]), without locking it (for views).
pub async fn next_pending(pool: &PgPool, kinds: Kinds) -> Result<Option<Job>> {
    match next_pending_id(pool, kinds).await? {
        Some(id) => get(pool, id).await,
        None => Ok(None),
    }
}

/// Which jobs a list shows: all of them, or those of one state, one concurrency key, with
/// every one of some labels.
#[derive(Debug, Clone, Default)]
pub struct Filter<'a> {
    pub state: Option<JobState>,
    pub concurrency_key: Option<&'a str>,
    pub labels: Option<&'a std::collections::BTreeMap<String, String>>,
}

/// Newest first, as `filter` says; `cursor` is the previous page's `next_cursor`.
pub async fn list(
    pool: &PgPool,
    filter: Filter<'_>,
    limit: u32,
    cursor: Option<&str>,
) -> Result<(Vec<Job>, Option<String>)> {
    let Filter {
        state,
        concurrency_key,
        labels,
    } = filter;
    let (at, id) = crate::page_start(cursor);
    let labels = labels.filter(|l| !l.is_empty());
    // Only the filters given are in the statement, so that its plan (a prepared statement's
    // generic plan too) can use their indexes: the partial index of keyed jobs needs
    // `concurrency_key <> ''` written out, the labels' GIN index the containment.
    let mut sql = format!(
        "SELECT {COLUMNS} FROM jobs \
         WHERE ($1::text IS NULL OR state = $1) \
           AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))"
    );
    if concurrency_key.is_some() {
        sql.push_str(" AND concurrency_key <> '' AND concurrency_key = $5");
    }
    if labels.is_some() {
        sql.push_str(if concurrency_key.is_some() {
            " AND spec->'labels' @> $6"
        } else {
            " AND spec->'labels' @> $5"
        });
    }
    sql.push_str(" ORDER BY created_at DESC, id DESC LIMIT $4");
    let mut query = sqlx::query_as::<_, JobRow>(&sql)
        .bind(state.map(JobState::as_str))
        .bind(at)
        .bind(id)
        .bind(i64::from(limit) + 1);
    if let Some(key) = concurrency_key {
        query = query.bind(key);
    }
    if let Some(labels) = labels {
        query = query.bind(sqlx::types::Json(labels));
    }
    let rows: Vec<JobRow> = query.fetch_all(pool).await?;
    let jobs = rows
        .into_iter()
        .map(Job::try_from)
        .collect::<Result<Vec<_>>>()?;
    Ok(crate::page_of(jobs, limit, |x| (x.created_at, x.id)))
}

/// Jobs whose state deadline or retry backoff is over, most overdue first.
pub async fn due(pool: &PgPool, limit: i64) -> Result<Vec<Uuid>> {
    let rows: Vec<(Uuid, DateTime<Utc>)> =
        sqlx::query_as(DUE_SQL).bind(limit).fetch_all(pool).await?;
    Ok(rows.into_iter().map(|(id, _)| id).collect())
}

/// The earliest deadline or backoff end of any job, to sleep until.
pub async fn next_due(pool: &PgPool) -> Result<Option<DateTime<Utc>>> {
    let (at,): (Option<DateTime<Utc>>,) = sqlx::query_as(NEXT_DUE_SQL).fetch_one(pool).await?;
    Ok(at)
}
