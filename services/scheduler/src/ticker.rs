//! The schedules' ticks. Every scheduler instance runs this sweep: it finds the Active
//! schedules whose next tick has come (an indexed query), and ticks each in one
//! transaction: the schedule's row locked (an instance that finds it held by another skips
//! it), one job per tick that runs (idempotency key `<schedule id>:<tick time>`, unique in
//! `jobs`: a tick never makes two jobs, whatever happens around it), the schedule's events
//! (fired, skipped, missed) and its next tick. A scheduler killed mid-tick commits nothing;
//! another instance ticks the schedule again. It sleeps until the next tick of any schedule,
//! or until this process creates or resumes one.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use hodei_domain::schedule::Overlap;
use hodei_domain::{DomainEvent, Job};
use hodei_protocol::{new_correlation_id, ApiError};
use hodei_store::{jobs, outbox, schedules};
use uuid::Uuid;

use crate::State;

const BATCH: usize = 100;

pub async fn run(state: State, max_sleep: Duration, shutdown: hodei_runtime::Shutdown) {
    let wake = Arc::clone(&state.ticks);
    hodei_runtime::sweep::run(
        "schedules",
        hodei_runtime::sweep::Pace {
            batch: BATCH,
            max_sleep,
            wake: Some(&wake),
        },
        shutdown,
        || async {
            schedules::due(&state.store, Utc::now(), BATCH as i64)
                .await
                .map_err(|e| e.to_string())
        },
        || async {
            schedules::next_due(&state.store)
                .await
                .map_err(|e| e.to_string())
        },
        |schedule_id| {
            let state = &state;
            async move { tick(state, schedule_id).await.map_err(|e| e.to_string()) }
        },
    )
    .await;
}

#[tracing::instrument(name = "schedule tick", skip(state))]
async fn tick(state: &State, schedule_id: Uuid) -> Result<(), ApiError> {
    let actor = &state.actor;
    let mut tx = state.store.begin().await?;
    let Some(mut schedule) = schedules::lock_unless_held(&mut tx, schedule_id).await? else {
        return Ok(());
    };
    let now = Utc::now();
    let due = schedule.due(now)?;
    if due.run.is_empty() && due.missed.is_none() {
        // Another instance ticked it first.
        return Ok(());
    }
    let mut events: Vec<DomainEvent> = Vec::new();
    if let Some(missed) = due.missed {
        tracing::warn!(%schedule_id, name = %schedule.name, count = missed.count, first = %missed.first, last = %missed.last, "ticks missed while no scheduler ran");
        events.push(schedule.missed(missed, actor));
    }
    let offers = crate::handlers::submit::offers(state).await?;
    for at in &due.run {
        let at = *at;
        if schedule.definition.overlap == Overlap::Skip {
            if let Some(previous) = schedule.last_job_id {
                let ended = jobs::state_of(&mut tx, previous)
                    .await?
                    .is_none_or(|s| s.is_terminal());
                if !ended {
                    let reason = format!("its previous run, job {previous}, has not ended");
                    tracing::info!(%schedule_id, tick = %at, %reason, "tick skipped");
                    events.push(schedule.skipped(at, reason, actor));
                    continue;
                }
            }
        }
        let spec = schedule.definition.spec.clone();
        if let Err(why) = hodei_domain::satisfiable(&offers, &spec) {
            let reason = format!("no provider can run its job: {why}");
            tracing::warn!(%schedule_id, tick = %at, %reason, "tick skipped");
            events.push(schedule.skipped(at, reason, actor));
            continue;
        }
        // A job the domain refuses (its rules changed since the schedule was made) skips
        // the tick: the schedule goes on, it does not fail again and again.
        let (mut job, job_events) = match Job::submit(
            Uuid::now_v7(),
            spec,
            schedule.definition.policy.clone(),
            new_correlation_id(),
            Some(schedule.job_key(at)),
            actor,
        ) {
            Ok(made) => made,
            Err(error) => {
                let reason = format!("its job is refused: {error}");
                tracing::warn!(%schedule_id, tick = %at, %reason, "tick skipped");
                events.push(schedule.skipped(at, reason, actor));
                continue;
            }
        };
        if !jobs::insert(&mut tx, &job).await? {
            // Only if the schedule's row and the jobs disagree: the tick has its job.
            events.push(schedule.skipped(at, "its job exists already".into(), actor));
            continue;
        }
        outbox::append_events(&mut tx, &job_events).await?;
        hodei_placement::assign_on_accept(&mut tx, &mut job, actor).await?;
        tracing::info!(%schedule_id, name = %schedule.name, tick = %at, job_id = %job.id, "schedule fired");
        events.push(schedule.fired(at, job.id, actor));
    }
    if let Some(ended) = schedule.advance(&due, actor)? {
        tracing::info!(%schedule_id, name = %schedule.name, "schedule ended: its cron expression has no tick left");
        events.push(ended);
    }
    tx.save(&mut schedule, &events).await?;
    hodei_store::commit(tx).await?;
    Ok(())
}
