//! `hodei.agent.<worker_id>.heartbeat` (core NATS): liveness, recorded on the worker row.

use futures::StreamExt;
use hodei_messaging::{decode, nats, Client};
use hodei_protocol::agent::Heartbeat;
use hodei_protocol::subjects;
use hodei_runtime::Shutdown;

use crate::State;

pub async fn run(state: State, client: Client, shutdown: Shutdown) -> hodei_messaging::Result<()> {
    let mut beats = client
        .queue_subscribe("hodei.agent.*.heartbeat", "hodei-registry".to_owned())
        .await
        .map_err(nats("subscribing to heartbeats"))?;
    while let Some(Some(message)) = shutdown.run_until_cancelled(beats.next()).await {
        let beat: Heartbeat = match decode(&message.payload) {
            Ok(beat) => beat,
            Err(error) => {
                tracing::warn!(subject = %message.subject, %error, "unreadable heartbeat ignored");
                continue;
            }
        };
        if subjects::worker_id_of(&message.subject) != Some(beat.worker_id) {
            tracing::warn!(subject = %message.subject, worker_id = %beat.worker_id, "heartbeat for another worker ignored");
            continue;
        }
        let now = chrono::Utc::now();
        match hodei_store::workers::record_heartbeat(
            &state.store,
            beat.worker_id,
            now,
            now + state.lost_after,
        )
        .await
        {
            Ok(true) => tracing::trace!(worker_id = %beat.worker_id, "heartbeat"),
            Ok(false) => {
                tracing::debug!(worker_id = %beat.worker_id, "heartbeat from an unknown or ended worker")
            }
            Err(error) => tracing::warn!(%error, "cannot record heartbeat"),
        }
    }
    Ok(())
}
