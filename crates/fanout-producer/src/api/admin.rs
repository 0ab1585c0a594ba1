//! Operator routes (admin tokens only): the system's status, dead letters and dead webhooks.
//! Each change is logged on the `fanout::audit` target with the caller's tenant.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ApiState;
use super::auth::Admin;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiQuery};
use crate::ops::{
    DeadLetterInfo, DeadLetterSelection, DeadWebhookInfo, OpsError, Resolution, SystemStatus,
};

/// Dead letters or webhooks listed unless `limit` says otherwise.
const LIST_DEFAULT: usize = 50;
const LIST_MAX: usize = 1_000;

impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> Self {
        match e {
            OpsError::Invalid { field, message } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
                    .with_field(field)
            }
            OpsError::Store(e) => e.into(),
            other => ApiError::unavailable(&other),
        }
    }
}

fn actor(admin: &Admin) -> String {
    format!("tenant:{}", admin.0.0)
}

#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "operations",
    operation_id = "get_status",
    summary = "The system at a glance",
    description = "Per lane the queue (ready, in flight, delayed, dead, lag, oldest ready job); \
        the worker processes alive; per (API key, model family) the shared budget; the webhook \
        outbox; and `warnings` an operator should act on (work queued and no worker alive). \
        Needs an admin token.",
    responses(
        (status = 200, description = "The status.", body = SystemStatus),
        (status = 401, description = "Missing or invalid bearer token.", body = ErrorBody),
        (status = 403, description = "The token is not an admin's.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn status(
    State(state): State<ApiState>,
    _admin: Admin,
) -> Result<Json<SystemStatus>, ApiError> {
    Ok(Json(state.ops().status().await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeadParams {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    report_id: Option<String>,
}

/// `GET /v1/dead-letters`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterList {
    pub dead_letters: Vec<DeadLetterInfo>,
}

#[utoipa::path(
    get,
    path = "/v1/dead-letters",
    tag = "operations",
    operation_id = "list_dead_letters",
    summary = "Dead-lettered jobs, newest first",
    description = "Each with its reason, last error, attempts, and the report and section it \
        belongs to. Needs an admin token.",
    params(
        ("limit" = Option<usize>, Query, description = "How many (default 50)", minimum = 1, maximum = 1000),
        ("report_id" = Option<String>, Query, description = "Only this report's", pattern = "^[0-9A-Za-z-]{1,64}$"),
    ),
    responses(
        (status = 200, description = "Dead letters.", body = DeadLetterList),
        (status = 400, description = "A query parameter is invalid; `field` names it.", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token.", body = ErrorBody),
        (status = 403, description = "The token is not an admin's.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn dead_letters(
    State(state): State<ApiState>,
    _admin: Admin,
    ApiQuery(q): ApiQuery<DeadParams>,
) -> Result<Json<DeadLetterList>, ApiError> {
    let limit = q.limit.unwrap_or(LIST_DEFAULT);
    if !(1..=LIST_MAX).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "must be 1 to 1000",
        )
        .with_field("limit"));
    }
    if let Some(r) = &q.report_id
        && !fanout_aggregator::is_report_id(r)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "is not a report id",
        )
        .with_field("report_id"));
    }
    let dead_letters = state
        .ops()
        .dead_letters(limit, q.report_id.as_deref())
        .await?;
    Ok(Json(DeadLetterList { dead_letters }))
}

/// What an operator action did, item by item.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Resolutions {
    pub results: Vec<Resolution>,
}

