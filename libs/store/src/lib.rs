//! Persistence of Hodei in PostgreSQL: one module per table, every SQL string in it.
//!
//! Every state change goes one way: [`Store::begin`], lock the aggregate(s) `FOR UPDATE`,
//! apply a domain method, [`Tx::save`] (the new state with a version check, and the events
//! the method raised appended to the outbox), [`commit`], which hands the rows to the store's
//! publisher once they are durable. [`change`] is that sequence for one aggregate, and
//! [`change_many`] for a batch of independent changes in one transaction. Functions take
//! `&mut PgConnection` so that the caller owns the transaction. The relay
//! ([`outbox::relay_batch`]) and the audit log ([`audit`]) read what those transactions wrote.

pub mod audit;
pub mod capacity;
pub mod jobs;
pub mod maintenance;
pub mod offers;
pub mod outbox;
pub mod plans;
pub mod resources;
pub mod schedules;
pub mod workers;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use uuid::Uuid;

pub use sqlx::{PgConnection, Postgres, Transaction};

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// Someone else changed the row since it was loaded; the whole change must be retried.
    #[error("{aggregate} {id} was changed concurrently (expected version {expected})")]
    VersionConflict {
        aggregate: &'static str,
        id: Uuid,
        expected: i64,
    },
    #[error("stored {what} is unreadable: {why}")]
    Corrupt { what: &'static str, why: String },
    /// A commit of a transaction in which a save failed: that save's statement may have
    /// written outbox rows of a change that did not happen, so the transaction is dropped
    /// (rolled back) instead; the whole change must be made again.
    #[error("a transaction whose save failed cannot commit ({0})")]
    SaveFailed(String),
}

impl StoreError {
    /// Whether trying again later may succeed (connection trouble, conflicts, deadlocks).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::VersionConflict { .. } | StoreError::SaveFailed(_) => true,
            StoreError::Database(sqlx::Error::Database(db)) => {
                // serialization_failure, deadlock_detected, and connection exceptions
                matches!(
                    db.code().as_deref(),
                    Some("40001" | "40P01" | "57P01" | "57P02" | "57P03")
                ) || db.code().is_some_and(|c| c.starts_with("08"))
            }
            StoreError::Database(sqlx::Error::RowNotFound) => false,
            StoreError::Database(_) => true,
            StoreError::Migration(_) | StoreError::Corrupt { .. } => false,
        }
    }
}

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// A pooled connection idle for longer than this is pinged before it is used again; one in
/// steady use is not (a ping is a round trip, on every transaction of a busy service).
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Connect a pool to `url`. Connecting is retried by the pool on each acquire.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    let options: PgConnectOptions = url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Apply every migration not yet applied. Safe to call from several processes at once:
/// sqlx serializes migrators with an advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Key of the transaction-scoped advisory lock every placement decision takes first.
pub(crate) const PLACEMENT_LOCK: i64 = 0x686f_6465_695f_706c; // "hodei_pl"

/// The placement lock ([`Store::begin_placing`]), taken only if a ready worker is free; false
/// (nothing locked) when none is: the accept path's look and its lock in one round trip.
pub async fn placement_lock_if_worker_free(conn: &mut PgConnection) -> Result<bool> {
    let (locked,): (bool,) = sqlx::query_as(
        "SELECT CASE WHEN EXISTS (SELECT 1 FROM workers WHERE state = 'Ready' AND reserved_job_id IS NULL) \
                     THEN pg_advisory_xact_lock($1) IS NOT NULL ELSE false END",
    )
    .bind(PLACEMENT_LOCK)
    .fetch_one(conn)
    .await?;
    Ok(locked)
}

