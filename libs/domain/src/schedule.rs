//! Schedules: a job spec run on a cron expression (in a time zone) or at an interval.
//!
//! States: Active <-> Paused, Active|Paused -> Deleted (kept for the audit trail, never
//! ticks again). An Active schedule has `next_tick_at`; when that time comes the scheduler
//! asks [`Schedule::due`] which ticks to fire, creates one job per fired tick (idempotency
//! key `<schedule id>:<tick time>`, so a tick never makes two jobs) and records each with
//! [`Schedule::fired`], [`Schedule::skipped`] or [`Schedule::missed`], then
//! [`Schedule::advance`]s, all in one transaction.
//!
//! A tick is on time while it is at most [`ON_TIME_WITHIN`] late. Ticks later than that
//! (the schedulers were down) are missed: with [`CatchUp::None`] none of them runs, with
//! [`CatchUp::Last`] the latest of them runs, unless an on-time tick runs in the same pass.
//! With [`Overlap::Skip`], a tick while the schedule's previous job has not ended is
//! skipped (and recorded as such); with [`Overlap::Allow`] it runs.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::events::{
    ScheduleCreated, ScheduleDeleted, ScheduleFired, SchedulePaused, ScheduleResumed,
    ScheduleTickSkipped, ScheduleTicksMissed,
};
use crate::{Actor, DomainError, DomainEvent, JobPolicy, JobSpec, Result};

/// How late a tick may fire and still count as on time.
pub const ON_TIME_WITHIN: chrono::TimeDelta = chrono::TimeDelta::seconds(10);
/// Shortest interval of an interval schedule (ms).
pub const MIN_INTERVAL_MS: u64 = 1000;
/// Most ticks of one pass counted one by one (a long downtime of a frequent schedule is
/// counted up to this, then reported as "at least").
const MAX_TICKS_SCANNED: u32 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ScheduleState {
    Active,
    Paused,
    Deleted,
}

impl ScheduleState {
    pub const ALL: [ScheduleState; 3] = [
        ScheduleState::Active,
        ScheduleState::Paused,
        ScheduleState::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ScheduleState::Active => "Active",
            ScheduleState::Paused => "Paused",
            ScheduleState::Deleted => "Deleted",
        }
    }

    /// The state machine: pause and resume, and deletion from either live state.
    pub fn can_transition_to(self, to: ScheduleState) -> bool {
        use ScheduleState::*;
        matches!(
            (self, to),
            (Active, Paused) | (Paused, Active) | (Active | Paused, Deleted)
        )
    }
}

impl fmt::Display for ScheduleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ScheduleState {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        ScheduleState::ALL
            .into_iter()
            .find(|state| state.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown schedule state {s:?}"))
    }
}

/// When a schedule ticks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Trigger {
    /// A cron expression: 5 fields (minute hour day-of-month month day-of-week), or 6-7
    /// with seconds first (and a year last), read in `time_zone` (an IANA name, `UTC` by
    /// default).
    Cron {
        expression: String,
        #[serde(default = "utc")]
        time_zone: String,
    },
    /// Every `every_ms` milliseconds from the schedule's creation (or its resumption).
    Interval { every_ms: u64 },
}

fn utc() -> String {
    "UTC".into()
}

impl fmt::Display for Trigger {
    /// `cron '30 2 * * *' (Europe/Madrid)` or `every 1.5 s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::Cron {
                expression,
                time_zone,
            } => write!(f, "cron '{expression}' ({time_zone})"),
            Trigger::Interval { every_ms } => write!(f, "every {} s", *every_ms as f64 / 1000.0),
        }
    }
}

/// A parsed trigger, to compute ticks with.
enum Clock {
    Cron(Box<cron::Schedule>, chrono_tz::Tz),
    Interval(chrono::TimeDelta),
}

