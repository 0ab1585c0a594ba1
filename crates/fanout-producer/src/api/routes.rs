//! The handlers of the report, template and operations routes.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fanout_aggregator::{Format, ReportDocument, ReportView};
use fanout_core::ReportStatus;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ApiState;
use super::auth::Tenant;
use super::dto::{Accepted, Health, Links, ReportList, ReportRef, SubmitBody, TemplateInfo};
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiQuery, ReportId};

#[utoipa::path(
    post,
    path = "/v1/reports",
    tag = "reports",
    operation_id = "submit_report",
    summary = "Submit a report",
    description = "Validates the request, stores the report and queues the jobs whose \
        dependencies are met. Nothing is written for an invalid request. A 503 may leave a \
        report stored but not (fully) queued: retry with the same `idempotency_key`, which \
        answers with that report and queues what is missing.",
    request_body(content = SubmitBody, content_type = "application/json"),
    responses(
        (status = 202, description = "Created; its jobs are queued.", body = Accepted,
            headers(("location" = String, description = "The report's URL"))),
        (status = 200, description = "The idempotency key matched an earlier report of this tenant; nothing new was created.",
            body = Accepted, headers(("location" = String, description = "The report's URL"))),
        (status = 400, description = "The body is not valid JSON (the message gives line and column).", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token.", body = ErrorBody,
            headers(("www-authenticate" = String, description = "`Bearer realm=\"fanout\"`"))),
        (status = 409, description = "`idempotency_key_reused`: the key made a report from a different request (template, inputs, lane or callback_url).", body = ErrorBody),
        (status = 413, description = "The body is larger than `api.max_body_bytes`.", body = ErrorBody),
        (status = 415, description = "The content type is not `application/json`.", body = ErrorBody),
        (status = 422, description = "A field is missing, has the wrong type or an invalid value; `field` names it (`template`, `inputs.personas[2].name`, …).", body = ErrorBody),
        (status = 429, description = "The tenant exceeded `api.submissions_per_minute`.", body = ErrorBody,
            headers(("retry-after" = u64, description = "Seconds until the window resets"))),
        (status = 503, description = "Redis is unavailable; retry (with the same idempotency key).", body = ErrorBody,
            headers(("retry-after" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn submit(
    State(state): State<ApiState>,
    tenant: Tenant,
    ApiJson(body): ApiJson<SubmitBody>,
) -> Result<Response, ApiError> {
    state.limiter().check(state.pool(), &tenant.0).await?;
    let templates = state.producer().templates();
    // Only named templates over HTTP: the producer also loads a template from a path, which
    // must not be reachable from a request.
    if templates.iter().all(|t| t.name != body.template) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_template",
            format!(
                "unknown template `{}`; known: {}",
                body.template,
                templates.names().join(", ")
            ),
        )
        .with_field("template"));
    }
    if let Some(key) = &body.idempotency_key
        && (!(1..=200).contains(&key.len()) || !key.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "must be 1 to 200 printable ASCII characters (no spaces)",
        )
        .with_field("idempotency_key"));
    }
    let submitted = state.producer().submit(&tenant.0, body.into()).await?;
    let status = if submitted.duplicate {
        state
            .store()
            .status(&submitted.report_id)
            .await?
            .unwrap_or(ReportStatus::Running)
    } else {
        ReportStatus::Running
    };
    let links = Links::for_report(&submitted.report_id);
    let code = if submitted.duplicate {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&links.this) {
        headers.insert(header::LOCATION, v);
    }
    // Accepted either way; the caller hears that nothing will run it yet. A failure to tell
    // is not the submit's failure.
    let warnings = match state.ops().idle_warning().await {
        Ok(w) => w.into_iter().collect(),
        Err(e) => {
            tracing::debug!(error = %e, "could not check for live workers");
            Vec::new()
        }
    };
    let body = Accepted {
        id: submitted.report_id,
        status,
        duplicate: submitted.duplicate,
        jobs: submitted.jobs,
        links,
        warnings,
    };
    Ok((code, headers, Json(body)).into_response())
}

