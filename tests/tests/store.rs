//! The persistence rules, against a real PostgreSQL database of the test's own.

use hodei_domain::{Actor, Job, JobSpec};
use hodei_store::{audit, jobs, outbox, Store, StoreError};
use hodei_tests::Database;
use sqlx::postgres::PgListener;
use uuid::Uuid;

async fn migrated() -> (Database, sqlx::PgPool) {
    let db = Database::create().await;
    let pool = hodei_store::connect_and_migrate(&db.url, 4).await.unwrap();
    (db, pool)
}

fn new_job(key: Option<&str>) -> (Job, Vec<hodei_domain::DomainEvent>) {
    let spec = JobSpec {
        command: "true".into(),
        ..Default::default()
    };
    Job::submit(
        Uuid::now_v7(),
        spec,
        Default::default(),
        "corr".into(),
        key.map(str::to_owned),
        &Actor::service("test"),
    )
    .unwrap()
}

/// A new job of concurrency key `key` (with its limit) and `priority`, in a container if
/// `image`.
fn keyed_job(key: Option<(&str, u32)>, priority: i32, image: bool) -> Job {
    let spec = JobSpec {
        command: "true".into(),
        image: image.then(|| "debian".into()),
        concurrency: key.map(|(key, max)| hodei_domain::Concurrency {
            key: key.into(),
            max,
        }),
        ..Default::default()
    };
    let policy = hodei_domain::JobPolicy {
        priority,
        ..Default::default()
    };
    let actor = Actor::service("test");
    Job::submit(Uuid::now_v7(), spec, policy, "corr".into(), None, &actor)
        .unwrap()
        .0
}

/// The placement's looks without a lock (`placement_looks`, `any_live_pooled`): a job
/// waits only while Pending with its backoff over; without a warm pool a waiting job needs
/// room or a free ready worker, with one a free ready worker or a container job waiting;
/// workers count as alive (and pool workers live) only while neither Terminating nor
/// Terminated, as the capacity count counts them.
#[tokio::test]
async fn the_lock_free_looks_see_waiting_jobs_and_live_pool_workers_only() {
    let (_db, pool) = migrated().await;
    let insert_job = |state: &'static str, not_before: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query(&format!(
                "INSERT INTO jobs (id, state, spec, attempt, correlation_id, version, created_at, updated_at, priority, not_before) \
                 VALUES (gen_random_uuid(), '{state}', '{{\"command\":\"true\"}}', 1, 'c', 1, now(), now(), 0, {not_before})"
            ))
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    let insert_worker = |state: &'static str, pooled: bool| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO workers (id, state, provider, correlation_id, version, created_at, updated_at, pooled) \
                 VALUES (gen_random_uuid(), $1, 'process', 'c', 1, now(), now(), $2)",
            )
            .bind(state)
            .bind(pooled)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    // Without a warm pool, with room for ten workers: a job must wait (Pending, its backoff
    // over), and there must be room or a free ready worker.
    let looks = |pool_kept: bool, max_workers: u32| {
        let pool = pool.clone();
        async move {
            hodei_store::placement_looks(&pool, pool_kept, max_workers)
                .await
                .unwrap()
        }
    };
    let placeable = |pool_kept: bool, max_workers: u32| {
        let looks = looks.clone();
        async move { looks(pool_kept, max_workers).await.placeable }
    };
    // The pool workers alive: as `any_live_pooled` sees them without a pool, never with one.
    let live_pooled = || {
        let (pool, looks) = (pool.clone(), looks.clone());
        async move {
            let alone = hodei_store::workers::any_live_pooled(&pool).await.unwrap();
            assert_eq!(looks(false, 10).await.live_pooled, alone);
            assert!(!looks(true, 10).await.live_pooled);
            alone
        }
    };
    assert!(!placeable(false, 10).await);
    insert_job("Succeeded", "NULL").await;
    insert_job("Pending", "now() + interval '1 hour'").await;
    assert!(!placeable(false, 10).await, "no job waits");
    insert_job("Pending", "NULL").await;
    assert!(placeable(false, 10).await);
    insert_worker("Busy", false).await;
    insert_worker("Terminated", false).await;
    assert!(
        !placeable(false, 1).await,
        "at capacity (Terminated ones do not count)"
    );
    assert!(placeable(false, 2).await);

    assert!(!live_pooled().await);
    insert_worker("Terminated", true).await;
    insert_worker("Terminating", true).await;
    assert!(
        !placeable(true, 10).await,
        "a pool, none free, no container job"
    );
    insert_worker("Ready", false).await;
    assert!(!live_pooled().await);
    assert!(placeable(true, 10).await, "a free ready worker");
    assert!(
        placeable(false, 4).await,
        "at capacity, but a worker is free"
    );
    insert_worker("Ready", true).await;
    assert!(live_pooled().await);
    sqlx::query("UPDATE workers SET state = 'Busy' WHERE state = 'Ready'")
        .execute(&pool)
        .await
        .unwrap();
    assert!(!placeable(true, 10).await);
    sqlx::query(
        "INSERT INTO jobs (id, state, spec, attempt, correlation_id, version, created_at, updated_at, priority) \
         VALUES (gen_random_uuid(), 'Pending', '{\"command\":\"true\",\"image\":\"x\"}', 1, 'c', 1, now(), now(), 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert!(placeable(true, 10).await, "a container job waits");
}

#[tokio::test]
async fn a_stale_update_is_refused_by_the_version_check() {
    let (_db, pool) = migrated().await;
    let (job, _) = new_job(None);
    jobs::insert(&mut *pool.acquire().await.unwrap(), &job)
        .await
        .unwrap();
    let mut first = jobs::get(&pool, job.id).await.unwrap().unwrap();
    let mut second = first.clone();
    first.assign(Uuid::now_v7(), &Actor::service("a")).unwrap();
    jobs::update(&mut *pool.acquire().await.unwrap(), &mut first)
        .await
        .unwrap();
    second
        .schedule(Uuid::now_v7(), &Actor::service("b"))
        .unwrap();
    let err = jobs::update(&mut *pool.acquire().await.unwrap(), &mut second)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { .. }), "{err}");
    assert!(err.is_transient());
    let stored = jobs::get(&pool, job.id).await.unwrap().unwrap();
    assert_eq!(stored.state, hodei_domain::JobState::Assigned);
    assert_eq!(stored.version, 1);
}

