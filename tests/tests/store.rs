//! The persistence rules, against a real PostgreSQL database of the test's own.

use hodei_domain::{Actor, Job, JobSpec};
use hodei_store::{audit, jobs, outbox, StoreError};
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
async fn an_outbox_write_notifies_the_relay_once_per_transaction_and_is_read_in_order() {
    let (_db, pool) = migrated().await;
    let mut listener = PgListener::connect_with(&pool).await.unwrap();
    listener.listen(outbox::NOTIFY_CHANNEL).await.unwrap();
    let (job, events) = new_job(None);
    let mut tx = pool.begin().await.unwrap();
    jobs::insert(&mut tx, &job).await.unwrap();
    outbox::append_events(&mut tx, &events).await.unwrap();
    outbox::append_events(&mut tx, &events[..0]).await.unwrap();
    tx.commit().await.unwrap();
    let notification = tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(notification.channel(), outbox::NOTIFY_CHANNEL);

    let mut tx = pool.begin().await.unwrap();
    let pending = outbox::lock_pending(&mut tx, 10).await.unwrap();
    let ids: Vec<Uuid> = pending.iter().map(|r| r.event_id).collect();
    assert_eq!(ids, events.iter().map(|e| e.event_id).collect::<Vec<_>>());
    assert_eq!(
        pending[0].subject,
        format!("hodei.events.job.{}.JobCreated", job.id)
    );
    assert_eq!(pending[0].correlation_id.as_deref(), Some("corr"));
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