impl Trigger {
    fn clock(&self) -> Result<Clock> {
        let invalid = |why: String| DomainError::InvalidSchedule(why);
        match self {
            Trigger::Cron {
                expression,
                time_zone,
            } => {
                let fields = expression.split_whitespace().count();
                let full = match fields {
                    5 => format!("0 {expression}"),
                    6 | 7 => expression.clone(),
                    n => {
                        return Err(invalid(format!(
                            "a cron expression has 5 fields (or 6-7 with seconds), not {n}"
                        )))
                    }
                };
                let schedule = cron::Schedule::from_str(&full)
                    .map_err(|e| invalid(format!("cron expression {expression:?}: {e}")))?;
                let tz = time_zone
                    .parse::<chrono_tz::Tz>()
                    .map_err(|_| invalid(format!("unknown time zone {time_zone:?}")))?;
                Ok(Clock::Cron(Box::new(schedule), tz))
            }
            Trigger::Interval { every_ms } => {
                if *every_ms < MIN_INTERVAL_MS || *every_ms > 366 * 86_400_000 {
                    return Err(invalid(format!(
                        "an interval is {MIN_INTERVAL_MS} ms to a year, not {every_ms} ms"
                    )));
                }
                Ok(Clock::Interval(chrono::TimeDelta::milliseconds(
                    *every_ms as i64,
                )))
            }
        }
    }
}

impl Clock {
    /// The first tick strictly after `t`, if any (a cron expression may have none left).
    fn next_after(&self, t: DateTime<Utc>, anchor: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            // At a clock-back change the crate may give the earlier reading of an ambiguous
            // local time, which is not after `t`: the first that is.
            Clock::Cron(schedule, tz) => schedule
                .after(&t.with_timezone(tz))
                .take(8)
                .map(|at| at.with_timezone(&Utc))
                .find(|at| *at > t),
            Clock::Interval(every) => {
                // Ticks are anchor + k * every.
                let elapsed = (t - anchor).num_milliseconds();
                let step = every.num_milliseconds();
                let k = if elapsed < 0 { 0 } else { elapsed / step + 1 };
                Some(anchor + chrono::TimeDelta::milliseconds(k * step))
            }
        }
    }
}

/// What may run while the previous run has not ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// The tick is skipped (recorded as such).
    #[default]
    Skip,
    /// The tick runs as well.
    Allow,
}

/// What runs of the ticks missed while no scheduler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Nothing: they are recorded as missed.
    #[default]
    None,
    /// The latest of them runs (late), the others are recorded as missed.
    Last,
}

/// What a schedule is: all of it is fixed at creation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Definition {
    pub trigger: Trigger,
    #[serde(default)]
    pub overlap: Overlap,
    #[serde(default)]
    pub catch_up: CatchUp,
    /// The job each tick creates.
    pub spec: JobSpec,
    #[serde(default)]
    pub policy: JobPolicy,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub id: Uuid,
    /// Unique among schedules not deleted: 1-128 characters of letters, digits, `-`, `_`, `.`.
    pub name: String,
    pub state: ScheduleState,
    pub definition: Definition,
    /// The next tick (Active only).
    pub next_tick_at: Option<DateTime<Utc>>,
    /// Where interval ticks count from: creation, then each resumption.
    pub anchor_at: DateTime<Utc>,
    /// The last tick that ran, and its job.
    pub last_tick_at: Option<DateTime<Utc>>,
    pub last_job_id: Option<Uuid>,
    pub correlation_id: String,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The ticks of one pass: those to run (oldest first) and those missed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub run: Vec<DateTime<Utc>>,
    pub missed: Option<Missed>,
    /// Where the next tick is looked for after this pass.
    pub next_after: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Missed {
    pub first: DateTime<Utc>,
    pub last: DateTime<Utc>,
    /// How many (at least this many when `more`).
    pub count: u32,
    pub more: bool,
}