#[tokio::test]
async fn an_idempotency_key_is_taken_once() {
    let (_db, pool) = migrated().await;
    let mut conn = pool.acquire().await.unwrap();
    assert!(jobs::insert(&mut conn, &new_job(Some("k")).0)
        .await
        .unwrap());
    assert!(!jobs::insert(&mut conn, &new_job(Some("k")).0)
        .await
        .unwrap());
    assert!(jobs::insert(&mut conn, &new_job(None).0).await.unwrap());
    assert!(
        jobs::insert(&mut conn, &new_job(None).0).await.unwrap(),
        "jobs without a key never collide"
    );
}

#[tokio::test]
async fn outbox_rows_are_read_in_order_after_their_grace_and_a_publisher_can_wake_the_relay() {
    let (_db, pool) = migrated().await;
    let mut listener = PgListener::connect_with(&pool).await.unwrap();
    listener.listen(outbox::NOTIFY_CHANNEL).await.unwrap();
    let (job, events) = new_job(None);
    let mut tx = Store::new(pool.clone()).begin().await.unwrap();
    jobs::insert(&mut tx, &job).await.unwrap();
    outbox::append_events(&mut tx, &events).await.unwrap();
    outbox::append_events(&mut tx, &events[..0]).await.unwrap();
    hodei_store::commit(tx).await.unwrap();
    let due = outbox::next_due(
        &mut *pool.acquire().await.unwrap(),
        std::time::Duration::from_secs(60),
    )
    .await
    .unwrap()
    .expect("rows are pending");
    assert!(
        due > chrono::Utc::now() + chrono::TimeDelta::seconds(50),
        "due once the grace is over"
    );
    // Commits notify nobody; a publisher that could not publish wakes the relay.
    outbox::notify_relay(&mut *pool.acquire().await.unwrap())
        .await
        .unwrap();
    let notification = tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(notification.channel(), outbox::NOTIFY_CHANNEL);

    let mut tx = pool.begin().await.unwrap();
    let grace = std::time::Duration::from_secs(60);
    assert!(
        outbox::lock_pending(&mut tx, 10, grace)
            .await
            .unwrap()
            .is_empty(),
        "rows within the grace are left to their writer's publisher"
    );
    let pending = outbox::lock_pending(&mut tx, 10, std::time::Duration::ZERO)
        .await
        .unwrap();
    let ids: Vec<Uuid> = pending.iter().map(|r| r.message.event_id).collect();
    assert_eq!(ids, events.iter().map(|e| e.event_id).collect::<Vec<_>>());
    assert_eq!(
        pending[0].message.subject,
        format!("hodei.events.job.{}.JobCreated", job.id)
    );
    assert_eq!(pending[0].message.correlation_id.as_deref(), Some("corr"));
    let stored: serde_json::Value = serde_json::from_str(&pending[0].message.payload).unwrap();
    assert_eq!(stored["event_id"], events[0].event_id.to_string());
    let published: Vec<i64> = pending.iter().map(|r| r.id).collect();
    outbox::mark_published(&mut tx, &published).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        outbox::pending_count(&mut *pool.acquire().await.unwrap())
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn an_event_is_audited_once_however_often_it_arrives() {
    let (_db, pool) = migrated().await;
    let (_, events) = new_job(None);
    assert_eq!(audit::record(&pool, &events).await.unwrap(), 2);
    assert_eq!(audit::record(&pool, &events).await.unwrap(), 0);
    let query = hodei_protocol::api::AuditQuery {
        correlation_id: Some("corr".into()),
        limit: Some(1),
        ..Default::default()
    };
    let (page, next) = audit::query(&pool, &query).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].event_type, "JobCreated");
    let (rest, end) = audit::query(
        &pool,
        &hodei_protocol::api::AuditQuery {
            cursor: next,
            ..query
        },
    )
    .await
    .unwrap();
    assert_eq!(rest[0].event_type, "JobQueued");
    assert_eq!(end, None);
}

/// The rows of a committed transaction reach the store's publisher, once; a transaction
/// rolled back hands nothing over, and a store without a publisher leaves them to the relay.
#[tokio::test]
async fn committed_outbox_rows_are_handed_to_the_publisher_and_rolled_back_ones_are_not() {
    let (_db, pool) = migrated().await;
    let (sender, receiver) = std::sync::mpsc::channel();
    let sender = std::sync::Mutex::new(sender);
    let store = Store::new(pool.clone()).publishing_to(std::sync::Arc::new(move |rows| {
        sender.lock().unwrap().send(rows).unwrap()
    }));

    let (job, events) = new_job(None);
    let mut tx = store.begin().await.unwrap();
    jobs::insert(&mut tx, &job).await.unwrap();
    outbox::append_events(&mut tx, &events).await.unwrap();
    drop(tx);
    assert!(receiver.try_recv().is_err(), "a rollback publishes nothing");

    let mut tx = store.begin().await.unwrap();
    jobs::insert(&mut tx, &job).await.unwrap();
    outbox::append_events(&mut tx, &events).await.unwrap();
    hodei_store::commit(tx).await.unwrap();
    let rows = receiver.try_recv().expect("the commit hands its rows over");
    assert_eq!(
        rows.iter().map(|r| r.event_id).collect::<Vec<_>>(),
        events.iter().map(|e| e.event_id).collect::<Vec<_>>()
    );
    assert_eq!(rows[0].correlation_id.as_deref(), Some("corr"));
    let payload: hodei_domain::DomainEvent = serde_json::from_str(&rows[0].payload).unwrap();
    assert_eq!(payload, events[0]);
    assert!(receiver.try_recv().is_err(), "once");

    let (other, events) = new_job(None);
    let mut tx = Store::new(pool.clone()).begin().await.unwrap();
    tx.save(&mut other.clone(), &[]).await.unwrap_err();
    drop(tx);
    let mut tx = Store::new(pool.clone()).begin().await.unwrap();
    jobs::insert(&mut tx, &other).await.unwrap();
    outbox::append_events(&mut tx, &events).await.unwrap();
    hodei_store::commit(tx).await.unwrap();
    assert!(
        receiver.try_recv().is_err(),
        "another store's commits are not this publisher's"
    );
}

