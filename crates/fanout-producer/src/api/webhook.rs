//! Webhooks: when a report with a `callback_url` finishes, POST its final JSON there, signed.
//!
//! The aggregator process calls [`on_finished_hook`] once per finished report; the hook only
//! hands the delivery to a task tracker, so a slow or dead receiver never blocks assembly.
//! Each delivery is tried `attempts` times with exponential backoff and jitter (a receiver's
//! `retry-after` wins); 2xx is delivered, 408/425/429/5xx and network errors are retried,
//! other answers (including redirects, which are not followed) give up at once.
//!
//! Headers of each POST:
//! - `X-Fanout-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>` (when a
//!   secret is set; `FANOUT_WEBHOOK_SECRET`)
//! - `X-Fanout-Timestamp: <unix seconds>` (signed with the body: reject old ones to stop
//!   replays)
//! - `X-Fanout-Event: report.finished`, `X-Fanout-Report-Id: <id>` (the same on every attempt
//!   and on a rare repeat after an aggregator crash: deduplicate on it), `X-Fanout-Attempt: <n>`
//!
//! Deliveries live in memory: those still retrying when the process stops are abandoned
//! (logged). The report itself stays readable through the API.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fanout_aggregator::{OnFinished, ReportView, render_json};
use fanout_core::Secret;
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

pub const SIGNATURE_HEADER: &str = "x-fanout-signature";
pub const TIMESTAMP_HEADER: &str = "x-fanout-timestamp";
pub const EVENT_HEADER: &str = "x-fanout-event";
pub const REPORT_ID_HEADER: &str = "x-fanout-report-id";
pub const ATTEMPT_HEADER: &str = "x-fanout-attempt";
/// The environment variable the binaries read the signing secret from.
pub const SECRET_ENV: &str = "FANOUT_WEBHOOK_SECRET";

/// How deliveries are made.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// Signs every delivery; without one, deliveries are unsigned (a warning is logged).
    pub secret: Option<Secret>,
    /// Tries per delivery, the first included.
    pub attempts: u32,
    /// Backoff before the second try; doubles each time, with jitter, up to `max_delay`.
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Timeout of one POST.
    pub timeout: Duration,
    /// POSTs in flight at once; more wait their turn.
    pub max_in_flight: usize,
    /// Deliveries waiting or retrying at once; past this, new ones are dropped (logged).
    pub max_pending: usize,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        Self {
            secret: None,
            attempts: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
            max_in_flight: 32,
            max_pending: 10_000,
        }
    }
}