/// What placement looks at first ([`placement_looks`]) without a warm pool: `$1` is the
/// most workers alive at once. Each subquery is evaluated only when the answer still depends
/// on it. "A job waits" is the first entry of the queue's index (`jobs_pending_by_key`), in
/// its order: as `EXISTS`, whose ORDER BY the planner drops, many pending jobs made a scan of
/// the table look as cheap, which reads every ended job before the first pending one. The
/// live workers are counted as [`workers::COUNT_LIVE_SQL`] counts them, and pool workers
/// alive as [`workers::ANY_LIVE_POOLED_SQL`] finds them.
///
/// One statement with and one without a pool: with whether a pool is kept as a parameter,
/// PostgreSQL planned the statement again at every call (a plan made for the value drops the
/// other branch, and the generic plan never looked as cheap), 0.3 ms each time.
pub const PLACEMENT_LOOKS_SQL: &str = "SELECT \
     (SELECT 1 FROM jobs WHERE state = 'Pending' AND not_before IS NULL \
      ORDER BY concurrency_key LIMIT 1) IS NOT NULL \
     AND ((SELECT count(*) FROM workers WHERE state <> 'Terminated') < $1 \
          OR EXISTS (SELECT 1 FROM workers WHERE state = 'Ready' AND reserved_job_id IS NULL)), \
     EXISTS (SELECT 1 FROM workers WHERE pooled AND state <> 'Terminated' AND state <> 'Terminating')";

/// [`PLACEMENT_LOOKS_SQL`] with a warm pool: a free ready worker, or a container job waiting.
pub const PLACEMENT_LOOKS_WITH_POOL_SQL: &str = "SELECT \
     EXISTS (SELECT 1 FROM workers WHERE state = 'Ready' AND reserved_job_id IS NULL) \
     OR EXISTS (SELECT 1 FROM jobs WHERE state = 'Pending' AND spec ? 'image'), \
     false";

/// What [`placement_looks`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Looks {
    /// A placement may be possible. With a warm pool, a process job goes only to a free
    /// ready worker: there is something to place while one is free or a container job
    /// waits. Without one, a job must wait, and there must be room for a new worker (fewer
    /// than `max_workers` alive) or a free ready one.
    pub placeable: bool,
    /// Without a warm pool: a pool worker of an earlier configuration is alive (and not on
    /// its way out), so there is a surplus to tear down, and placement looks for a free one
    /// (only pool workers are ever free). Always false with a pool.
    pub live_pooled: bool,
}

/// Placement's first look, without a lock and in one statement, so that a look that finds
/// nothing takes no lock and opens no transaction ([`Looks`]).
pub async fn placement_looks(pool: &PgPool, pool_kept: bool, max_workers: u32) -> Result<Looks> {
    let looks = match pool_kept {
        true => sqlx::query_as(PLACEMENT_LOOKS_WITH_POOL_SQL),
        false => sqlx::query_as(PLACEMENT_LOOKS_SQL).bind(i64::from(max_workers)),
    };
    let (placeable, live_pooled): (bool, bool) = looks.fetch_one(pool).await?;
    Ok(Looks {
        placeable,
        live_pooled,
    })
}

/// One field of every row of a batch: the array parameter of an `unnest(...)` insert, which
/// is one statement whatever the number of rows (a VALUES list of each length is a statement
/// of its own, parsed and planned apart).
fn column<'a, T, U>(rows: &'a [T], field: impl Fn(&'a T) -> U) -> Vec<U> {
    rows.iter().map(field).collect()
}

/// Push `ids` as a list of parameters, `($1, ..., $n)`, for `id IN` (the caller pushes
/// `IN ` before it), with `n` the next power of two: the last id fills the rest, which
/// changes nothing in `IN`. No ids is `(NULL)`, which matches no row (callers return early
/// rather than ask).
///
/// An array parameter (`id = ANY($1)`) is estimated at ten elements, so on a table of
/// thousands of rows the generic plan always looked dearer than one made for the array at
/// hand, and PostgreSQL planned the statement again at every call (the outbox's marking, the
/// workers' heartbeats: 0.5 ms of planning per ephemeral job). A list of `n` parameters is a
/// statement of its own whose generic plan is taken after a few calls; rounding `n` up keeps
/// the statements few (at most twelve for 2,048 ids).
fn push_id_list<'a>(query: &mut sqlx::QueryBuilder<'a, sqlx::Postgres>, ids: &[Uuid]) {
    let Some(&last) = ids.last() else {
        query.push("(NULL)");
        return;
    };
    let mut list = query.separated(", ");
    list.push_unseparated("(");
    for n in 0..ids.len().next_power_of_two() {
        list.push_bind(ids.get(n).copied().unwrap_or(last));
    }
    list.push_unseparated(")");
}