/// A tenant name as `FANOUT_API_TOKENS` allows it.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Reports per page unless `limit` says otherwise, and the most a page holds.
const LIST_DEFAULT: usize = 20;
const LIST_MAX: usize = 100;
/// The largest `since` accepted: JSON numbers are exact up to 2^53 in every client.
const SINCE_MAX: u64 = 9_007_199_254_740_991;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    #[serde(default)]
    status: Option<ReportStatus>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    since: Option<u64>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/reports",
    tag = "reports",
    operation_id = "list_reports",
    summary = "The caller's reports, newest first",
    description = "One page at a time: pass `next_cursor` as `cursor` for the next. Filters: \
        `status`, `template`, `since` (created at or after, ms since the epoch). Reports are \
        listed until they expire (`reports.ttl_secs` after they finished).",
    params(
        ("status" = Option<ReportStatus>, Query, description = "Only reports in this status"),
        ("template" = Option<String>, Query, description = "Only reports of this template", max_length = 100),
        ("since" = Option<u64>, Query, description = "Only reports created at or after this (ms since the epoch)", minimum = 0, maximum = 9_007_199_254_740_991_u64),
        ("limit" = Option<usize>, Query, description = "Reports per page (default 20)", minimum = 1, maximum = 100),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page", pattern = "^[0-9]{1,15}\\.[0-9A-Za-z-]{1,64}$"),
        ("tenant" = Option<String>, Query, description = "Another tenant's reports (admin tokens only; default: the caller's)", pattern = "^[0-9A-Za-z._-]{1,64}$"),
    ),
    responses(
        (status = 200, description = "One page of reports.", body = ReportList),
        (status = 400, description = "A query parameter is invalid; `field` names it.", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token.", body = ErrorBody,
            headers(("www-authenticate" = String, description = "`Bearer realm=\"fanout\"`"))),
        (status = 403, description = "`tenant` names another tenant and the token is not an admin's.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody,
            headers(("retry-after" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_reports(
    State(state): State<ApiState>,
    tenant: Tenant,
    ApiQuery(q): ApiQuery<ListParams>,
) -> Result<Json<ReportList>, ApiError> {
    let bad = |field: &str, message: &str| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message).with_field(field)
    };
    let limit = q.limit.unwrap_or(LIST_DEFAULT);
    if !(1..=LIST_MAX).contains(&limit) {
        return Err(bad("limit", "must be 1 to 100"));
    }
    if q.since.is_some_and(|s| s > SINCE_MAX) {
        return Err(bad("since", "must be at most 9007199254740991"));
    }
    if q.template.as_ref().is_some_and(|t| t.chars().count() > 100) {
        return Err(bad("template", "must be at most 100 characters"));
    }
    let cursor = match q.cursor.as_deref() {
        Some(c) => Some(
            fanout_aggregator::Cursor::parse(c)
                .ok_or_else(|| bad("cursor", "is not a cursor this API handed out"))?,
        ),
        None => None,
    };
    let owner = match q.tenant.as_deref() {
        None => tenant.0.as_str(),
        Some(t) if !is_name(t) => return Err(bad("tenant", "is not a tenant name")),
        Some(t) if tenant.may_see(t) => t,
        Some(_) => {
            return Err(ApiError::forbidden(
                "only an admin token may list another tenant's reports",
            )
            .with_field("tenant"));
        }
    };
    let page = state
        .store()
        .list(
            owner,
            &fanout_aggregator::ListQuery {
                status: q.status,
                template: q.template,
                since: q.since,
                limit,
                cursor,
            },
        )
        .await?;
    Ok(Json(ReportList {
        reports: page.reports,
        next_cursor: page.next.map(|c| c.encode()),
    }))
}

#[utoipa::path(
    get,
    path = "/v1/reports/{id}",
    tag = "reports",
    operation_id = "get_report",
    summary = "A report as it stands",
    description = "Status, every section with its state, text, tokens, cost and timings, and \
        the totals. Another tenant's report is not found, like an unknown one.",
    params(("id" = String, Path, description = "Report id", pattern = "^[0-9A-Za-z-]{1,64}$")),
    responses(
        (status = 200, description = "The report.", body = ReportView),
        (status = 401, description = "Missing or invalid bearer token.", body = ErrorBody,
            headers(("www-authenticate" = String, description = "`Bearer realm=\"fanout\"`"))),
        (status = 404, description = "Unknown, expired or another tenant's report.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody,
            headers(("retry-after" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_report(
    State(state): State<ApiState>,
    tenant: Tenant,
    ReportId(id): ReportId,
) -> Result<Json<ReportView>, ApiError> {
    Ok(Json(state.view_for(&tenant, &id).await?))
}

#[utoipa::path(
    delete,
    path = "/v1/reports/{id}",
    tag = "reports",
    operation_id = "cancel_report",
    summary = "Cancel a report",
    description = "Queued jobs are dropped and running calls are not retried; the report ends \
        `cancelled`. Repeating it is harmless. A report that already finished on its own \
        answers 409.",
    params(("id" = String, Path, description = "Report id", pattern = "^[0-9A-Za-z-]{1,64}$")),
    responses(
        (status = 202, description = "Cancelled (running calls may still finish, their results are kept).", body = ReportRef),
        (status = 401, description = "Missing or invalid bearer token.", body = ErrorBody,
            headers(("www-authenticate" = String, description = "`Bearer realm=\"fanout\"`"))),
        (status = 404, description = "Unknown, expired or another tenant's report.", body = ErrorBody),
        (status = 409, description = "The report already finished.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody,
            headers(("retry-after" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn cancel(
    State(state): State<ApiState>,
    tenant: Tenant,
    ReportId(id): ReportId,
) -> Result<(StatusCode, Json<ReportRef>), ApiError> {
    let view = state.view_for(&tenant, &id).await?;
    if view.status.is_terminal() && view.status != ReportStatus::Cancelled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("report `{id}` already finished ({})", view.status),
        ));
    }
    state.producer().cancel(&id).await?;
    let status = state
        .store()
        .status(&id)
        .await?
        .unwrap_or(ReportStatus::Cancelled);
    tracing::info!(report = %id, tenant = %tenant.0, "report cancelled by request");
    if view.tenant != tenant.0 {
        // An admin acted on another tenant's report.
        tracing::info!(
            target: "fanout::audit",
            actor = %format!("tenant:{}", tenant.0),
            action = "report.cancel",
            report = %id,
            owner = %view.tenant,
            "operator action"
        );
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(ReportRef {
            links: Links::for_report(&id),
            id,
            status,
        }),
    ))
}

/// The format of an assembled report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DocFormat {
    /// Markdown (`text/markdown`).
    #[default]
    Md,
    /// JSON (`application/json`).
    Json,
}

#[derive(Debug, Deserialize)]
pub(crate) struct DocumentQuery {
    #[serde(default)]
    format: Option<DocFormat>,
}

#[utoipa::path(
    get,
    path = "/v1/reports/{id}/report.json",
    tag = "reports",
    operation_id = "get_report_document",
    summary = "The assembled report as JSON",
    description = "The view's fields with the same names and formats, sections grouped as \
        the document reads (a `for_each` section holds its jobs in `items`); partial while \
        the report runs, final once it finished. The same document is the webhook body and \
        the event stream's `report` event.",
    params(("id" = String, Path, description = "Report id", pattern = "^[0-9A-Za-z-]{1,64}$")),
    responses(
        (status = 200, description = "The document.", body = ReportDocument),
        (status = 401, description = "Missing or invalid bearer token.", body = ErrorBody,
            headers(("www-authenticate" = String, description = "`Bearer realm=\"fanout\"`"))),
        (status = 404, description = "Unknown, expired or another tenant's report.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody,
            headers(("retry-after" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn document_json(
    State(state): State<ApiState>,
    tenant: Tenant,
    ReportId(id): ReportId,
) -> Result<Response, ApiError> {
    serve_document(&state, &tenant, &id, DocFormat::Json).await
}

#[utoipa::path(
    get,
    path = "/v1/reports/{id}/report.md",
    tag = "reports",
    operation_id = "get_report_markdown",
    summary = "The assembled report as Markdown",
    description = "A header with status and totals, then the sections in template order; \
        partial while the report runs, final once it finished.",
    params(("id" = String, Path, description = "Report id", pattern = "^[0-9A-Za-z-]{1,64}$")),
    responses(
        (status = 200, description = "The document.", body = String, content_type = "text/markdown"),
        (status = 401, description = "Missing or invalid bearer token.", body = ErrorBody,
            headers(("www-authenticate" = String, description = "`Bearer realm=\"fanout\"`"))),
        (status = 404, description = "Unknown, expired or another tenant's report.", body = ErrorBody),
        (status = 503, description = "Redis is unavailable.", body = ErrorBody,
            headers(("retry-after" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn document_md(
    State(state): State<ApiState>,
    tenant: Tenant,
    ReportId(id): ReportId,
) -> Result<Response, ApiError> {
    serve_document(&state, &tenant, &id, DocFormat::Md).await
}

/// `GET /v1/reports/{id}/report?format=md|json` (Markdown by default), the route before
/// `report.md` and `report.json`. Served for existing clients, left out of the OpenAPI
/// document: one operation there has one content type, so that typed clients know what to
/// parse.
pub(crate) async fn document(
    State(state): State<ApiState>,
    tenant: Tenant,
    ReportId(id): ReportId,
    ApiQuery(q): ApiQuery<DocumentQuery>,
) -> Result<Response, ApiError> {
    serve_document(&state, &tenant, &id, q.format.unwrap_or_default()).await
}

async fn serve_document(
    state: &ApiState,
    tenant: &Tenant,
    id: &str,
    format: DocFormat,
) -> Result<Response, ApiError> {
    state.view_for(tenant, id).await?;
    let (store_format, content_type) = match format {
        DocFormat::Md => (Format::Markdown, "text/markdown; charset=utf-8"),
        DocFormat::Json => (Format::Json, "application/json"),
    };
    let doc = state
        .store()
        .document(id, store_format)
        .await?
        .ok_or_else(|| ApiError::report_not_found(id))?;
    Ok(([(header::CONTENT_TYPE, content_type)], doc).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/templates",
    tag = "templates",
    operation_id = "list_templates",
    summary = "The templates reports can be made from",
    responses(
        (status = 200, description = "Every template, by name.", body = Vec<TemplateInfo>),
        (status = 401, description = "Missing or invalid bearer token.", body = ErrorBody,
            headers(("www-authenticate" = String, description = "`Bearer realm=\"fanout\"`"))),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn templates(
    State(state): State<ApiState>,
    _tenant: Tenant,
) -> Json<Vec<TemplateInfo>> {
    Json(
        state
            .producer()
            .templates()
            .iter()
            .map(|t| TemplateInfo::from(t.as_ref()))
            .collect(),
    )
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    operation_id = "healthz",
    summary = "The process is up",
    responses((status = 200, description = "Up.", body = Health)),
)]
pub(crate) async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    operation_id = "readyz",
    summary = "Redis answers",
    responses(
        (status = 200, description = "Ready.", body = Health),
        (status = 503, description = "Redis does not answer PING.", body = ErrorBody,
            headers(("retry-after" = u64, description = "Seconds to wait"))),
    ),
)]
pub(crate) async fn readyz(State(state): State<ApiState>) -> Result<Json<Health>, ApiError> {
    let mut conn = state.pool().get().await.map_err(ApiError::unavailable)?;
    let _: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(ApiError::unavailable)?;
    Ok(Json(Health {
        status: "ready".into(),
    }))
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    operation_id = "metrics",
    summary = "Prometheus metrics of this process",
    responses((status = 200, description = "Prometheus text exposition.", body = String, content_type = "text/plain")),
)]
pub(crate) async fn metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        fanout_metrics::encode(),
    )
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    operation_id = "openapi",
    summary = "This document",
    responses((status = 200, description = "The OpenAPI document of this API.", body = Object)),
)]
pub(crate) async fn openapi_json(State(state): State<ApiState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi_bytes(),
    )
}
