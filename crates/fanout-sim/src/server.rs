//! HTTP: the routes, the timing of responses, and the running server.

use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::api::{ApiError, Completion};
use crate::config::SimConfig;
use crate::limits::{self, LimitHeaders, RateHeaders};
use crate::sim::{Plan, Reply, Sim};
use crate::stats::SimStats;

/// Output tokens per streamed content chunk.
const TOKENS_PER_CHUNK: usize = 4;

/// The simulator's routes: the OpenAI API under `/v1` and its own controls under `/sim`.
pub fn router(sim: Sim) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
        .route("/sim/stats", get(stats))
        .route("/sim/reset", post(reset))
        .merge(crate::batch::routes(&sim))
        .fallback(unknown_url)
        .with_state(sim)
}

/// Serves the simulator on `listener` until `shutdown` is cancelled, then lets in-flight
/// responses finish (hanging and waiting ones end at once with a 503).
///
/// An invalid `config` is an [`io::ErrorKind::InvalidInput`] error.
pub async fn run(
    listener: TcpListener,
    config: SimConfig,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let sim = Sim::new(config, shutdown.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    serve(listener, sim, shutdown).await
}

async fn serve(listener: TcpListener, sim: Sim, shutdown: CancellationToken) -> io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "simulated provider listening");
    }
    axum::serve(listener, router(sim))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Starts a simulator on a free port of 127.0.0.1 in a background task.
pub async fn spawn(config: SimConfig) -> io::Result<SimHandle> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let sim = Sim::new(config, shutdown.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let task = tokio::spawn(
        serve(listener, sim.clone(), shutdown.clone())
            .instrument(tracing::info_span!("fanout_sim", %addr)),
    );
    Ok(SimHandle {
        addr,
        sim,
        shutdown,
        task: Some(task),
    })
}