/// The rows a statement on a list of ids gives: `before`, the ids as a list of parameters
/// ([`push_id_list`]), then `after`. No ids give no rows, without a statement.
async fn fetch_listed<'e, R>(
    executor: impl sqlx::PgExecutor<'e>,
    before: &str,
    ids: &[Uuid],
    after: &str,
) -> Result<Vec<R>>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut query = sqlx::QueryBuilder::new(before);
    push_id_list(&mut query, ids);
    query.push(after);
    Ok(query.build_query_as().fetch_all(executor).await?)
}

fn corrupt(what: &'static str) -> impl Fn(String) -> StoreError {
    move |why| StoreError::Corrupt { what, why }
}

/// Opaque page cursor `<rfc3339 time>|<uuid>` for lists ordered by (created_at DESC, id DESC).
pub fn encode_cursor(at: chrono::DateTime<chrono::Utc>, id: Uuid) -> String {
    format!(
        "{}|{}",
        at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        id
    )
}

/// The `(created_at, id)` a page starts below: `None`s for the first page (or a cursor that
/// does not parse).
fn page_start(cursor: Option<&str>) -> (Option<chrono::DateTime<chrono::Utc>>, Option<Uuid>) {
    match cursor.and_then(decode_cursor) {
        Some((at, id)) => (Some(at), Some(id)),
        None => (None, None),
    }
}

/// A page of `items`, fetched newest first with one more than `limit`: at most `limit` of
/// them, and the cursor of the next page when there are more.
fn page_of<T>(
    mut items: Vec<T>,
    limit: u32,
    key: impl Fn(&T) -> (chrono::DateTime<chrono::Utc>, Uuid),
) -> (Vec<T>, Option<String>) {
    let limit = limit.max(1) as usize;
    let next = (items.len() > limit).then(|| {
        items.truncate(limit);
        let (at, id) = key(items.last().expect("at least one item"));
        encode_cursor(at, id)
    });
    (items, next)
}

pub fn decode_cursor(cursor: &str) -> Option<(chrono::DateTime<chrono::Utc>, Uuid)> {
    let (at, id) = cursor.split_once('|')?;
    Some((
        chrono::DateTime::parse_from_rfc3339(at).ok()?.to_utc(),
        id.parse().ok()?,
    ))
}

/// SHA-256 of a bootstrap token, hex; only the hash is stored.
pub fn hash_token(token: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Health check: the database answers.
pub fn health(pool: &PgPool) -> hodei_runtime::endpoint::HealthCheck {
    let pool = pool.clone();
    std::sync::Arc::new(move || {
        let pool = pool.clone();
        Box::pin(async move {
            sqlx::query("SELECT 1")
                .execute(&pool)
                .await
                .map(|_| ())
                .map_err(|e| format!("PostgreSQL: {e}"))
        })
    })
}

/// What receives the outbox rows of each committed transaction (a publisher that sends them
/// to JetStream at once). It must not block: rows it cannot take stay pending and the relay
/// publishes them.
pub type AfterCommit = std::sync::Arc<dyn Fn(Vec<outbox::Outgoing>) + Send + Sync>;

/// The database of a service, and what its commits hand their outbox rows to. Every state
/// change begins here ([`Store::begin`], or [`change`] for the common case). It derefs
/// to the pool for queries that change nothing.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    after_commit: Option<AfterCommit>,
}

impl Store {
    /// A store whose committed rows are left to the relay.
    pub fn new(pool: PgPool) -> Store {
        Store {
            pool,
            after_commit: None,
        }
    }