impl Schedule {
    /// A new Active schedule, its first tick the first after `now`.
    pub fn create(
        id: Uuid,
        name: String,
        definition: Definition,
        correlation_id: String,
        now: DateTime<Utc>,
        actor: &Actor,
    ) -> Result<(Schedule, DomainEvent)> {
        let valid_name = !name.is_empty()
            && name.len() <= 128
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid_name {
            return Err(DomainError::InvalidSchedule(format!(
                "a schedule's name is 1-128 letters, digits, '-', '_' or '.', not {name:?}"
            )));
        }
        definition.spec.validate()?;
        definition.policy.validate()?;
        let clock = definition.trigger.clock()?;
        // Ticks fall on whole milliseconds (as their jobs' keys write them).
        let now = now.trunc_subsecs(3);
        let next_tick_at = clock.next_after(now, now).ok_or_else(|| {
            DomainError::InvalidSchedule("the cron expression never ticks again".into())
        })?;
        let schedule = Schedule {
            id,
            name,
            state: ScheduleState::Active,
            definition,
            next_tick_at: Some(next_tick_at),
            anchor_at: now,
            last_tick_at: None,
            last_job_id: None,
            correlation_id,
            version: 0,
            created_at: now,
            updated_at: now,
        };
        let created = schedule.event(
            actor,
            &ScheduleCreated {
                schedule_id: id,
                name: schedule.name.clone(),
                trigger: schedule.definition.trigger.clone(),
                overlap: schedule.definition.overlap,
                catch_up: schedule.definition.catch_up,
                command: schedule.definition.spec.command.clone(),
                args: schedule.definition.spec.args.clone(),
                env_keys: schedule.definition.spec.env.keys().cloned().collect(),
                next_tick_at,
            },
        );
        Ok((schedule, created))
    }

    /// The idempotency key of the job of `tick`.
    pub fn job_key(&self, tick: DateTime<Utc>) -> String {
        format!(
            "{}:{}",
            self.id,
            tick.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        )
    }

    /// The ticks due at `now` (from `next_tick_at` to `now`), split into those to run and
    /// those missed (see the module's rules). Changes nothing.
    pub fn due(&self, now: DateTime<Utc>) -> Result<Due> {
        let mut due = Due {
            run: Vec::new(),
            missed: None,
            next_after: now,
        };
        let (ScheduleState::Active, Some(first)) = (self.state, self.next_tick_at) else {
            return Ok(due);
        };
        let clock = self.definition.trigger.clock()?;
        let mut tick = Some(first);
        let mut scanned = 0;
        let mut last_counted = first;
        while let Some(at) = tick.filter(|at| *at <= now) {
            if scanned == MAX_TICKS_SCANNED {
                // Counted enough: the next pass goes on after the last tick counted.
                if let Some(missed) = &mut due.missed {
                    missed.more = true;
                }
                due.next_after = last_counted;
                break;
            }
            last_counted = at;
            scanned += 1;
            if now - at <= ON_TIME_WITHIN {
                due.run.push(at);
            } else {
                let missed = due.missed.get_or_insert(Missed {
                    first: at,
                    last: at,
                    count: 0,
                    more: false,
                });
                missed.last = at;
                missed.count += 1;
            }
            tick = clock.next_after(at, self.anchor_at);
        }
        // Only once the scan has counted up to now: a partial count's last missed tick is
        // not the latest (the next pass goes on from there).
        if let (CatchUp::Last, Some(missed), true) = (
            self.definition.catch_up,
            due.missed.as_mut().filter(|m| !m.more),
            due.run.is_empty(),
        ) {
            // The latest missed tick runs late; the rest stay missed.
            due.run.push(missed.last);
            missed.count -= 1;
            if missed.count == 0 {
                due.missed = None;
            } else if let Some(before) = self.ticks_before(&clock, missed.first, missed.last) {
                missed.last = before;
            }
        }
        Ok(due)
    }