#[utoipa::path(
    post,
    path = "/v1/dead-letters/replay",
    tag = "operations",
    operation_id = "replay_dead_letters",
    summary = "Run dead-lettered jobs again",
    description = "Each selected job goes back on the queue with fresh attempts; its section is \
        reopened, and a report that had finished with it failed goes back to `running`, is \
        assembled again when it completes and its webhook is sent again. Replaying a letter \
        twice runs it once more, not twice (the second finds it `not_found`). Needs an admin \
        token.",
    request_body = DeadLetterSelection,
    responses(
        (status = 200, description = "What happened to each selected letter.", body = Resolutions),
        (status = 400, description = "The body is not valid JSON (the message gives line and column).", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token.", body = ErrorBody),
        (status = 403, description = "The token is not an admin's.", body = ErrorBody),
        (status = 413, description = "The body is larger than `api.max_body_bytes`.", body = ErrorBody),
        (status = 415, description = "The content type is not `application/json`.", body = ErrorBody),
        (status = 422, description = "Nothing selected, or a malformed id; `field` names it.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn replay(
    State(state): State<ApiState>,
    admin: Admin,
    ApiJson(sel): ApiJson<DeadLetterSelection>,
) -> Result<Json<Resolutions>, ApiError> {
    let results = state.ops().replay(&sel, &actor(&admin)).await?;
    Ok(Json(Resolutions { results }))
}

#[utoipa::path(
    post,
    path = "/v1/dead-letters/drop",
    tag = "operations",
    operation_id = "drop_dead_letters",
    summary = "Delete dead-lettered jobs",
    description = "Their sections stay failed. Needs an admin token.",
    request_body = DeadLetterSelection,
    responses(
        (status = 200, description = "What happened to each selected letter.", body = Resolutions),
        (status = 400, description = "The body is not valid JSON (the message gives line and column).", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token.", body = ErrorBody),
        (status = 403, description = "The token is not an admin's.", body = ErrorBody),
        (status = 413, description = "The body is larger than `api.max_body_bytes`.", body = ErrorBody),
        (status = 415, description = "The content type is not `application/json`.", body = ErrorBody),
        (status = 422, description = "Nothing selected, or a malformed id; `field` names it.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn drop_dead_letters(
    State(state): State<ApiState>,
    admin: Admin,
    ApiJson(sel): ApiJson<DeadLetterSelection>,
) -> Result<Json<Resolutions>, ApiError> {
    let results = state.ops().drop_dead_letters(&sel, &actor(&admin)).await?;
    Ok(Json(Resolutions { results }))
}

#[utoipa::path(
    delete,
    path = "/v1/dead-letters/{id}",
    tag = "operations",
    operation_id = "drop_dead_letter",
    summary = "Delete one dead-lettered job",
    params(("id" = String, Path, description = "Dead letter id (`<lane>:<entry>`)", pattern = "^(interactive|batch):[0-9]{1,19}-[0-9]{1,19}$")),
    responses(
        (status = 200, description = "What happened to it.", body = Resolutions),
        (status = 401, description = "Missing or invalid bearer token.", body = ErrorBody),
        (status = 403, description = "The token is not an admin's.", body = ErrorBody),
        (status = 422, description = "A malformed id; `field` names it.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn drop_dead_letter(
    State(state): State<ApiState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<Resolutions>, ApiError> {
    let sel = DeadLetterSelection {
        ids: vec![id],
        ..Default::default()
    };
    let results = state.ops().drop_dead_letters(&sel, &actor(&admin)).await?;
    Ok(Json(Resolutions { results }))
}

/// `GET /v1/webhooks/dead`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeadWebhookList {
    pub webhooks: Vec<DeadWebhookInfo>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitParams {
    #[serde(default)]
    limit: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/v1/webhooks/dead",
    tag = "operations",
    operation_id = "list_dead_webhooks",
    summary = "Webhooks given up on, newest first",
    params(("limit" = Option<usize>, Query, description = "How many (default 50)", minimum = 1, maximum = 1000)),
    responses(
        (status = 200, description = "Dead webhooks.", body = DeadWebhookList),
        (status = 400, description = "A query parameter is invalid; `field` names it.", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token.", body = ErrorBody),
        (status = 403, description = "The token is not an admin's.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn dead_webhooks(
    State(state): State<ApiState>,
    _admin: Admin,
    ApiQuery(q): ApiQuery<LimitParams>,
) -> Result<Json<DeadWebhookList>, ApiError> {
    let limit = q.limit.unwrap_or(LIST_DEFAULT);
    if !(1..=LIST_MAX).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "must be 1 to 1000",
        )
        .with_field("limit"));
    }
    let webhooks = state.ops().dead_webhooks(limit).await?;
    Ok(Json(DeadWebhookList { webhooks }))
}

/// Which webhooks an action applies to.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSelection {
    /// Reports whose webhooks to act on.
    #[serde(default)]
    pub report_ids: Vec<String>,
    /// Every dead webhook.
    #[serde(default)]
    pub all_dead: bool,
}

#[utoipa::path(
    post,
    path = "/v1/webhooks/redeliver",
    tag = "operations",
    operation_id = "redeliver_webhooks",
    summary = "Send webhooks again from their first attempt",
    description = "A dead one, or a delivered one its receiver lost. Needs an admin token.",
    request_body = WebhookSelection,
    responses(
        (status = 200, description = "What happened to each report's webhook.", body = Resolutions),
        (status = 400, description = "The body is not valid JSON (the message gives line and column).", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token.", body = ErrorBody),
        (status = 403, description = "The token is not an admin's.", body = ErrorBody),
        (status = 413, description = "The body is larger than `api.max_body_bytes`.", body = ErrorBody),
        (status = 415, description = "The content type is not `application/json`.", body = ErrorBody),
        (status = 422, description = "Nothing selected, or a malformed id; `field` names it.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn redeliver_webhooks(
    State(state): State<ApiState>,
    admin: Admin,
    ApiJson(sel): ApiJson<WebhookSelection>,
) -> Result<Json<Resolutions>, ApiError> {
    let results = state
        .ops()
        .redeliver_webhooks(&sel.report_ids, sel.all_dead, &actor(&admin))
        .await?;
    Ok(Json(Resolutions { results }))
}

#[utoipa::path(
    post,
    path = "/v1/webhooks/drop",
    tag = "operations",
    operation_id = "drop_webhooks",
    summary = "Forget dead webhooks",
    request_body = WebhookSelection,
    responses(
        (status = 200, description = "What happened to each report's webhook.", body = Resolutions),
        (status = 400, description = "The body is not valid JSON (the message gives line and column).", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token.", body = ErrorBody),
        (status = 403, description = "The token is not an admin's.", body = ErrorBody),
        (status = 413, description = "The body is larger than `api.max_body_bytes`.", body = ErrorBody),
        (status = 415, description = "The content type is not `application/json`.", body = ErrorBody),
        (status = 422, description = "Nothing selected, or a malformed id; `field` names it.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn drop_webhooks(
    State(state): State<ApiState>,
    admin: Admin,
    ApiJson(sel): ApiJson<WebhookSelection>,
) -> Result<Json<Resolutions>, ApiError> {
    let results = state
        .ops()
        .drop_webhooks(&sel.report_ids, sel.all_dead, &actor(&admin))
        .await?;
    Ok(Json(Resolutions { results }))
}