/// A simulator running in a background task (see [`spawn`]). Dropping it stops the server.
#[derive(Debug)]
pub struct SimHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    sim: Sim,
    shutdown: CancellationToken,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl SimHandle {
    /// The OpenAI base URL of the simulator, `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// A snapshot of the counters, the same as `GET /sim/stats`.
    pub fn stats(&self) -> SimStats {
        self.sim.stats()
    }

    /// Every rate decision so far, oldest first (see [`Sim::timeline`]).
    pub fn timeline(&self) -> Vec<crate::RateEvent> {
        self.sim.timeline()
    }

    /// Clears counters, buckets, `fail_first` counts, files and batches, the same as
    /// `POST /sim/reset`.
    pub fn reset(&self) {
        self.sim.reset();
    }

    /// Stops the server and waits for it to finish.
    pub async fn shutdown(mut self) -> io::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn chat_completions(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    let start = Instant::now();
    let id = sim.next_id();
    let Some(key) = bearer_token(&headers) else {
        sim.unauthenticated();
        return with_request_id(error_response(&missing_key()), id);
    };
    let decision = sim.decide(key, &body, id);
    let mut response = match decision.plan {
        Plan::Error(error) => error_response(&error),
        Plan::FailAfter(timing) => match wait_until(&sim, start + timing.first_token).await {
            Ok(()) => error_response(&ApiError::Server),
            Err(error) => error_response(&error),
        },
        Plan::Hang => {
            sim.shutdown_token().cancelled().await;
            error_response(&ApiError::ShuttingDown)
        }
        Plan::Reply(reply) => match reply_response(&sim, start, *reply).await {
            Ok(response) => response,
            Err(error) => error_response(&error),
        },
    };
    tracing::debug!(status = response.status().as_u16(), id, "chat completion");
    add_rate_headers(response.headers_mut(), &decision.rate);
    with_request_id(response, id)
}

/// The 401 of a request without a bearer token.
pub(crate) fn missing_key() -> ApiError {
    ApiError::Unauthorized(
        "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).".to_owned(),
    )
}

/// The bearer token of the `Authorization` header, if there is a non-empty one.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Sleeps until `deadline`, or fails with a 503 when the simulator shuts down first.
async fn wait_until(sim: &Sim, deadline: Instant) -> Result<(), ApiError> {
    tokio::select! {
        () = tokio::time::sleep_until(deadline) => Ok(()),
        () = sim.shutdown_token().cancelled() => Err(ApiError::ShuttingDown),
    }
}

async fn reply_response(sim: &Sim, start: Instant, reply: Reply) -> Result<Response, ApiError> {
    let tokens = reply.completion.completion_tokens;
    if !reply.stream {
        wait_until(sim, start + reply.timing.after_tokens(tokens)).await?;
        let mut body =
            serde_json::to_vec(&reply.completion.object(&reply.content)).unwrap_or_default();
        if reply.truncate {
            body.truncate(body.len() / 2);
        }
        return Ok(([(CONTENT_TYPE, "application/json")], body).into_response());
    }

    // Headers go out with the first token, as OpenAI's do.
    wait_until(sim, start + reply.timing.first_token).await?;
    let frames = stream_frames(start, &reply);
    let events = futures::stream::iter(frames)
        .then(|(at, frame)| async move {
            tokio::time::sleep_until(at).await;
            Ok::<_, Infallible>(frame)
        })
        .take_until(sim.shutdown_token().clone().cancelled_owned());
    Ok((
        [
            (CONTENT_TYPE, "text/event-stream"),
            (CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(events),
    )
        .into_response())
}

/// The SSE frames of a streamed reply, each with the time it is due: the role, content deltas
/// paced by the per-token latency, the finish reason, the usage chunk if asked for, `[DONE]`.
/// A truncated reply stops after half of them, in the middle of a chunk's JSON.
fn stream_frames(start: Instant, reply: &Reply) -> Vec<(Instant, Bytes)> {
    let completion: &Completion = &reply.completion;
    let include_usage = reply.include_usage;
    let event = |value: Value| Bytes::from(format!("data: {value}\n\n"));

    let mut frames = vec![(
        start + reply.timing.first_token,
        event(completion.delta_chunk(
            json!({"role": "assistant", "content": "", "refusal": null}),
            false,
            include_usage,
        )),
    )];
    let chars: Vec<char> = reply.content.chars().collect();
    let mut tokens_out = 0;
    for piece in chars.chunks(TOKENS_PER_CHUNK * 4) {
        let piece: String = piece.iter().collect();
        tokens_out += crate::content::text_tokens(&piece);
        frames.push((
            start + reply.timing.after_tokens(tokens_out),
            event(completion.delta_chunk(json!({"content": piece}), false, include_usage)),
        ));
    }
    let end = start + reply.timing.after_tokens(tokens_out);
    frames.push((
        end,
        event(completion.delta_chunk(json!({}), true, include_usage)),
    ));
    if include_usage {
        frames.push((end, event(completion.usage_chunk())));
    }
    frames.push((end, Bytes::from_static(b"data: [DONE]\n\n")));

    if reply.truncate {
        let keep = frames.len() / 2;
        let (at, whole) = frames[keep].clone();
        // The cut event is still terminated, so the client parses it and fails on its JSON
        // instead of dropping an unfinished event at the end of the stream.
        let cut = [&whole[..whole.len() / 2], b"\n\n"].concat();
        frames.truncate(keep);
        frames.push((at, Bytes::from(cut)));
    }
    frames
}

pub(crate) fn error_response(error: &ApiError) -> Response {
    let mut response = (error.status(), Json(error.body())).into_response();
    if let Some(wait) = error.retry_after() {
        let headers = response.headers_mut();
        headers.insert(RETRY_AFTER, HeaderValue::from(limits::ceil_secs(wait)));
        headers.insert(
            HeaderName::from_static("retry-after-ms"),
            HeaderValue::from(limits::ceil_millis(wait).max(1)),
        );
    }
    response
}

pub(crate) fn with_request_id(mut response: Response, id: u64) -> Response {
    if let Ok(value) = HeaderValue::from_str(&format!("req_sim{id:010}")) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// The six `x-ratelimit-*` headers; an unlimited dimension sends none of its three.
fn add_rate_headers(headers: &mut HeaderMap, rate: &RateHeaders) {
    let dimensions = [("requests", rate.requests), ("tokens", rate.tokens)];
    for (name, values) in dimensions {
        let Some(LimitHeaders {
            limit,
            remaining,
            reset,
        }) = values
        else {
            continue;
        };
        let pairs = [
            ("limit", limit.to_string()),
            ("remaining", remaining.to_string()),
            ("reset", limits::format_reset(reset)),
        ];
        for (field, value) in pairs {
            let header = format!("x-ratelimit-{field}-{name}");
            if let (Ok(header), Ok(value)) =
                (HeaderName::try_from(header), HeaderValue::try_from(value))
            {
                headers.insert(header, value);
            }
        }
    }
}

fn model_object(name: &str) -> Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "fanout-sim"})
}

async fn list_models(State(sim): State<Sim>) -> Json<Value> {
    let data: Vec<Value> = sim
        .config()
        .models
        .iter()
        .map(|model| model_object(&model.name))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn get_model(State(sim): State<Sim>, Path(model): Path<String>) -> Response {
    if sim.config().models.iter().any(|m| m.name == model) {
        Json(model_object(&model)).into_response()
    } else {
        error_response(&ApiError::NotFound(format!(
            "The model `{model}` does not exist or you do not have access to it."
        )))
    }
}

async fn stats(State(sim): State<Sim>) -> Json<SimStats> {
    Json(sim.stats())
}

async fn reset(State(sim): State<Sim>) -> StatusCode {
    sim.reset();
    StatusCode::NO_CONTENT
}

async fn unknown_url(method: Method, uri: Uri) -> Response {
    error_response(&ApiError::UnknownUrl(format!(
        "Unknown request URL: {method} {}.",
        uri.path()
    )))
}