    /// The last tick before `last` counting from `first` (for the missed range's end).
    fn ticks_before(
        &self,
        clock: &Clock,
        first: DateTime<Utc>,
        last: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let mut at = first;
        let mut scanned = 0;
        while scanned < MAX_TICKS_SCANNED {
            let next = clock.next_after(at, self.anchor_at)?;
            if next >= last {
                return Some(at);
            }
            at = next;
            scanned += 1;
        }
        Some(at)
    }

    /// Tick `tick` ran as job `job_id`.
    pub fn fired(&mut self, tick: DateTime<Utc>, job_id: Uuid, actor: &Actor) -> DomainEvent {
        self.last_tick_at = Some(tick);
        self.last_job_id = Some(job_id);
        self.touch();
        self.event(
            actor,
            &ScheduleFired {
                schedule_id: self.id,
                tick_at: tick,
                job_id,
            },
        )
    }

    /// Tick `tick` did not run, for `reason` (its previous run had not ended, ...).
    pub fn skipped(&mut self, tick: DateTime<Utc>, reason: String, actor: &Actor) -> DomainEvent {
        self.touch();
        self.event(
            actor,
            &ScheduleTickSkipped {
                schedule_id: self.id,
                tick_at: tick,
                reason,
            },
        )
    }

    /// Ticks missed while no scheduler ran.
    pub fn missed(&mut self, missed: Missed, actor: &Actor) -> DomainEvent {
        self.touch();
        self.event(
            actor,
            &ScheduleTicksMissed {
                schedule_id: self.id,
                first_tick_at: missed.first,
                last_tick_at: missed.last,
                count: missed.count,
                at_least: missed.more,
            },
        )
    }

    /// After a pass: the next tick is the first after `due.next_after` (the pass's time, or
    /// the last tick it counted when it stopped at its bound).
    /// A cron expression with no tick left (its years are over) ends the schedule: it is
    /// deleted, and the returned event says so.
    pub fn advance(&mut self, due: &Due, actor: &Actor) -> Result<Option<DomainEvent>> {
        if self.state != ScheduleState::Active {
            return Ok(None);
        }
        let clock = self.definition.trigger.clock()?;
        self.next_tick_at = clock.next_after(due.next_after, self.anchor_at);
        self.touch();
        if self.next_tick_at.is_some() {
            return Ok(None);
        }
        self.transition(ScheduleState::Deleted)?;
        Ok(Some(self.event(
            actor,
            &ScheduleDeleted {
                schedule_id: self.id,
                from: ScheduleState::Active,
                reason: Some("its cron expression has no tick left".into()),
            },
        )))
    }

    pub fn pause(&mut self, actor: &Actor) -> Result<DomainEvent> {
        self.transition(ScheduleState::Paused)?;
        self.next_tick_at = None;
        Ok(self.event(
            actor,
            &SchedulePaused {
                schedule_id: self.id,
            },
        ))
    }

    /// Active again; ticks count from `now` (those of the pause are not caught up).
    pub fn resume(&mut self, now: DateTime<Utc>, actor: &Actor) -> Result<DomainEvent> {
        let clock = self.definition.trigger.clock()?;
        let now = now.trunc_subsecs(3);
        let next = clock.next_after(now, now).ok_or_else(|| {
            DomainError::InvalidSchedule("the cron expression never ticks again".into())
        })?;
        self.transition(ScheduleState::Active)?;
        self.anchor_at = now;
        self.next_tick_at = Some(next);
        Ok(self.event(
            actor,
            &ScheduleResumed {
                schedule_id: self.id,
                next_tick_at: self.next_tick_at,
            },
        ))
    }

    pub fn delete(&mut self, actor: &Actor) -> Result<DomainEvent> {
        let from = self.state;
        self.transition(ScheduleState::Deleted)?;
        self.next_tick_at = None;
        Ok(self.event(
            actor,
            &ScheduleDeleted {
                schedule_id: self.id,
                from,
                reason: None,
            },
        ))
    }

