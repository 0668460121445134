//! `hodei.api.schedules.create|list|get|pause|resume|delete`: the schedule aggregate's API.
//! Each change is one transaction with its event (the audit trail records it); the ticks
//! themselves are the ticker's ([`crate::ticker`]).

use hodei_domain::schedule::Definition;
use hodei_domain::Schedule;
use hodei_protocol::api::Page;
use hodei_protocol::schedules::{CreateSchedule, ListSchedules, ScheduleRef, ScheduleView};
use hodei_protocol::{new_correlation_id, ApiError, ErrorCode};
use hodei_store::{outbox, schedules};
use uuid::Uuid;

use crate::State;

#[tracing::instrument(name = "create schedule", skip_all, fields(name = %request.name))]
pub async fn create(state: State, request: CreateSchedule) -> Result<ScheduleView, ApiError> {
    if request.job.idempotency_key.is_some() {
        return Err(ApiError::new(
            ErrorCode::InvalidSchedule,
            "a schedule's job has no idempotency_key: each tick's job gets `<schedule id>:<tick time>`",
        ));
    }
    let spec = request.job.spec();
    if let Err(why) = hodei_domain::satisfiable(&super::submit::offers(&state).await?, &spec) {
        return Err(ApiError::new(
            ErrorCode::NoProvider,
            format!("no provider can run this schedule's job: {why}"),
        ));
    }
    let definition = Definition {
        trigger: request.trigger,
        overlap: request.overlap,
        catch_up: request.catch_up,
        spec,
        policy: request.job.policy,
    };
    let (schedule, created) = Schedule::create(
        Uuid::now_v7(),
        request.name,
        definition,
        new_correlation_id(),
        chrono::Utc::now(),
        &state.actor,
    )?;
    let mut tx = state.store.begin().await?;
    if !schedules::insert(&mut tx, &schedule).await? {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("a schedule named {:?} exists", schedule.name),
        ));
    }
    outbox::append_events(&mut tx, &[created]).await?;
    hodei_store::commit(tx).await?;
    tracing::info!(schedule_id = %schedule.id, name = %schedule.name, next_tick_at = ?schedule.next_tick_at, "schedule created");
    state.ticks.notify_one();
    Ok(ScheduleView::from(&schedule))
}

pub async fn get(state: State, request: ScheduleRef) -> Result<ScheduleView, ApiError> {
    Ok(ScheduleView::from(&find(&state, &request.schedule).await?))
}

pub async fn list(state: State, request: ListSchedules) -> Result<Page<ScheduleView>, ApiError> {
    let limit = hodei_protocol::api::page_size(request.limit);
    let (items, next_cursor) = schedules::list(
        &state.store,
        request.state,
        limit,
        request.cursor.as_deref(),
    )
    .await?;
    Ok(Page {
        items: items.iter().map(ScheduleView::from).collect(),
        next_cursor,
    })
}

pub async fn pause(state: State, request: ScheduleRef) -> Result<ScheduleView, ApiError> {
    let actor = state.actor.clone();
    change(&state, &request, "paused", |s| s.pause(&actor)).await
}

pub async fn resume(state: State, request: ScheduleRef) -> Result<ScheduleView, ApiError> {
    let actor = state.actor.clone();
    let view = change(&state, &request, "resumed", |s| {
        s.resume(chrono::Utc::now(), &actor)
    })
    .await?;
    state.ticks.notify_one();
    Ok(view)
}

pub async fn delete(state: State, request: ScheduleRef) -> Result<ScheduleView, ApiError> {
    let actor = state.actor.clone();
    change(&state, &request, "deleted", |s| s.delete(&actor)).await
}

/// The schedule `id_or_name` names.
async fn find(state: &State, id_or_name: &str) -> Result<Schedule, ApiError> {
    if id_or_name.is_empty() || id_or_name.len() > 128 {
        return Err(ApiError::bad_request(
            "schedule must be a schedule's id or name (1-128 characters)",
        ));
    }
    schedules::find(&state.store, id_or_name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("there is no schedule {id_or_name:?}")))
}

/// One domain change of the schedule `request` names, with its event, in one transaction.
async fn change(
    state: &State,
    request: &ScheduleRef,
    done: &str,
    apply: impl FnOnce(&mut Schedule) -> hodei_domain::Result<hodei_domain::DomainEvent>,
) -> Result<ScheduleView, ApiError> {
    let id = find(state, &request.schedule).await?.id;
    let schedule = hodei_store::change(&state.store, id, |s: &mut Schedule| {
        Ok::<_, ApiError>(vec![apply(s)?])
    })
    .await?
    .ok_or_else(|| ApiError::not_found(format!("there is no schedule {id}")))?;
    tracing::info!(schedule_id = %schedule.id, name = %schedule.name, "schedule {done}");
    Ok(ScheduleView::from(&schedule))
}