    /// The same store, its committed rows handed to `publisher` at once.
    pub fn publishing_to(self, publisher: AfterCommit) -> Store {
        Store {
            after_commit: Some(publisher),
            ..self
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn begin(&self) -> Result<Tx> {
        Ok(Tx {
            inner: self.pool.begin().await?,
            outgoing: Vec::new(),
            unwritten: Vec::new(),
            after_commit: self.after_commit.clone(),
            failed: None,
        })
    }

    /// [`Store::begin`] with the placement lock taken first. The lock serializes placement
    /// decisions (which job goes to which worker, whether a worker may be created) across
    /// every dispatcher instance, until the transaction ends. It is taken before any row
    /// lock: then no other placement holds a job or worker row, the placement queries wait
    /// for rows instead of skipping them, and two decisions never both see the same free
    /// worker, the same spare capacity or the same pending job.
    ///
    /// Two round trips, not one: sent with `BEGIN` in one message (`begin_with`), a lock that
    /// fails (a deadlock, a timeout) would leave the pooled connection in an aborted
    /// transaction that sqlx does not roll back, and every later use of it would fail.
    pub async fn begin_placing(&self) -> Result<Tx> {
        let mut tx = self.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PLACEMENT_LOCK)
            .execute(&mut *tx.inner)
            .await?;
        Ok(tx)
    }
}

impl std::ops::Deref for Store {
    type Target = PgPool;
    fn deref(&self) -> &PgPool {
        &self.pool
    }
}

/// An aggregate with a row of its own and a version: what [`Tx::save`] writes and
/// [`change`] locks.
pub trait Aggregate: Send + Sized + Clone {
    fn id(&self) -> Uuid;

    /// Load it and lock its row for the rest of the transaction; `None` when there is none.
    fn lock(
        conn: &mut PgConnection,
        id: Uuid,
    ) -> impl std::future::Future<Output = Result<Option<Self>>> + Send;

    /// Load and lock those of `ids` that exist, in id order, in one statement.
    fn lock_all(
        conn: &mut PgConnection,
        ids: &[Uuid],
    ) -> impl std::future::Future<Output = Result<Vec<Self>>> + Send;

    /// Write the new state of each of `aggregates` (each once), each only if its row still
    /// has the version it was loaded with, in one statement where the table allows; that
    /// statement begins with `before` (a `WITH` clause of the transaction's outbox rows not
    /// written yet, [`outbox::insert_before`]) when there is one, so that it writes them too.
    fn write_all<'q>(
        conn: &mut PgConnection,
        aggregates: &mut [&mut Self],
        before: Option<sqlx::QueryBuilder<'q, Postgres>>,
    ) -> impl std::future::Future<Output = Result<()>> + Send;
}

impl Aggregate for hodei_domain::Job {
    fn id(&self) -> Uuid {
        self.id
    }
    async fn lock(conn: &mut PgConnection, id: Uuid) -> Result<Option<Self>> {
        jobs::lock(conn, id).await
    }
    async fn lock_all(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Self>> {
        jobs::lock_all(conn, ids).await
    }
    async fn write_all<'q>(
        conn: &mut PgConnection,
        jobs: &mut [&mut Self],
        before: Option<sqlx::QueryBuilder<'q, Postgres>>,
    ) -> Result<()> {
        jobs::update_many(conn, jobs, before).await
    }
}

impl Aggregate for hodei_domain::Schedule {
    fn id(&self) -> Uuid {
        self.id
    }
    async fn lock(conn: &mut PgConnection, id: Uuid) -> Result<Option<Self>> {
        schedules::lock(conn, id).await
    }
    async fn lock_all(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Self>> {
        schedules::lock_all(conn, ids).await
    }
    async fn write_all<'q>(
        conn: &mut PgConnection,
        schedules: &mut [&mut Self],
        before: Option<sqlx::QueryBuilder<'q, Postgres>>,
    ) -> Result<()> {
        // A schedule changes alone and seldom: the rows go in a statement of their own.
        if let Some(mut before) = before {
            before.push("SELECT 1").build().execute(&mut *conn).await?;
        }
        for schedule in schedules.iter_mut() {
            schedules::update(conn, schedule).await?;
        }
        Ok(())
    }
}

