//! `hodei.api.workers.list`.

use hodei_protocol::api::{ListWorkers, Page, WorkerView};
use hodei_protocol::ApiError;

use crate::State;

pub async fn handle(state: State, request: ListWorkers) -> Result<Page<WorkerView>, ApiError> {
    let limit = hodei_protocol::api::page_size(request.limit);
    let (workers, next_cursor) = hodei_store::workers::list(
        &state.store,
        request.state,
        limit,
        request.cursor.as_deref(),
    )
    .await?;
    Ok(Page {
        items: workers.iter().map(WorkerView::from).collect(),
        next_cursor,
    })
}