/// A save writes, in its own statement, the outbox rows appended before it and the events it
/// is given, in the order appended: a transaction whose last write is a save needs no
/// separate INSERT of its rows when it commits. A transaction with a save refused for its
/// version does not commit, so nothing that save wrote outlives it.
#[tokio::test]
async fn a_save_writes_the_outbox_rows_appended_before_it() {
    let (_db, pool) = migrated().await;
    let store = Store::new(pool.clone());
    let (mut job, created) = new_job(None);
    let mut tx = store.begin().await.unwrap();
    jobs::insert(&mut tx, &job).await.unwrap();
    hodei_store::commit(tx).await.unwrap();

    async fn written(conn: &mut sqlx::PgConnection) -> Vec<Uuid> {
        sqlx::query_scalar("SELECT event_id FROM outbox_events ORDER BY id")
            .fetch_all(conn)
            .await
            .unwrap()
    }
    let actor = Actor::service("test");
    let mut tx = store.begin().await.unwrap();
    outbox::append_events(&mut tx, &created).await.unwrap();
    assert!(
        written(&mut tx).await.is_empty(),
        "appended rows wait for a write"
    );
    let cancelled = [job.cancel("not wanted".into(), &actor).unwrap()];
    tx.save(&mut job, &cancelled).await.unwrap();
    let in_order: Vec<Uuid> = created
        .iter()
        .chain(&cancelled)
        .map(|event| event.event_id)
        .collect();
    assert_eq!(
        written(&mut tx).await,
        in_order,
        "the save's statement wrote the rows before it and its own events, in order"
    );
    hodei_store::commit(tx).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(written(&mut conn).await, in_order, "once each");

    // The same job saved again from its old version: refused. Its statement wrote its
    // events all the same, so the transaction refuses to commit, and they are gone with it.
    let mut stale = job.clone();
    stale.version -= 1;
    let mut tx = store.begin().await.unwrap();
    let again = new_job(None).1;
    assert!(matches!(
        tx.save(&mut stale, &again).await,
        Err(StoreError::VersionConflict { .. })
    ));
    assert!(matches!(
        hodei_store::commit(tx).await,
        Err(StoreError::SaveFailed(_))
    ));
    assert_eq!(written(&mut conn).await, in_order);
}

