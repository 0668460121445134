//! `hodei.api.audit.query`.

use hodei_protocol::api::{AuditEntry, AuditQuery, Page};
use hodei_protocol::ApiError;

use crate::State;

pub async fn handle(state: State, query: AuditQuery) -> Result<Page<AuditEntry>, ApiError> {
    if let (Some(from), Some(to)) = (query.from, query.to) {
        if from >= to {
            return Err(ApiError::bad_request("`from` must be earlier than `to`"));
        }
    }
    if query
        .cursor
        .as_deref()
        .is_some_and(|c| c.parse::<i64>().is_err())
    {
        return Err(ApiError::bad_request(
            "`cursor` must be the next_cursor of a previous page",
        ));
    }
    let (items, next_cursor) = hodei_store::audit::query(&state.store, &query).await?;
    Ok(Page { items, next_cursor })
}