impl Aggregate for hodei_domain::Worker {
    fn id(&self) -> Uuid {
        self.id
    }
    async fn lock(conn: &mut PgConnection, id: Uuid) -> Result<Option<Self>> {
        workers::lock(conn, id).await
    }
    async fn lock_all(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Self>> {
        workers::lock_all(conn, ids).await
    }
    async fn write_all<'q>(
        conn: &mut PgConnection,
        workers: &mut [&mut Self],
        before: Option<sqlx::QueryBuilder<'q, Postgres>>,
    ) -> Result<()> {
        workers::update_many(conn, workers, before).await
    }
}

/// A transaction that collects the outbox rows it writes ([`Tx::save`],
/// [`outbox::append_command`]). It derefs to the connection, so every store function takes
/// it; [`commit`] hands the rows to the store's publisher once they are durable.
pub struct Tx {
    inner: Transaction<'static, Postgres>,
    /// Every outbox row of the transaction, for the publisher once it commits.
    outgoing: Vec<outbox::Outgoing>,
    /// Of those, the last ones not yet written: they are written together by the statement
    /// of the transaction's next save ([`Tx::save_all`]), or in one INSERT as it commits.
    unwritten: Vec<outbox::RowOf>,
    after_commit: Option<AfterCommit>,
    /// Why a save of this transaction failed, if one did: [`commit`] then refuses.
    failed: Option<String>,
}

impl Tx {
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.inner
    }

    /// Append the events a domain method raised to the outbox and write the changed aggregate
    /// (version-checked: a concurrent change fails the whole transaction, which can then only
    /// be dropped, see [`StoreError::SaveFailed`]).
    pub async fn save(
        &mut self,
        aggregate: &mut impl Aggregate,
        events: &[hodei_domain::DomainEvent],
    ) -> Result<()> {
        self.save_all(&mut [aggregate], events).await
    }

    /// [`Tx::save`] for several aggregates of one kind, written in one statement (each once),
    /// and their events. That statement writes the transaction's outbox rows appended so far
    /// (these events among them): a handler whose last write is a save commits in one round
    /// trip less.
    pub async fn save_all<A: Aggregate>(
        &mut self,
        aggregates: &mut [&mut A],
        events: &[hodei_domain::DomainEvent],
    ) -> Result<()> {
        outbox::append_events(self, events).await?;
        if aggregates.is_empty() {
            return Ok(());
        }
        let Tx {
            inner,
            outgoing,
            unwritten,
            failed,
            ..
        } = self;
        let written = A::write_all(
            inner,
            aggregates,
            outbox::insert_before(outgoing, unwritten),
        )
        .await;
        match written {
            Ok(()) => unwritten.clear(),
            Err(ref error) => *failed = Some(error.to_string()),
        }
        written
    }
}

impl std::ops::Deref for Tx {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.inner
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.inner
    }
}

/// Commit a state change (its own span, so traces show the time spent persisting); then the
/// rows written are durable and handed to the publisher.
#[tracing::instrument(name = "persist", skip_all)]
pub async fn commit(mut tx: Tx) -> Result<()> {
    if let Some(why) = tx.failed.take() {
        return Err(StoreError::SaveFailed(why));
    }
    outbox::flush(&mut tx).await?;
    let Tx {
        inner,
        outgoing,
        after_commit,
        ..
    } = tx;
    inner.commit().await?;
    if let (false, Some(publish)) = (outgoing.is_empty(), after_commit) {
        publish(outgoing);
    }
    Ok(())
}

/// The one way to change one aggregate: begin, lock it, apply `change` (a domain method,
/// which returns the events it raised), save it with its events, commit. `Ok(None)` when
/// there is no such aggregate; an error from `change`, or a change that raises no event,
/// writes nothing.
pub async fn change<A, E>(
    store: &Store,
    id: Uuid,
    change: impl FnOnce(&mut A) -> std::result::Result<Vec<hodei_domain::DomainEvent>, E>,
) -> std::result::Result<Option<A>, E>
where
    A: Aggregate,
    E: From<StoreError>,
{
    let mut tx = store.begin().await?;
    let changed = change_in(&mut tx, id, change).await??;
    commit(tx).await?;
    Ok(changed)
}