/// Marking outbox rows published leaves each on its page (half of every page is kept free
/// for it): PostgreSQL then logs only the columns that changed, not the whole row again on
/// another page. Rows written as the services write them: a few jobs' events per commit,
/// marked in batches as the publisher marks them.
#[tokio::test]
async fn marking_outbox_rows_published_updates_them_on_their_page() {
    let (_db, pool) = migrated().await;
    let store = Store::new(pool.clone());
    let mut events = Vec::new();
    for _ in 0..40 {
        let mut tx = store.begin().await.unwrap();
        for _ in 0..3 {
            let (job, job_events) = new_job(None);
            jobs::insert(&mut tx, &job).await.unwrap();
            outbox::append_events(&mut tx, &job_events).await.unwrap();
            events.extend(job_events.iter().map(|e| e.event_id));
        }
        hodei_store::commit(tx).await.unwrap();
    }
    // Each row's page: the block number of its ctid.
    let pages = || async {
        sqlx::query_as::<_, (Uuid, i64)>(
            "SELECT event_id, (ctid::text::point)[0]::bigint FROM outbox_events",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect::<std::collections::BTreeMap<Uuid, i64>>()
    };
    let before = pages().await;
    assert_eq!(before.len(), events.len());
    let distinct: std::collections::BTreeSet<&i64> = before.values().collect();
    assert!(
        distinct.len() > 4,
        "the rows fill several pages: {distinct:?}"
    );
    let mut conn = pool.acquire().await.unwrap();
    for batch in events.chunks(50) {
        assert_eq!(
            outbox::mark_published_events(&mut conn, batch)
                .await
                .unwrap(),
            batch.len() as u64
        );
    }
    let after = pages().await;
    let moved: Vec<&Uuid> = before
        .iter()
        .filter(|(id, page)| after.get(*id) != Some(*page))
        .map(|(id, _)| id)
        .collect();
    assert!(
        moved.is_empty(),
        "{} of {} rows moved to another page when marked",
        moved.len(),
        before.len()
    );
}

/// A backlog of 50,000 pending jobs over 100,000 ended ones, 20,000 ended workers and
/// 300,000 published outbox rows: no hot query reads the jobs or the outbox whole.
#[tokio::test]
async fn no_hot_query_scans_jobs_or_the_outbox_with_a_big_backlog() {
    let (_db, pool) = migrated().await;
    sqlx::raw_sql(
        "INSERT INTO jobs (id, state, spec, attempt, correlation_id, version, created_at, updated_at, priority) \
         SELECT gen_random_uuid(), CASE WHEN g <= 100000 THEN 'Succeeded' ELSE 'Pending' END, \
                '{\"command\":\"true\"}', 1, 'c' || g, 1, now() - make_interval(secs => 200000 - g), now(), g % 3 \
         FROM generate_series(1, 150000) g; \
         INSERT INTO workers (id, state, provider, correlation_id, version, created_at, updated_at) \
         SELECT gen_random_uuid(), 'Terminated', 'process', 'c' || g, 1, now(), now() \
         FROM generate_series(1, 20000) g; \
         INSERT INTO outbox_events (event_id, kind, subject, aggregate_type, aggregate_id, event_type, payload, status) \
         SELECT gen_random_uuid(), 'event', 'hodei.events.job.x', 'job', gen_random_uuid(), 'JobQueued', '{}', \
                CASE WHEN g <= 300000 THEN 'published' ELSE 'pending' END \
         FROM generate_series(1, 301000) g; \
         ANALYZE jobs; ANALYZE workers; ANALYZE outbox_events;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let plans = hodei_store::plans::explain_hot_queries(&mut conn)
        .await
        .unwrap();
    assert_eq!(plans.len(), hodei_store::plans::hot_queries().len());
    for (name, plan) in &plans {
        eprintln!("{name}:\n{plan}\n");
        let whole: Vec<String> = hodei_store::plans::sequential_scans(plan)
            .into_iter()
            .filter(|table| table == "jobs" || table == "outbox_events")
            .collect();
        assert!(whole.is_empty(), "{name} scans {whole:?}:\n{plan}");
    }
}

/// A batch of changes is one transaction; when the database refuses one of them (here an
/// event whose text PostgreSQL cannot store), the transaction fails and each change is made
/// alone: the others are saved with their events, the refused one changes nothing, and a
/// change the domain refuses (an ended job cancelled again) is that change's error only.
#[tokio::test]
async fn a_batch_of_changes_with_one_the_database_refuses_saves_all_the_others() {
    use hodei_store::Change;
    let (_db, pool) = migrated().await;
    let store = Store::new(pool.clone());
    let mut ids = Vec::new();
    for _ in 0..5 {
        let (job, _) = new_job(None);
        jobs::insert(&mut *pool.acquire().await.unwrap(), &job)
            .await
            .unwrap();
        ids.push(job.id);
    }
    // Job 3 is already cancelled: cancelling it again is refused by its state machine.
    hodei_store::change(&store, ids[3], |job: &mut Job| {
        Ok::<_, StoreError>(vec![job
            .cancel("before".into(), &Actor::service("t"))
            .unwrap()])
    })
    .await
    .unwrap();
    let reasons = ["a", "b", "poison \u{0}", "d", "e"];
    let changes: Vec<Change<&str>> = ids
        .iter()
        .zip(reasons)
        .map(|(id, reason)| Change {
            id: *id,
            input: reason,
            span: tracing::Span::none(),
        })
        .chain(std::iter::once(Change {
            id: Uuid::now_v7(),
            input: "no such job",
            span: tracing::Span::none(),
        }))
        .collect();
    let outcomes = hodei_store::change_many(&store, &changes, |job: &mut Job, reason: &str| {
        Ok::<_, hodei_protocol::ApiError>(
            vec![job.cancel(reason.to_owned(), &Actor::service("t"))?],
        )
    })
    .await;
    let summary: Vec<&str> = outcomes
        .iter()
        .map(|outcome| match outcome {
            Ok(Some(_)) => "saved",
            Ok(None) => "none",
            Err(_) => "error",
        })
        .collect();
    assert_eq!(
        summary,
        ["saved", "saved", "error", "error", "saved", "none"],
        "{outcomes:?}"
    );
    for (i, id) in ids.iter().enumerate() {
        let job = jobs::get(&pool, *id).await.unwrap().unwrap();
        let cancelled = job.state == hodei_domain::JobState::Cancelled;
        assert_eq!(cancelled, i != 2, "job {i}: {:?}", job.state);
        let (events,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM outbox_events WHERE aggregate_id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(events, if i == 2 { 0 } else { 1 }, "job {i}'s events");
    }
}

/// Changes of one aggregate in one batch are made in turn, each on what the one before left:
/// a refused change leaves the job as it was, and the next change of it still applies; the
/// job is written once, with every accepted change's events.
#[tokio::test]
async fn changes_of_one_job_in_a_batch_each_see_the_one_before() {
    use hodei_store::Change;
    let (_db, pool) = migrated().await;
    let store = Store::new(pool.clone());
    let (job, _) = new_job(None);
    jobs::insert(&mut *pool.acquire().await.unwrap(), &job)
        .await
        .unwrap();
    let worker = Uuid::now_v7();
    // Assign, assign again (refused: it is Assigned), start; and a change of another job.
    let steps = ["assign", "assign", "start", "other"];
    let other = new_job(None).0;
    jobs::insert(&mut *pool.acquire().await.unwrap(), &other)
        .await
        .unwrap();
    let changes: Vec<Change<&str>> = steps
        .iter()
        .map(|step| Change {
            id: if *step == "other" { other.id } else { job.id },
            input: *step,
            span: tracing::Span::none(),
        })
        .collect();
    let outcomes = hodei_store::change_many(&store, &changes, |job: &mut Job, step: &str| {
        let actor = Actor::service("t");
        let event = match step {
            "start" => job.start(worker, &actor)?,
            _ => job.assign(worker, &actor)?,
        };
        Ok::<_, hodei_protocol::ApiError>(vec![event])
    })
    .await;
    let states: Vec<String> = outcomes
        .iter()
        .map(|outcome| match outcome {
            Ok(Some(job)) => job.state.to_string(),
            Ok(None) => "none".into(),
            Err(_) => "refused".into(),
        })
        .collect();
    assert_eq!(
        states,
        ["Assigned", "refused", "Running", "Assigned"],
        "{outcomes:?}"
    );
    let stored = jobs::get(&pool, job.id).await.unwrap().unwrap();
    assert_eq!(stored.state, hodei_domain::JobState::Running);
    assert_eq!(stored.version, 1, "written once, with both changes");
    let (events,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM outbox_events WHERE aggregate_id = $1")
            .bind(job.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(events, 2, "the assignment's and the start's events");
}

/// The next jobs a batch of pool workers takes together ([`jobs::lock_next_pending_many`])
/// are the jobs that one hand-over after the other takes: by priority, the keys taking
/// turns, a job only while fewer than its own limit of its key are placed (counting the
/// key's jobs placed already and those taken before it), a job that may not go holding back
/// the rest of its key, then by age. The expected order is worked out by hand below.
#[tokio::test]
async fn the_next_jobs_taken_together_are_those_taken_one_after_the_other() {
    let (_db, pool) = migrated().await;
    let actor = Actor::service("test");
    let submit = |key: Option<(&str, u32)>, priority: i32| keyed_job(key, priority, false);
    let mut conn = pool.acquire().await.unwrap();
    // One job of key a is placed.
    let mut placed = submit(Some(("a", 2)), 9);
    jobs::insert(&mut conn, &placed).await.unwrap();
    placed.assign(Uuid::now_v7(), &actor).unwrap();
    jobs::update(&mut conn, &mut placed).await.unwrap();
    // In the order of creation (each one older than the next):
    let waiting = [
        ("n0", None, 0),
        ("c0", Some(("c", 2)), 5),
        ("b0", Some(("b", 3)), 0),
        ("n1", None, 5),
        // Its own limit is 1 and one of a is placed: it may not go, nor a2 behind it.
        ("a1", Some(("a", 1)), 5),
        // Behind b0, b1 would be b's second: over its own limit of 1; b2 waits behind it.
        ("b1", Some(("b", 1)), 0),
        ("c1", Some(("c", 2)), 5),
        ("a2", Some(("a", 3)), 0),
        ("b2", Some(("b", 3)), 0),
        ("n2", None, 0),
        // c's third: over c's limit of 2.
        ("c2", Some(("c", 2)), 5),
    ];
    let mut ids = std::collections::HashMap::new();
    for (name, key, priority) in waiting {
        let job = submit(key, priority);
        jobs::insert(&mut conn, &job).await.unwrap();
        ids.insert(job.id, name);
    }
    drop(conn);
    let names = |jobs: &[Job]| jobs.iter().map(|job| ids[&job.id]).collect::<Vec<_>>();
    // Priority 5 first: c0 and n1 (each its key's first; c0 is older), then c1 (c's
    // second); then priority 0: b0, n0 (the default group's second), n2 (its third).
    let expected = ["c0", "n1", "c1", "b0", "n0", "n2"];

    let mut tx = pool.begin().await.unwrap();
    let mut one_by_one = Vec::new();
    while let Some(mut job) = jobs::lock_next_pending(&mut tx, jobs::Kinds::Processes)
        .await
        .unwrap()
    {
        job.assign(Uuid::now_v7(), &actor).unwrap();
        jobs::update(&mut tx, &mut job).await.unwrap();
        one_by_one.push(job);
    }
    tx.rollback().await.unwrap();
    assert_eq!(names(&one_by_one), expected);

    for n in 1..=8 {
        let mut tx = pool.begin().await.unwrap();
        let (together, passed_over) =
            jobs::lock_next_pending_many(&mut tx, jobs::Kinds::Processes, n)
                .await
                .unwrap();
        assert_eq!(names(&together), expected[..n.min(6)], "{n} together");
        assert!(!passed_over);
        tx.rollback().await.unwrap();
    }
}

/// The statements that take a list of ids as parameters, padded to a power of two with the
/// last id repeated (`push_id_list`), act on each listed row once, whatever the list's length
/// (1, 3 padded to 4, 5 padded to 8), and on no other; the reports' conditional placement
/// lock (`workers::lock_reporting`) is taken for exactly the lists with a pool worker that
/// may take a next job.
#[tokio::test]
async fn lists_of_ids_act_on_each_listed_row_once_whatever_their_length() {
    let (_db, pool) = migrated().await;
    let mut workers = Vec::new();
    for (state, pooled, jobs_run) in [
        ("Ready", true, 0),
        ("Busy", true, 0),
        ("Ready", true, 5),
        ("Terminated", true, 0),
        ("Busy", false, 0),
    ] {
        let (id,): (Uuid,) = sqlx::query_as(
            "INSERT INTO workers (id, state, provider, correlation_id, version, created_at, updated_at, pooled, max_jobs, jobs_run) \
             VALUES (gen_random_uuid(), $1, 'process', 'c', 1, now(), now(), $2, 5, $3) RETURNING id",
        )
        .bind(state)
        .bind(pooled)
        .bind(jobs_run)
        .fetch_one(&pool)
        .await
        .unwrap();
        workers.push(id);
    }
    let sorted = |mut ids: Vec<Uuid>| {
        ids.sort();
        ids
    };
    let store = hodei_store::workers::pooled_with_jobs_left;
    assert_eq!(store(&pool, &workers[..1]).await.unwrap(), vec![workers[0]]);
    assert_eq!(
        sorted(store(&pool, &workers[..3]).await.unwrap()),
        sorted(workers[..2].to_vec()),
        "the third has run its jobs"
    );
    assert_eq!(
        sorted(store(&pool, &workers).await.unwrap()),
        sorted(vec![workers[0], workers[1], workers[3]]),
        "a list of five: every pooled worker with jobs left (the ended one too), once each"
    );
    assert!(store(&pool, &[]).await.unwrap().is_empty());

    // The reports' look and lock in one statement: the placement lock is taken exactly when
    // the list holds a pooled worker with jobs left, and held by the transaction.
    // The reporting workers' rows come with it, each once, in id order, whichever of them
    // may go on.
    for (ending, may_go_on, expected) in [
        (&workers[..1], &workers[..1], true),
        (&workers[2..3], &workers[2..3], false),
        (&workers[4..5], &workers[4..5], false),
        (&workers[2..5], &workers[2..5], true),
        (&workers[..], &workers[2..3], false),
        (&workers[..], &[][..], false),
        (&[][..], &[][..], false),
    ] {
        let mut tx = Store::new(pool.clone()).begin().await.unwrap();
        let (locked, reporting) = hodei_store::workers::lock_reporting(&mut tx, ending, may_go_on)
            .await
            .unwrap();
        let held = advisory_locks_held(&mut tx).await;
        assert_eq!(
            (locked, held),
            (expected, i64::from(expected)),
            "{ending:?}, {may_go_on:?}"
        );
        assert_eq!(
            reporting.iter().map(|w| w.id).collect::<Vec<_>>(),
            sorted(ending.to_vec())
        );
    }

    let now = chrono::Utc::now();
    let beat = |ids: Vec<Uuid>| {
        let pool = pool.clone();
        async move {
            hodei_store::workers::record_heartbeats(&pool, &ids, now, now)
                .await
                .unwrap()
        }
    };
    assert_eq!(beat(workers[..3].to_vec()).await, 3);
    assert_eq!(beat(workers.clone()).await, 4, "not the Terminated one");
    assert_eq!(beat(Vec::new()).await, 0);

    // The workers' own lists: every listed worker once, and none other; locked in id order.
    let unknown = Uuid::now_v7();
    for ids in [&workers[1..2], &workers[..3], &workers[..], &[][..]] {
        let mut with_unknown = ids.to_vec();
        with_unknown.push(unknown);
        let got = hodei_store::workers::get_all(&pool, &with_unknown)
            .await
            .unwrap();
        assert_eq!(
            sorted(got.iter().map(|w| w.id).collect()),
            sorted(ids.to_vec())
        );
        let live = hodei_store::workers::live_among(&pool, &with_unknown)
            .await
            .unwrap();
        assert_eq!(
            sorted(live),
            sorted(ids.iter().copied().filter(|id| *id != workers[3]).collect()),
            "not the Terminated one"
        );
        let mut tx = pool.begin().await.unwrap();
        let locked = hodei_store::workers::lock_all(&mut tx, &with_unknown)
            .await
            .unwrap();
        assert_eq!(
            locked.iter().map(|w| w.id).collect::<Vec<_>>(),
            sorted(ids.to_vec()),
            "each worker once, in id order"
        );
    }

    let mut events = Vec::new();
    let mut job_ids = Vec::new();
    let mut tx = Store::new(pool.clone()).begin().await.unwrap();
    for _ in 0..3 {
        let (job, job_events) = new_job(None);
        jobs::insert(&mut tx, &job).await.unwrap();
        outbox::append_events(&mut tx, &job_events).await.unwrap();
        events.extend(job_events.iter().map(|e| e.event_id));
        job_ids.push(job.id);
    }
    hodei_store::commit(tx).await.unwrap();
    assert_eq!(events.len(), 6);
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        outbox::mark_published_events(&mut conn, &events[..5])
            .await
            .unwrap(),
        5
    );
    assert_eq!(
        outbox::mark_published_events(&mut conn, &events)
            .await
            .unwrap(),
        1,
        "only the row still pending"
    );
    assert_eq!(outbox::pending_count(&mut conn).await.unwrap(), 0);

    let mut tx = pool.begin().await.unwrap();
    let locked = jobs::lock_all(&mut tx, &job_ids).await.unwrap();
    assert_eq!(
        locked.iter().map(|j| j.id).collect::<Vec<_>>(),
        sorted(job_ids.clone()),
        "each job once, in id order"
    );
}

/// On tables of thousands of rows, the statements that take a batch's ids get a generic plan
/// after a few calls, as a list of parameters does (`push_id_list`), instead of being planned
/// again at every call, as `id = ANY($1)` was (`pg_prepared_statements` of the one
/// connection they ran on: no generic plan in eight calls with an array).
#[tokio::test]
async fn the_statements_of_id_lists_are_planned_once_on_big_tables() {
    let (db, _pool) = migrated().await;
    let owner = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO workers (id, state, provider, correlation_id, version, created_at, updated_at, pooled) \
             SELECT gen_random_uuid(), CASE WHEN g % 100 = 0 THEN 'Ready' ELSE 'Terminated' END, \
                    'process', 'c', 1, now(), now(), g % 200 = 0 \
             FROM generate_series(1, 20000) g; \
         INSERT INTO outbox_events (event_id, kind, subject, aggregate_type, aggregate_id, event_type, payload, status) \
             SELECT gen_random_uuid(), 'event', 'hodei.events.job.x.JobCreated', 'job', gen_random_uuid(), \
                    'JobCreated', '{}', 'published' \
             FROM generate_series(1, 20000); \
         ANALYZE workers; ANALYZE outbox_events;",
    )
    .execute(&owner)
    .await
    .unwrap();
    let (live,): (Uuid,) = sqlx::query_as("SELECT id FROM workers WHERE state = 'Ready' LIMIT 1")
        .fetch_one(&owner)
        .await
        .unwrap();
    let one = one_connection(&db.url).await;
    let now = chrono::Utc::now();
    for _ in 0..8 {
        hodei_store::workers::record_heartbeats(&one, &[live], now, now)
            .await
            .unwrap();
        hodei_store::workers::pooled_with_jobs_left(&one, &[live])
            .await
            .unwrap();
        outbox::mark_published_events(&mut *one.acquire().await.unwrap(), &[Uuid::new_v4()])
            .await
            .unwrap();
        hodei_store::workers::get_all(&one, &[live]).await.unwrap();
        hodei_store::workers::live_among(&one, &[live])
            .await
            .unwrap();
        let mut tx = one.begin().await.unwrap();
        hodei_store::workers::lock_all(&mut tx, &[live])
            .await
            .unwrap();
        hodei_store::workers::lock_reporting(&mut tx, &[live], &[live])
            .await
            .unwrap();
        tx.rollback().await.unwrap();
    }
    // The heartbeats, the pool look, the marking; the workers of a list, those of them
    // alive, the workers of a list locked, and the reporting workers locked with the look.
    assert_planned_once(
        &one,
        &[
            "WITH beating%",
            "SELECT id FROM workers WHERE id%",
            "UPDATE outbox_events SET status%",
            "SELECT id, state, provider, % FROM workers WHERE id IN%",
            "WITH look AS%",
        ],
        7,
    )
    .await;
}

/// A pool of one connection to `url`: its prepared statements are the ones counted.
async fn one_connection(url: &str) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .unwrap()
}

/// The prepared statements of `one` (one connection) whose text is like one of `patterns`:
/// there are `expected` of them, and each took a generic plan after at most five made for
/// its values.
async fn assert_planned_once(one: &sqlx::PgPool, patterns: &[&str], expected: usize) {
    let plans: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements \
         WHERE statement LIKE ANY($1)",
    )
    .bind(patterns)
    .fetch_all(one)
    .await
    .unwrap();
    assert_eq!(plans.len(), expected, "{plans:?}");
    for (statement, generic, custom) in &plans {
        assert!(
            *generic > 0 && *custom <= 5,
            "planned at every call ({custom} custom plans, {generic} generic): {statement}"
        );
    }
}

/// The queue's statements (the next job; the next jobs, locked) are planned once per
/// connection: with the kinds of job or the count as parameters, PostgreSQL planned them
/// again at every call.
#[tokio::test]
async fn the_queue_statements_are_planned_once() {
    let (db, _pool) = migrated().await;
    let owner = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO jobs (id, state, spec, attempt, correlation_id, version, created_at, updated_at) \
             SELECT gen_random_uuid(), CASE WHEN g % 1000 < 3 THEN 'Pending' \
                                            WHEN g % 1000 < 8 THEN 'Running' ELSE 'Succeeded' END, \
                    CASE WHEN g % 2 = 0 THEN '{\"command\":\"true\"}' \
                         ELSE '{\"command\":\"true\",\"image\":\"i\"}' END::jsonb, \
                    1, 'c', 1, now() - make_interval(secs => g), now() \
             FROM generate_series(1, 20000) g; \
         ANALYZE jobs;",
    )
    .execute(&owner)
    .await
    .unwrap();
    let one = one_connection(&db.url).await;
    for _ in 0..8 {
        let mut tx = one.begin().await.unwrap();
        let next = jobs::lock_next_pending(&mut tx, jobs::Kinds::Processes)
            .await
            .unwrap()
            .expect("a process job waits");
        let (three, _) = jobs::lock_next_pending_many(&mut tx, jobs::Kinds::Processes, 3)
            .await
            .unwrap();
        assert_eq!(three.len(), 3);
        assert_eq!(three[0].id, next.id);
        // Thirteen is more than one statement takes (eight, then sixteen): eight, and the
        // caller is told that more may wait.
        let (eight, more) = jobs::lock_next_pending_many(&mut tx, jobs::Kinds::Processes, 13)
            .await
            .unwrap();
        assert_eq!((eight.len(), more), (8, true));
        let ids = |jobs: &[Job]| jobs.iter().map(|job| job.id).collect::<Vec<_>>();
        assert_eq!(ids(&eight[..3]), ids(&three));
        assert!(
            jobs::is_next_pending(&mut tx, jobs::Kinds::Processes, next.id)
                .await
                .unwrap()
        );
        assert!(jobs::lock_next_pending(&mut tx, jobs::Kinds::Containers)
            .await
            .unwrap()
            .is_some_and(|job| job.spec.image.is_some()));
        tx.rollback().await.unwrap();
        assert!(jobs::next_pending(&one, jobs::Kinds::Any)
            .await
            .unwrap()
            .is_some());
    }
    // The next job of processes and of any kind; the next one, three and eight of processes
    // locked; the next container job locked.
    assert_planned_once(&one, &["WITH RECURSIVE keys%"], 6).await;
}

