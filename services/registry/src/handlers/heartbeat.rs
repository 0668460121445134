//! `hodei.agent.<worker_id>.heartbeat` (core NATS): liveness, recorded on the worker row.

use futures::StreamExt;
use hodei_messaging::{decode, nats, Client};
use hodei_protocol::agent::Heartbeat;
use hodei_protocol::subjects;
use hodei_runtime::Shutdown;

use crate::State;

/// The most heartbeats recorded in one statement.
const BATCH: usize = 512;

/// Heartbeats are recorded in batches: whatever arrived while the last batch was written goes
/// in the next one, so a registry keeps up with thousands of agents and a beat waits for at
/// most one write.
pub async fn run(state: State, client: Client, shutdown: Shutdown) -> hodei_messaging::Result<()> {
    let mut beats = client
        .queue_subscribe("hodei.agent.*.heartbeat", "hodei-registry".to_owned())
        .await
        .map_err(nats("subscribing to heartbeats"))?
        .ready_chunks(BATCH);
    while let Some(Some(messages)) = shutdown.run_until_cancelled(beats.next()).await {
        let mut ids: Vec<_> = messages.iter().filter_map(worker_of).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            continue;
        }
        let now = chrono::Utc::now();
        match hodei_store::workers::record_heartbeats(
            &state.store,
            &ids,
            now,
            now + state.lost_after,
        )
        .await
        {
            Ok(recorded) => tracing::trace!(
                beats = ids.len(),
                recorded,
                "heartbeats (the others are from unknown or ended workers)"
            ),
            Err(error) => tracing::warn!(%error, beats = ids.len(), "cannot record heartbeats"),
        }
    }
    Ok(())
}

/// The worker a heartbeat is from, if it is readable and sent on that worker's own subject.
fn worker_of(message: &async_nats::Message) -> Option<uuid::Uuid> {
    let beat: Heartbeat = match decode(&message.payload) {
        Ok(beat) => beat,
        Err(error) => {
            tracing::warn!(subject = %message.subject, %error, "unreadable heartbeat ignored");
            return None;
        }
    };
    if subjects::worker_id_of(&message.subject) != Some(beat.worker_id) {
        tracing::warn!(subject = %message.subject, worker_id = %beat.worker_id, "heartbeat for another worker ignored");
        return None;
    }
    Some(beat.worker_id)
}