/// One of the independent changes [`change_many`] makes: the aggregate's id, what to apply
/// to it, and the span its handling is traced in (its message's).
pub struct Change<T> {
    pub id: Uuid,
    pub input: T,
    pub span: tracing::Span,
}

/// [`change`] for many independent changes at once, in one transaction and one commit
/// (group commit: what a consumer does with a batch of messages). Each change has its own
/// outcome, in order: one its aggregate refuses (an error from `change`, which writes
/// nothing) is that one's error, and the others are saved. If the transaction itself fails
/// (a version conflict, a deadlock, the database), every change is made again alone
/// ([`change_each`]), so that one change never fails its neighbours.
pub async fn change_many<A, T, E, F>(
    store: &Store,
    changes: &[Change<T>],
    change: F,
) -> Vec<std::result::Result<Option<A>, E>>
where
    A: Aggregate,
    T: Clone,
    E: From<StoreError>,
    F: Fn(&mut A, T) -> std::result::Result<Vec<hodei_domain::DomainEvent>, E>,
{
    use tracing::Instrument;
    if changes.len() > 1 {
        let together = async {
            let mut tx = store.begin().await?;
            let outcomes = change_all_in(&mut tx, changes, &change).await?;
            commit(tx).instrument(changes[0].span.clone()).await?;
            Ok::<_, StoreError>(outcomes)
        };
        match together.await {
            Ok(outcomes) => return outcomes,
            Err(error) => tracing::warn!(
                %error,
                changes = changes.len(),
                "a batch's transaction failed; making its changes one at a time"
            ),
        }
    }
    change_each(store, changes, &change).await
}

/// Each change of a batch alone ([`change`]), in a transaction of its own: a batch's
/// fallback when its one transaction failed. The outcomes in the order given.
pub async fn change_each<A, T, E, F>(
    store: &Store,
    changes: &[Change<T>],
    change: &F,
) -> Vec<std::result::Result<Option<A>, E>>
where
    A: Aggregate,
    T: Clone,
    E: From<StoreError>,
    F: Fn(&mut A, T) -> std::result::Result<Vec<hodei_domain::DomainEvent>, E>,
{
    use tracing::Instrument;
    let mut outcomes = Vec::with_capacity(changes.len());
    for one in changes {
        let outcome = self::change(store, one.id, |aggregate| {
            change(aggregate, one.input.clone())
        })
        .instrument(one.span.clone())
        .await;
        outcomes.push(outcome);
    }
    outcomes
}

/// Every change of a batch inside the caller's transaction `tx` (which the caller commits,
/// with whatever else it writes), their outcomes in the order given. The aggregates are
/// locked at once, in id order (so that two batches of the same kind of aggregate never
/// wait for each other in a circle), changed in id order (changes of one aggregate in the
/// order given, each on what the one before left), and the changed ones written at once.
pub async fn change_all_in<A, T, E, F>(
    tx: &mut Tx,
    changes: &[Change<T>],
    change: &F,
) -> Result<Vec<std::result::Result<Option<A>, E>>>
where
    A: Aggregate,
    T: Clone,
    F: Fn(&mut A, T) -> std::result::Result<Vec<hodei_domain::DomainEvent>, E>,
{
    use tracing::Instrument;
    let mut ids: Vec<Uuid> = changes.iter().map(|c| c.id).collect();
    ids.sort();
    ids.dedup();
    let mut locked: Vec<A> = A::lock_all(tx, &ids).await?;
    let mut order: Vec<usize> = (0..changes.len()).collect();
    order.sort_by_key(|&i| changes[i].id);
    let mut outcomes = Vec::with_capacity(changes.len());
    // For each changed aggregate (by its place in `locked`), its last change's outcome.
    let mut changed: Vec<(usize, usize)> = Vec::new();
    for i in order {
        let one = &changes[i];
        let Some(at) = locked.iter().position(|a| a.id() == one.id) else {
            outcomes.push((i, Ok(None)));
            continue;
        };
        // A refused change leaves the aggregate as it was for the next one.
        let mut candidate = locked[at].clone();
        match one
            .span
            .in_scope(|| change(&mut candidate, one.input.clone()))
        {
            Ok(events) => {
                if !events.is_empty() {
                    outbox::append_events(tx, &events)
                        .instrument(one.span.clone())
                        .await?;
                    changed.retain(|(a, _)| *a != at);
                    changed.push((at, outcomes.len()));
                }
                locked[at] = candidate.clone();
                outcomes.push((i, Ok(Some(candidate))));
            }
            Err(refused) => outcomes.push((i, Err(refused))),
        }
    }
    let mut written: Vec<&mut A> = locked
        .iter_mut()
        .enumerate()
        .filter(|(at, _)| changed.iter().any(|(a, _)| a == at))
        .map(|(_, aggregate)| aggregate)
        .collect();
    tx.save_all(&mut written, &[]).await?;
    // Each changed aggregate's last outcome is as its row now holds it.
    for (at, outcome) in changed {
        outcomes[outcome].1 = Ok(Some(locked[at].clone()));
    }
    outcomes.sort_by_key(|(i, _)| *i);
    Ok(outcomes.into_iter().map(|(_, outcome)| outcome).collect())
}