/// A warm-pool worker in `state`, written as it is (no outbox row).
async fn pool_worker(pool: &sqlx::PgPool, state: &str) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO workers (id, state, provider, correlation_id, version, created_at, updated_at, pooled) \
         VALUES ($1, $2, 'process', 'c', 1, now(), now(), true)",
    )
    .bind(id)
    .bind(state)
    .execute(pool)
    .await
    .unwrap();
    id
}

/// A new job, not written yet, gets the free worker (`lock_free_ready_for_first`) exactly when,
/// once written Pending, the placement's own look ([`jobs::lock_next_pending`]) would take it
/// next: no other process job waits (one in a backoff or for a container does not count) and
/// its concurrency key has a slot free. With no free worker it gets none.
#[tokio::test]
async fn a_new_job_takes_the_free_worker_first_exactly_when_placement_would_take_it_next() {
    let (_db, pool) = migrated().await;
    let actor = Actor::service("test");
    let submit = |key: Option<(&str, u32)>, image: bool| keyed_job(key, 0, image);
    // Whether `new` gets the free worker, and whether placement, once it is written, takes it.
    let check = |new: Job| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            let (key, max) = new
                .spec
                .concurrency
                .as_ref()
                .map_or(("", None), |c| (c.key.as_str(), Some(c.max as i32)));
            let first = hodei_store::workers::lock_free_ready_for_first(&mut tx, key, max)
                .await
                .unwrap()
                .is_some();
            jobs::insert(&mut tx, &new).await.unwrap();
            let next = jobs::lock_next_pending(&mut tx, jobs::Kinds::Processes)
                .await
                .unwrap();
            tx.rollback().await.unwrap();
            (first, next.is_some_and(|next| next.id == new.id))
        }
    };
    let write = |mut job: Job, assign: bool| {
        let pool = pool.clone();
        let actor = actor.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            jobs::insert(&mut conn, &job).await.unwrap();
            if assign {
                job.assign(Uuid::now_v7(), &actor).unwrap();
                jobs::update(&mut conn, &mut job).await.unwrap();
            }
        }
    };

    // No free worker: nothing to take, whatever the queue.
    pool_worker(&pool, "Busy").await;
    assert_eq!(check(submit(None, false)).await, (false, true));
    pool_worker(&pool, "Ready").await;
    // An empty queue.
    assert_eq!(check(submit(None, false)).await, (true, true));
    assert_eq!(check(submit(Some(("a", 1)), false)).await, (true, true));
    // One job of key a placed: a's limit of 1 is reached, a limit of 2 is not.
    write(submit(Some(("a", 2)), false), true).await;
    assert_eq!(check(submit(Some(("a", 1)), false)).await, (false, false));
    assert_eq!(check(submit(Some(("a", 2)), false)).await, (true, true));
    assert_eq!(check(submit(None, false)).await, (true, true));
    // A job waiting for a container, or in a backoff, does not hold a process job back.
    write(submit(None, true), false).await;
    let mut backing_off = submit(None, false);
    backing_off.not_before = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    write(backing_off, false).await;
    assert_eq!(check(submit(None, false)).await, (true, true));
    // A process job that waits goes before any new one, whatever its key.
    write(submit(Some(("b", 5)), false), false).await;
    assert_eq!(check(submit(None, false)).await, (false, false));
    assert_eq!(check(submit(Some(("c", 9)), false)).await, (false, false));
}