    fn transition(&mut self, to: ScheduleState) -> Result<()> {
        if !self.state.can_transition_to(to) {
            return Err(DomainError::InvalidScheduleTransition {
                schedule_id: self.id,
                from: self.state,
                to,
            });
        }
        self.state = to;
        self.touch();
        Ok(())
    }

    fn touch(&mut self) {
        self.updated_at = Utc::now();
    }

    fn event<P: crate::EventPayload>(&self, actor: &Actor, payload: &P) -> DomainEvent {
        DomainEvent::new(self.id, &self.correlation_id, actor, payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn schedule(trigger: Trigger, catch_up: CatchUp, now: DateTime<Utc>) -> Schedule {
        let definition = Definition {
            trigger,
            overlap: Overlap::Skip,
            catch_up,
            spec: JobSpec {
                command: "true".into(),
                ..Default::default()
            },
            policy: JobPolicy::default(),
        };
        Schedule::create(
            Uuid::now_v7(),
            "nightly".into(),
            definition,
            "c".into(),
            now,
            &Actor::service("test"),
        )
        .unwrap()
        .0
    }

    fn every_second() -> Trigger {
        Trigger::Interval { every_ms: 1000 }
    }

    #[test]
    fn cron_ticks_are_read_in_their_time_zone() {
        let now = at("2026-03-01T12:00:00Z");
        let s = schedule(
            Trigger::Cron {
                expression: "30 9 * * *".into(),
                time_zone: "Europe/Madrid".into(),
            },
            CatchUp::None,
            now,
        );
        assert_eq!(
            s.next_tick_at,
            Some(at("2026-03-02T08:30:00Z")),
            "09:30 in Madrid is 08:30 UTC in winter"
        );
        let summer = schedule(
            Trigger::Cron {
                expression: "0 30 9 * * *".into(),
                time_zone: "Europe/Madrid".into(),
            },
            CatchUp::None,
            at("2026-07-01T12:00:00Z"),
        );
        assert_eq!(summer.next_tick_at, Some(at("2026-07-02T07:30:00Z")));
    }

    #[test]
    fn bad_triggers_and_names_are_refused() {
        let refused = |trigger: Trigger, name: &str| {
            Schedule::create(
                Uuid::now_v7(),
                name.into(),
                Definition {
                    trigger,
                    overlap: Overlap::Skip,
                    catch_up: CatchUp::None,
                    spec: JobSpec {
                        command: "true".into(),
                        ..Default::default()
                    },
                    policy: JobPolicy::default(),
                },
                "c".into(),
                Utc::now(),
                &Actor::service("t"),
            )
            .unwrap_err()
            .to_string()
        };
        let cron = |e: &str, tz: &str| Trigger::Cron {
            expression: e.into(),
            time_zone: tz.into(),
        };
        assert!(refused(cron("* * *", "UTC"), "a").contains("5 fields"));
        assert!(refused(cron("61 * * * *", "UTC"), "a").contains("cron expression"));
        assert!(refused(cron("* * * * *", "Mars/Olympus"), "a").contains("unknown time zone"));
        assert!(refused(Trigger::Interval { every_ms: 10 }, "a").contains("interval"));
        assert!(refused(every_second(), "two words").contains("name"));
        assert!(refused(every_second(), "").contains("name"));
    }

    #[test]
    fn on_time_ticks_run_and_late_ones_follow_the_catch_up_policy() {
        let t0 = at("2026-01-01T00:00:00Z");
        let secs = |n: i64| t0 + chrono::TimeDelta::seconds(n);
        let s = schedule(every_second(), CatchUp::None, t0);
        assert_eq!(s.next_tick_at, Some(secs(1)));
        // Three ticks due, all within the grace: all run.
        let due = s.due(secs(3)).unwrap();
        assert_eq!(due.run, vec![secs(1), secs(2), secs(3)]);
        assert_eq!(due.missed, None);
        // Down for a minute: the first 50 are missed, the last 10 (within 10 s) run.
        let due = s.due(secs(60)).unwrap();
        assert_eq!(due.run.len(), 11);
        assert_eq!(due.run[0], secs(50));
        let missed = due.missed.unwrap();
        assert_eq!(
            (missed.first, missed.last, missed.count),
            (secs(1), secs(49), 49)
        );

        // An hourly schedule down for three hours: none runs, or the last one.
        let hourly = Trigger::Interval {
            every_ms: 3_600_000,
        };
        let late = t0 + chrono::TimeDelta::minutes(190);
        let none = schedule(hourly.clone(), CatchUp::None, t0)
            .due(late)
            .unwrap();
        assert!(none.run.is_empty());
        assert_eq!(none.missed.unwrap().count, 3);
        let last = schedule(hourly, CatchUp::Last, t0).due(late).unwrap();
        let hours = |n: i64| t0 + chrono::TimeDelta::hours(n);
        assert_eq!(last.run, vec![hours(3)]);
        let missed = last.missed.unwrap();
        assert_eq!(
            (missed.first, missed.last, missed.count),
            (hours(1), hours(2), 2)
        );
    }

    #[test]
    fn a_cron_expression_with_no_tick_left_ends_its_schedule() {
        let actor = Actor::service("t");
        let now = at("2026-06-01T00:00:00Z");
        let mut s = schedule(
            Trigger::Cron {
                expression: "0 0 9 1 7 * 2026".into(),
                time_zone: "UTC".into(),
            },
            CatchUp::None,
            now,
        );
        let last = at("2026-07-01T09:00:00Z");
        assert_eq!(s.next_tick_at, Some(last));
        let due = s.due(last + chrono::TimeDelta::seconds(1)).unwrap();
        assert_eq!(due.run, vec![last], "the last tick runs");
        let ended = s.advance(&due, &actor).unwrap().expect("it ends");
        assert_eq!(ended.event_type, "ScheduleDeleted");
        assert_eq!((s.state, s.next_tick_at), (ScheduleState::Deleted, None));
    }

    #[test]
    fn ticks_in_a_repeated_hour_are_after_the_time_asked() {
        // Europe/Madrid goes back from 03:00 CEST to 02:00 CET on 2026-10-25.
        let asked = at("2026-10-25T01:40:00Z"); // 02:40 CET, the second 02:40
        let s = schedule(
            Trigger::Cron {
                expression: "*/15 * * * *".into(),
                time_zone: "Europe/Madrid".into(),
            },
            CatchUp::None,
            asked,
        );
        assert_eq!(s.next_tick_at, Some(at("2026-10-25T01:45:00Z")));
    }

    #[test]
    fn advancing_pausing_and_resuming() {
        let t0 = at("2026-01-01T00:00:00Z");
        let secs = |n: i64| t0 + chrono::TimeDelta::seconds(n);
        let actor = Actor::service("t");
        let mut s = schedule(every_second(), CatchUp::None, t0);
        let due = s
            .due(secs(3) + chrono::TimeDelta::milliseconds(200))
            .unwrap();
        assert_eq!(s.advance(&due, &actor).unwrap(), None);
        assert_eq!(s.next_tick_at, Some(secs(4)));
        s.pause(&actor).unwrap();
        assert_eq!(s.next_tick_at, None);
        assert!(
            s.due(secs(10)).unwrap().run.is_empty(),
            "a paused schedule never ticks"
        );
        assert!(s.pause(&actor).is_err(), "paused twice");
        s.resume(secs(20) + chrono::TimeDelta::milliseconds(500), &actor)
            .unwrap();
        assert_eq!(
            s.next_tick_at,
            Some(secs(21) + chrono::TimeDelta::milliseconds(500)),
            "ticks count from the resumption"
        );
        s.delete(&actor).unwrap();
        assert!(s.resume(secs(30), &actor).is_err(), "deleted is the end");
        assert!(s.due(secs(40)).unwrap().run.is_empty());
    }
}
