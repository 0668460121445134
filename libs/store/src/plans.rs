//! The queries on the hot paths, as the store runs them, and their plans: the benchmark's
//! backlog run and a test check that none of them scans a whole big table.

use sqlx::PgConnection;

use crate::{jobs, outbox, workers, Result};

/// A query of a hot path and sample arguments to plan it with.
pub struct HotQuery {
    pub name: &'static str,
    pub sql: &'static str,
    /// Arguments for `EXECUTE`, as SQL literals (empty when it takes none).
    pub args: &'static str,
}

/// Placement, the monitors and the relay: what runs for every job or every wake-up.
pub fn hot_queries() -> Vec<HotQuery> {
    vec![
        HotQuery {
            name: "next pending job (accepting, views)",
            sql: jobs::QueueSql::next(jobs::Kinds::Any),
            args: "",
        },
        HotQuery {
            name: "next pending process job, locked (placement)",
            sql: jobs::QueueSql::lock_next(jobs::Kinds::Processes, 1).0,
            args: "",
        },
        HotQuery {
            name: "next pending jobs, locked (placement of a batch)",
            sql: jobs::QueueSql::lock_next(jobs::Kinds::Processes, 8).0,
            args: "",
        },
        HotQuery {
            name: "next pending container job, locked (placement)",
            sql: jobs::QueueSql::lock_next(jobs::Kinds::Containers, 1).0,
            args: "",
        },
        HotQuery {
            name: "free ready worker for a new job that would go first (accepting)",
            sql: workers::FREE_READY_FOR_FIRST_SQL,
            args: "('k', 2)",
        },
        HotQuery {
            name: "job scheduled on a worker (placement)",
            sql: jobs::SCHEDULED_ON_SQL,
            args: "('00000000-0000-0000-0000-000000000000')",
        },
        HotQuery {
            name: "a worker and the job it is provisioned for (provisioning)",
            sql: workers::LOCK_WITH_JOB_SQL,
            args: "('00000000-0000-0000-0000-000000000000')",
        },
        HotQuery {
            name: "a worker and whether jobs wait for its teardown (teardown)",
            sql: workers::LOCK_FENCING_SQL,
            args: "('00000000-0000-0000-0000-000000000000')",
        },
        HotQuery {
            name: "jobs fenced by a lost worker (teardown)",
            sql: jobs::FENCED_BY_SQL,
            args: "('00000000-0000-0000-0000-000000000000')",
        },
        HotQuery {
            name: "jobs due (job monitor)",
            sql: jobs::DUE_SQL,
            args: "(100)",
        },
        HotQuery {
            name: "next job deadline (job monitor)",
            sql: jobs::NEXT_DUE_SQL,
            args: "",
        },
        HotQuery {
            name: "free ready worker (placement)",
            sql: workers::FREE_READY_SQL,
            args: "",
        },
        HotQuery {
            name: "any live pool worker (warm pool)",
            sql: workers::ANY_LIVE_POOLED_SQL,
            args: "",
        },
        HotQuery {
            name: "placement's looks, without a warm pool",
            sql: crate::PLACEMENT_LOOKS_SQL,
            args: "(10)",
        },
        HotQuery {
            name: "placement's looks, with a warm pool",
            sql: crate::PLACEMENT_LOOKS_WITH_POOL_SQL,
            args: "",
        },
        HotQuery {
            name: "live workers (capacity)",
            sql: workers::COUNT_LIVE_SQL,
            args: "",
        },
        HotQuery {
            name: "outbox batch (relay)",
            sql: outbox::LOCK_PENDING_SQL,
            args: "(500, 250)",
        },
    ]
}

/// The plan PostgreSQL picks for each hot query now (EXPLAIN of the prepared statement, as
/// the store's prepared statements are planned), in the order of [`hot_queries`].
pub async fn explain_hot_queries(conn: &mut PgConnection) -> Result<Vec<(&'static str, String)>> {
    let queries = hot_queries();
    let mut plans = Vec::with_capacity(queries.len());
    for (i, query) in queries.into_iter().enumerate() {
        let name = format!("hodei_hot_{i}");
        sqlx::raw_sql(&format!("PREPARE {name} AS {}", query.sql))
            .execute(&mut *conn)
            .await?;
        let lines: Vec<(String,)> =
            sqlx::query_as(&format!("EXPLAIN EXECUTE {name}{}", query.args))
                .fetch_all(&mut *conn)
                .await?;
        sqlx::raw_sql(&format!("DEALLOCATE {name}"))
            .execute(&mut *conn)
            .await?;
        let plan = lines
            .into_iter()
            .map(|(line,)| line)
            .collect::<Vec<_>>()
            .join("\n");
        plans.push((query.name, plan));
    }
    Ok(plans)
}

/// The tables a plan reads whole ("Seq Scan on <table>").
pub fn sequential_scans(plan: &str) -> Vec<String> {
    plan.lines()
        .filter_map(|line| line.split("Seq Scan on ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}