/// A job accepted while a free ready worker waits, and that would go first, is written once,
/// already Assigned (version 0: never updated), with the worker Busy and the events and the
/// RunJob command in the order an insert then an assignment would write them. A job whose
/// idempotency key was taken takes no worker: dropping what was taken changes nothing.
#[tokio::test]
async fn a_job_accepted_while_a_worker_waits_is_written_once_already_assigned() {
    let (_db, pool) = migrated().await;
    let actor = Actor::service("test");
    let store = Store::new(pool.clone());
    let worker_id = pool_worker(&pool, "Ready").await;

    let (mut job, submitted) = new_job(Some("k"));
    let mut tx = store.begin().await.unwrap();
    let hodei_placement::BeforeInsert::Taken(taken) =
        hodei_placement::assign_before_insert(&mut tx, &mut job, &actor)
            .await
            .unwrap()
    else {
        panic!("a free worker and an empty queue: the job takes the worker");
    };
    assert!(jobs::insert(&mut tx, &job).await.unwrap());
    let run = hodei_placement::assign_inserted(&mut tx, &job, &submitted, taken)
        .await
        .unwrap();
    hodei_store::commit(tx).await.unwrap();
    assert_eq!(run.job_id, job.id);

    let (state, version, worker): (String, i64, Option<Uuid>) =
        sqlx::query_as("SELECT state, version, worker_id FROM jobs WHERE id = $1")
            .bind(job.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), version, worker),
        ("Assigned", 0, Some(worker_id))
    );
    let (state, current): (String, Option<Uuid>) =
        sqlx::query_as("SELECT state, current_job_id FROM workers WHERE id = $1")
            .bind(worker_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), current), ("Busy", Some(job.id)));
    let rows: Vec<(String,)> = sqlx::query_as("SELECT event_type FROM outbox_events ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    let rows: Vec<&str> = rows.iter().map(|(t,)| t.as_str()).collect();
    assert_eq!(
        rows,
        [
            "JobCreated",
            "JobQueued",
            "JobAssigned",
            "WorkerStatusChanged",
            "RunJob"
        ]
    );

    // The same key again, with a second free worker: the job takes it, is not inserted, and
    // the worker stays free.
    let free = pool_worker(&pool, "Ready").await;
    let (mut again, _) = new_job(Some("k"));
    let mut tx = store.begin().await.unwrap();
    let taken = hodei_placement::assign_before_insert(&mut tx, &mut again, &actor)
        .await
        .unwrap();
    assert!(matches!(taken, hodei_placement::BeforeInsert::Taken(_)));
    assert!(!jobs::insert(&mut tx, &again).await.unwrap());
    drop(taken);
    hodei_store::commit(tx).await.unwrap();
    let (state,): (String,) = sqlx::query_as("SELECT state FROM workers WHERE id = $1")
        .bind(free)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(state, "Ready");
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM outbox_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 5);

    // With every worker busy, the job takes none, and no placement waits for it: it holds
    // no placement lock.
    sqlx::query("UPDATE workers SET state = 'Busy'")
        .execute(&pool)
        .await
        .unwrap();
    let (mut busy, _) = new_job(None);
    let mut tx = store.begin().await.unwrap();
    let taken = hodei_placement::assign_before_insert(&mut tx, &mut busy, &actor)
        .await
        .unwrap();
    assert!(matches!(taken, hodei_placement::BeforeInsert::NoFreeWorker));
    assert_eq!(advisory_locks_held(&mut tx).await, 0);
    assert_eq!(busy.state, hodei_domain::JobState::Pending);
}