impl WebhookOptions {
    /// The defaults, with the secret from `FANOUT_WEBHOOK_SECRET` in `env` (the process
    /// environment in binaries, a map in tests).
    pub fn from_env(env: &std::collections::HashMap<String, String>) -> Self {
        Self {
            secret: env
                .get(SECRET_ENV)
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .map(Secret::new),
            ..Self::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("cannot build the webhook http client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The delivery side of webhooks: hand it finished reports, it POSTs them in the background.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: reqwest::Client,
    options: WebhookOptions,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    permits: Semaphore,
    pending: AtomicUsize,
}

impl Webhooks {
    /// Deliveries stop retrying when `shutdown` is cancelled (see also [`Webhooks::drain`]).
    pub fn new(options: WebhookOptions, shutdown: CancellationToken) -> Result<Self, WebhookError> {
        let client = reqwest::Client::builder()
            .timeout(options.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("fanout-webhook/", env!("CARGO_PKG_VERSION")))
            .build()?;
        if options.secret.is_none() {
            warn!(
                env = SECRET_ENV,
                "no webhook secret set: webhook deliveries are not signed"
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                permits: Semaphore::new(options.max_in_flight.max(1)),
                options,
                tracker: TaskTracker::new(),
                shutdown,
                pending: AtomicUsize::new(0),
            }),
        })
    }

    /// Start delivering `view` to its `callback_url` (if it has one) in the background.
    /// Returns whether a delivery was started. Never blocks.
    pub fn dispatch(&self, view: &ReportView) -> bool {
        let Some(url) = view.callback_url.clone() else {
            return false;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            warn!(report = %view.id, "webhook dropped: not called on a tokio runtime");
            return false;
        };
        let inner = &self.inner;
        if inner.pending.fetch_add(1, Ordering::Relaxed) >= inner.options.max_pending {
            inner.pending.fetch_sub(1, Ordering::Relaxed);
            warn!(report = %view.id, max_pending = inner.options.max_pending, "webhook dropped: too many deliveries pending");
            return false;
        }
        let body = Bytes::from(render_json(view).to_string());
        let host = reqwest::Url::parse(&url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_default();
        let span = tracing::info_span!("webhook", report = %view.id, host = %host);
        let delivery = deliver(self.inner.clone(), url, view.id.clone(), body);
        inner.tracker.spawn_on(delivery.instrument(span), &handle);
        true
    }

    /// A hook for [`fanout_aggregator::AggregatorOptions::on_finished`].
    pub fn hook(&self) -> OnFinished {
        let this = self.clone();
        Arc::new(move |view: ReportView| {
            this.dispatch(&view);
        })
    }

    /// Deliveries waiting, in flight or between retries.
    pub fn pending(&self) -> usize {
        self.inner.pending.load(Ordering::Relaxed)
    }

    /// Stop taking deliveries' retries further than `grace`: wait up to `grace` for what is
    /// pending, then cancel the rest (they are logged as abandoned).
    pub async fn drain(&self, grace: Duration) {
        self.inner.tracker.close();
        if tokio::time::timeout(grace, self.inner.tracker.wait())
            .await
            .is_err()
        {
            self.inner.shutdown.cancel();
            self.inner.tracker.wait().await;
        }
    }
}

/// The aggregator's `on_finished` hook that delivers webhooks through `webhooks`. Compose it
/// with other hooks by calling it from your own closure.
pub fn on_finished_hook(webhooks: &Webhooks) -> OnFinished {
    webhooks.hook()
}

/// `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`, the `X-Fanout-Signature` value.
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
    )
}

/// Whether `signature` (an `X-Fanout-Signature` value) signs `timestamp` and `body` with
/// `secret`. Compares in constant time. Receivers should also reject timestamps older than
/// a few minutes.
pub fn verify(secret: &str, timestamp: &str, body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    mac(secret, timestamp, body).verify_slice(&sig).is_ok()
}