/// One change inside `tx`: lock the aggregate, apply `change`, save it with its events. The
/// inner result is the aggregate's answer: `Ok(None)` when there is none, the change's
/// refusal (nothing written), or the aggregate as the change left it.
async fn change_in<A, E>(
    tx: &mut Tx,
    id: Uuid,
    change: impl FnOnce(&mut A) -> std::result::Result<Vec<hodei_domain::DomainEvent>, E>,
) -> Result<std::result::Result<Option<A>, E>>
where
    A: Aggregate,
{
    let Some(mut aggregate) = A::lock(tx, id).await? else {
        return Ok(Ok(None));
    };
    match change(&mut aggregate) {
        Ok(events) => {
            if !events.is_empty() {
                tx.save(&mut aggregate, &events).await?;
            }
            Ok(Ok(Some(aggregate)))
        }
        Err(refused) => Ok(Err(refused)),
    }
}

/// Connect and bring the schema up to date; what every service does at start-up.
pub async fn connect_and_migrate(url: &str, max_connections: u32) -> Result<PgPool> {
    let pool = connect(url, max_connections).await?;
    migrate(&pool).await?;
    Ok(pool)
}

impl From<StoreError> for hodei_protocol::ApiError {
    fn from(error: StoreError) -> Self {
        use hodei_protocol::{ApiError, ErrorCode};
        match &error {
            StoreError::VersionConflict { .. } => {
                ApiError::new(ErrorCode::Conflict, error.to_string())
            }
            e if e.is_transient() => ApiError::new(
                ErrorCode::Unavailable,
                format!("storage unavailable: {error}"),
            ),
            _ => ApiError::internal(error.to_string()),
        }
    }
}

/// Register a gauge `metric{state}` counting the rows of `table` (jobs or workers) in each of
/// `states`, computed when /metrics is scraped.
pub fn register_state_gauges(
    metrics: &mut hodei_runtime::metrics::Metrics,
    pool: &PgPool,
    table: &'static str,
    metric: &'static str,
    help: &'static str,
    states: Vec<&'static str>,
) {
    use hodei_runtime::metrics::Sample;
    let pool = pool.clone();
    metrics.gauges_on_scrape(table, &[(metric, help)], move || {
        let (pool, states) = (pool.clone(), states.clone());
        Box::pin(async move {
            let sql = format!("SELECT state, count(*) FROM {table} GROUP BY state");
            let counts: Vec<(String, i64)> = sqlx::query_as(&sql)
                .fetch_all(&pool)
                .await
                .map_err(|e| format!("counting {table} by state: {e}"))?;
            Ok(states
                .iter()
                .map(|state| {
                    let n = counts
                        .iter()
                        .find(|(s, _)| s == state)
                        .map_or(0, |(_, n)| *n);
                    Sample::new(metric, vec![("state", (*state).to_owned())], n as f64)
                })
                .collect())
        })
    });
}