/// A placing transaction (`Store::begin_placing`) holds the placement lock from its start: a
/// second one, on a connection that waits at most 100 ms for a lock, cannot begin while the
/// first lives, and begins on that same connection once the first has ended (the failed
/// lock left no aborted transaction behind).
#[tokio::test]
async fn a_placing_transaction_holds_the_placement_lock_until_it_ends() {
    let (_db, pool) = migrated().await;
    let store = Store::new(pool.clone());
    let mut first = store.begin_placing().await.unwrap();
    assert_eq!(advisory_locks_held(&mut first).await, 1);

    // One connection: the one whose lock failed is the one that begins afterwards.
    let impatient = Store::new(
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with(
                pool.connect_options()
                    .as_ref()
                    .clone()
                    .options([("lock_timeout", "100")]),
            )
            .await
            .unwrap(),
    );
    match impatient.begin_placing().await {
        Err(StoreError::Database(sqlx::Error::Database(error))) => {
            assert_eq!(error.code().as_deref(), Some("55P03"), "{error}")
        }
        Err(other) => panic!("not a lock timeout: {other}"),
        Ok(_) => panic!("a second placing transaction began while the first held the lock"),
    }
    hodei_store::commit(first).await.unwrap();
    let second = impatient.begin_placing().await.unwrap();
    hodei_store::commit(second).await.unwrap();
}

/// The advisory locks (the placement lock) the transaction's own connection holds.
async fn advisory_locks_held(tx: &mut hodei_store::Tx) -> i64 {
    let (held,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()",
    )
    .fetch_one(&mut **tx)
    .await
    .unwrap();
    held
}