fn mac(secret: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac takes a key of any size");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// What one try came to.
enum Try {
    Delivered,
    /// Retry, after at least this long if the receiver said so.
    Retry(Option<Duration>),
    GiveUp,
}

async fn deliver(inner: Arc<Inner>, url: String, report_id: String, body: Bytes) {
    let options = &inner.options;
    let attempts = options.attempts.max(1);
    let permit = tokio::select! {
        _ = inner.shutdown.cancelled() => None,
        p = inner.permits.acquire() => p.ok(),
    };
    if permit.is_some() {
        for attempt in 1..=attempts {
            let outcome = try_once(&inner, &url, &report_id, &body, attempt).await;
            let wait = match outcome {
                Try::Delivered | Try::GiveUp => break,
                Try::Retry(_) if attempt == attempts => {
                    warn!(attempts, "webhook not delivered, giving up");
                    break;
                }
                Try::Retry(hint) => backoff(options, attempt, hint),
            };
            debug!(
                attempt,
                wait_ms = wait.as_millis() as u64,
                "webhook will retry"
            );
            let shutdown = tokio::select! {
                _ = inner.shutdown.cancelled() => true,
                _ = tokio::time::sleep(wait) => false,
            };
            if shutdown {
                warn!(attempt, "webhook abandoned at shutdown");
                break;
            }
        }
    } else {
        warn!("webhook abandoned at shutdown");
    }
    drop(permit);
    inner.pending.fetch_sub(1, Ordering::Relaxed);
}

async fn try_once(inner: &Inner, url: &str, report_id: &str, body: &Bytes, attempt: u32) -> Try {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .to_string();
    let mut req = inner
        .client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(TIMESTAMP_HEADER, &timestamp)
        .header(EVENT_HEADER, "report.finished")
        .header(REPORT_ID_HEADER, report_id)
        .header(ATTEMPT_HEADER, attempt.to_string())
        .body(body.clone());
    if let Some(secret) = &inner.options.secret {
        req = req.header(SIGNATURE_HEADER, sign(secret.expose(), &timestamp, body));
    }
    let send = req.send();
    let result = tokio::select! {
        _ = inner.shutdown.cancelled() => return Try::GiveUp,
        r = send => r,
    };
    match result {
        Ok(resp) => {
            let status = resp.status();
            if status.is_success() {
                info!(attempt, status = status.as_u16(), "webhook delivered");
                return Try::Delivered;
            }
            let retryable = status.is_server_error() || matches!(status.as_u16(), 408 | 425 | 429);
            if retryable {
                let hint = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                warn!(
                    attempt,
                    status = status.as_u16(),
                    "webhook receiver failed, will retry"
                );
                Try::Retry(hint)
            } else {
                warn!(
                    attempt,
                    status = status.as_u16(),
                    "webhook rejected by the receiver, not retried"
                );
                Try::GiveUp
            }
        }
        Err(e) if e.is_builder() => {
            warn!(error = %e, "webhook url is not usable, not retried");
            Try::GiveUp
        }
        Err(e) => {
            warn!(attempt, error = %e.without_url(), "webhook request failed, will retry");
            Try::Retry(None)
        }
    }
}

/// Exponential backoff with jitter (half to all of the step); a receiver's hint wins, capped.
fn backoff(options: &WebhookOptions, attempt: u32, hint: Option<Duration>) -> Duration {
    if let Some(h) = hint {
        return h.min(options.max_delay);
    }
    let step = options
        .base_delay
        .saturating_mul(1u32 << (attempt - 1).min(20))
        .min(options.max_delay);
    let jitter = rand::rng().random_range(0.5..=1.0);
    step.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_does_not() {
        let sig = sign("s3cret", "1718000000", b"{\"a\":1}");
        assert!(sig.starts_with("sha256="));
        assert_eq!(sig.len(), "sha256=".len() + 64);
        assert!(verify("s3cret", "1718000000", b"{\"a\":1}", &sig));
        assert!(!verify("s3cret", "1718000001", b"{\"a\":1}", &sig));
        assert!(!verify("s3cret", "1718000000", b"{\"a\":2}", &sig));
        assert!(!verify("other", "1718000000", b"{\"a\":1}", &sig));
        assert!(!verify("s3cret", "1718000000", b"{\"a\":1}", "sha256=zz"));
        assert!(!verify("s3cret", "1718000000", b"{\"a\":1}", &sig[7..]));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_respects_hints_and_the_cap() {
        let o = WebhookOptions::default();
        for attempt in 1..=4u32 {
            let d = backoff(&o, attempt, None);
            let step = Duration::from_secs(1 << (attempt - 1));
            assert!(d >= step / 2 && d <= step, "{attempt}: {d:?}");
        }
        assert!(backoff(&o, 30, None) <= o.max_delay);
        assert_eq!(
            backoff(&o, 1, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            backoff(&o, 1, Some(Duration::from_secs(7_000))),
            o.max_delay
        );
    }

    #[test]
    fn options_read_the_secret_and_debug_hides_it() {
        let env = [(SECRET_ENV.to_owned(), "whsec-123".to_owned())]
            .into_iter()
            .collect();
        let o = WebhookOptions::from_env(&env);
        assert_eq!(o.secret.as_ref().map(Secret::expose), Some("whsec-123"));
        assert!(!format!("{o:?}").contains("whsec-123"));
    }
}
