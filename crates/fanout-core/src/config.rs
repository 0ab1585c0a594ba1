//! Typed configuration: `config/default.toml`, an optional file, `FANOUT_<SECTION>__<KEY>`
//! overrides and the plain variables of the earlier tools, validated once into [`Config`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The documented defaults, embedded so a binary needs no file to start.
pub const DEFAULT_TOML: &str = include_str!("../../../config/default.toml");

/// A configuration problem, naming the key, the value and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A secret read from the environment; `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A provider's plan tier, with the request and token limits it grants per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Free,
    Tier1,
    Tier2,
    Tier3,
    Tier4,
    Tier5,
}

impl Plan {
    pub const NAMES: &'static str = "free, tier1, tier2, tier3, tier4, tier5";

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "free" => Self::Free,
            "tier1" | "payg" | "pay-as-you-go" => Self::Tier1,
            "tier2" => Self::Tier2,
            "tier3" => Self::Tier3,
            "tier4" => Self::Tier4,
            "tier5" => Self::Tier5,
            _ => return None,
        })
    }

    /// (requests per minute, tokens per minute)
    pub fn limits(self) -> (u64, u64) {
        match self {
            Self::Free => (3, 40_000),
            Self::Tier1 => (3_500, 200_000),
            Self::Tier2 => (5_000, 2_000_000),
            Self::Tier3 => (5_000, 4_000_000),
            Self::Tier4 => (10_000, 10_000_000),
            Self::Tier5 => (30_000, 150_000_000),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    redis: RedisConfig,
    provider: RawProvider,
    budget: RawBudget,
    queue: QueueConfig,
    worker: RawWorker,
    reports: ReportsConfig,
    cache: CacheConfig,
    api: RawApi,
    metrics: MetricsConfig,
    log: LogConfig,
    webhooks: WebhooksConfig,
    batch_api: RawBatchApi,
    #[serde(default)]
    prices: BTreeMap<String, Price>,
    #[serde(default)]
    budget_models: BTreeMap<String, ModelLimits>,
    #[serde(default)]
    batch_api_models: BTreeMap<String, u64>,
    #[serde(default)]
    budget_tenants: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: String,
    pub namespace: String,
    pub pool_size: usize,
    pub command_timeout_ms: u64,
    /// Replicas that must acknowledge a write that later steps build on (`WAIT`); 0: none.
    pub wait_replicas: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    base_url: String,
    default_model: String,
    request_timeout_secs: u64,
    keys: Vec<RawKey>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: String,
    env: String,
}

/// An API key: its name (shown in logs and metrics) and its secret (never shown).
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub name: String,
    pub secret: Secret,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub base_url: String,
    pub default_model: String,
    pub request_timeout_secs: u64,
    /// Keys whose secret was found in the environment; may be empty (a simulator needs no key,
    /// but a worker refuses to start without one).
    pub keys: Vec<ApiKey>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    plan: String,
    requests_per_minute: u64,
    tokens_per_minute: u64,
    burst_seconds: f64,
    headroom: f64,
    max_concurrent_requests: u32,
    lease_secs: u64,
    max_wait_secs: u64,
    refund_unused_tokens: bool,
    learn_limits: bool,
    learned_ttl_secs: u64,
    adaptive: bool,
    adaptive_decrease: f64,
    adaptive_quiet_secs: f64,
    adaptive_recovery_secs: f64,
}

/// Per-minute limits of one model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelLimits {
    pub requests_per_minute: u64,
    pub tokens_per_minute: u64,
}

#[derive(Debug, Clone)]
pub struct BudgetConfig {
    pub plan: Plan,
    /// Limits every (key, family) budget gets unless `models` names the family.
    pub limits: ModelLimits,
    pub models: BTreeMap<String, ModelLimits>,
    /// Tenant → the most of the budget (0 < share ≤ 1 of every key's requests and tokens per
    /// minute together) its jobs may take. Tenants not named share the whole budget.
    pub tenant_shares: BTreeMap<String, f64>,
    pub burst_seconds: f64,
    /// Share of every limit the schedule leaves unused (0.02: paced at 98% of the limit), so that
    /// jitter between admission and the provider's clock cannot tip a window over.
    pub headroom: f64,
    pub max_concurrent_requests: u32,
    pub lease_secs: u64,
    pub max_wait_secs: u64,
    pub refund_unused_tokens: bool,
    /// Set explicitly (`requests_per_minute`/`tokens_per_minute` or their variables): never
    /// exceeded, whatever the provider advertises. The plan's numbers are only a starting value.
    pub caps: LimitCaps,
    /// Adopt the limits the provider advertises (`x-ratelimit-limit-*`) for every process.
    pub learn_limits: bool,
    /// A learnt limit not confirmed by a response for this long is forgotten.
    pub learned_ttl_secs: u64,
    /// Lower the shared rate on a 429 the schedule did not expect, raise it back when quiet.
    pub adaptive: Adaptive,
}

/// Explicit per-minute caps (`None`: not set, the provider's advertised limit is used as is).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitCaps {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
}

/// How the budget adapts to a provider that refuses below the limit it was told or learnt:
/// multiplicative decrease on an unexpected 429, additive increase after a quiet period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adaptive {
    pub enabled: bool,
    /// The rate is multiplied by this on an unexpected 429 (0 < d < 1).
    pub decrease: f64,
    /// Seconds without a 429 before the rate climbs back.
    pub quiet_secs: f64,
    /// Seconds the climb takes from zero to the full limit (the additive step's slope).
    pub recovery_secs: f64,
}

impl BudgetConfig {
    /// The limits that apply to `model` (by its family): the starting values.
    pub fn limits_for(&self, model: &str) -> ModelLimits {
        self.models
            .get(model_family(model))
            .copied()
            .unwrap_or(self.limits)
    }

    /// The explicit caps for `model` (by its family): a `[budget_models]` entry caps both.
    pub fn caps_for(&self, model: &str) -> LimitCaps {
        match self.models.get(model_family(model)) {
            Some(l) => LimitCaps {
                requests_per_minute: Some(l.requests_per_minute),
                tokens_per_minute: Some(l.tokens_per_minute),
            },
            None => self.caps,
        }
    }
}

impl Default for BudgetConfig {
    /// The defaults of `config/default.toml` (plan tier1, nothing set explicitly).
    fn default() -> Self {
        let (requests_per_minute, tokens_per_minute) = Plan::Tier1.limits();
        Self {
            plan: Plan::Tier1,
            limits: ModelLimits {
                requests_per_minute,
                tokens_per_minute,
            },
            models: BTreeMap::new(),
            tenant_shares: BTreeMap::new(),
            burst_seconds: 0.0,
            headroom: 0.02,
            max_concurrent_requests: 10,
            lease_secs: 30,
            max_wait_secs: 20,
            refund_unused_tokens: false,
            caps: LimitCaps::default(),
            learn_limits: true,
            learned_ttl_secs: 3_600,
            adaptive: Adaptive {
                enabled: true,
                decrease: 0.7,
                quiet_secs: 5.0,
                recovery_secs: 120.0,
            },
        }
    }
}

/// A model's family: its name without a trailing `-YYYY-MM-DD` date.
pub fn model_family(model: &str) -> &str {
    let bytes = model.as_bytes();
    if bytes.len() > 11 {
        let (head, tail) = model.split_at(model.len() - 11);
        let t = tail.as_bytes();
        let is_date = t[0] == b'-'
            && t[5] == b'-'
            && t[8] == b'-'
            && t.iter()
                .enumerate()
                .all(|(i, c)| matches!(i, 0 | 5 | 8) || c.is_ascii_digit());
        if is_date {
            return head;
        }
    }
    model
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub visibility_timeout_secs: u64,
    pub max_attempts: u32,
    pub max_deliveries: u32,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    pub claim_block_ms: u64,
    pub dead_letter_max: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    concurrency: usize,
    job_timeout_secs: u64,
    grace_secs: u64,
    liveness_ttl_ms: u64,
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub concurrency: usize,
    pub job_timeout_secs: u64,
    pub grace_secs: u64,
    /// A worker silent this long is gone: its jobs are reclaimed at once.
    pub liveness_ttl_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportsConfig {
    pub templates_dir: PathBuf,
    pub ttl_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    pub ttl_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: String,
    max_body_bytes: usize,
    submissions_per_minute: u32,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: String,
    pub max_body_bytes: usize,
    pub submissions_per_minute: u32,
    /// Bearer tokens. Empty: the API is open, everything belongs to "default", and every
    /// caller may use the operator routes.
    pub tokens: Vec<ApiToken>,
}

/// One bearer token of the API: whose reports it submits and sees, and what it may do.
#[derive(Debug, Clone)]
pub struct ApiToken {
    pub secret: Secret,
    pub tenant: String,
    pub role: Role,
}

/// What a token may do besides its tenant's own reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Its own tenant's reports only.
    Tenant,
    /// Also every tenant's reports and the operator routes (status, dead letters, webhooks).
    Admin,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: String,
    pub level: String,
}

/// Price of a model, in currency units per million tokens: live calls, and requests run
/// through the provider's Batch API (half the live price unless set).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    #[serde(default)]
    pub batch_input: Option<f64>,
    #[serde(default)]
    pub batch_output: Option<f64>,
}

impl Price {
    /// A live price; its batch price is half of it.
    pub fn new(input: f64, output: f64) -> Self {
        Self {
            input,
            output,
            batch_input: None,
            batch_output: None,
        }
    }

    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        (prompt_tokens as f64 * self.input + completion_tokens as f64 * self.output) / 1e6
    }

    /// The price of the same tokens through the Batch API.
    pub fn batch(&self) -> Self {
        Self::new(
            self.batch_input.unwrap_or(self.input / 2.0),
            self.batch_output.unwrap_or(self.output / 2.0),
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatchApi {
    collect_ms: u64,
    poll_ms: u64,
    live_margin_secs: u64,
    max_requests: usize,
    max_file_bytes: usize,
    enqueued_tokens: u64,
    learned_ttl_secs: u64,
}

/// The lane on the provider's Batch API: how lines are gathered into batches, polled, and
/// kept within the provider's enqueued-token limit.
#[derive(Debug, Clone)]
pub struct BatchApiConfig {
    /// How long the oldest waiting line waits for others before its batch is submitted.
    pub collect_ms: u64,
    /// How often a submitted batch is looked at.
    pub poll_ms: u64,
    /// A line whose report's deadline is nearer than this runs as a live call instead.
    pub live_margin_secs: u64,
    /// Most requests in one batch input file (the provider's limit: 50,000).
    pub max_requests: usize,
    /// Most bytes of one batch input file (the provider's limit: 200 MB).
    pub max_file_bytes: usize,
    /// Enqueued tokens (prompt + `max_tokens` of every unfinished batch's requests) allowed per
    /// (API key, model family) unless `models` names the family.
    pub enqueued_tokens: u64,
    pub models: BTreeMap<String, u64>,
    /// How long a lower limit learnt from a batch the provider refused for its enqueued
    /// tokens stays in force.
    pub learned_ttl_secs: u64,
}

impl BatchApiConfig {
    /// The enqueued-token limit configured for `model` (by exact name, then family).
    pub fn enqueued_tokens(&self, model: &str) -> u64 {
        self.models
            .get(model)
            .or_else(|| self.models.get(model_family(model)))
            .copied()
            .unwrap_or(self.enqueued_tokens)
    }
}

/// The validated, immutable configuration every process runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub redis: RedisConfig,
    pub provider: ProviderConfig,
    pub budget: BudgetConfig,
    pub queue: QueueConfig,
    pub worker: WorkerConfig,
    pub reports: ReportsConfig,
    pub cache: CacheConfig,
    pub api: ApiConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub webhooks: WebhooksConfig,
    pub batch_api: BatchApiConfig,
    pub prices: BTreeMap<String, Price>,
}

/// Where webhooks may go besides public addresses, and how they are retried.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Host names, IP addresses or CIDR ranges of internal receivers webhooks may reach.
    pub allow_hosts: Vec<String>,
    /// Tries per webhook, the first included, before it is dead (and can be redelivered).
    pub attempts: u32,
    /// Wait before the second try; it doubles each try (75–100% of it, at random) up to
    /// `max_delay_secs`. A receiver's `retry-after` wins (capped the same).
    pub base_delay_secs: u64,
    pub max_delay_secs: u64,
    /// Timeout of one POST.
    pub timeout_secs: u64,
}

impl Default for WebhooksConfig {
    /// 20 tries from 5 s apart up to 3 h apart: about a day from the first to the last.
    fn default() -> Self {
        Self {
            allow_hosts: Vec::new(),
            attempts: 20,
            base_delay_secs: 5,
            max_delay_secs: 3 * 3600,
            timeout_secs: 10,
        }
    }
}

/// The plain variables of the earlier Python tools, and the config key each one sets.
const PLAIN_VARS: &[(&str, &str)] = &[
    ("REDIS_URL", "redis.url"),
    ("OPENAI_BASE_URL", "provider.base_url"),
    ("REQUESTS_PER_MINUTE", "budget.requests_per_minute"),
    ("TOKENS_PER_MINUTE", "budget.tokens_per_minute"),
    ("MAX_CONCURRENT_REQUESTS", "budget.max_concurrent_requests"),
    ("FANOUT_LOG_FORMAT", "log.format"),
];

impl Config {
    /// Load from the embedded defaults, `file` if given, then `env` (the process environment in
    /// binaries, a plain map in tests).
    pub fn load(file: Option<&Path>, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut doc = parse_toml("config/default.toml (embedded)", DEFAULT_TOML)?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let overlay = parse_toml(&path.display().to_string(), &text)?;
            merge(&mut doc, overlay, "")?;
        }
        let mut overrides: Vec<(String, String)> = env
            .iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix("FANOUT_")?;
                let (section, key) = rest.split_once("__")?;
                Some((
                    format!(
                        "{}.{}",
                        section.to_ascii_lowercase(),
                        key.to_ascii_lowercase()
                    ),
                    v.clone(),
                ))
            })
            .collect();
        overrides.sort();
        for (name, path) in PLAIN_VARS {
            if let Some(v) = env.get(*name) {
                overrides.push((path.to_string(), v.clone()));
            }
        }
        for (path, value) in overrides {
            set_path(&mut doc, &path, &value)?;
        }
        let raw: RawConfig = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| {
                ConfigError::invalid("config", e.message().to_string())
            })?;
        Self::validate(raw, env)
    }

    /// Load from `file` (if any) and the process environment.
    pub fn from_env(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load(file, &std::env::vars().collect())
    }

    fn validate(raw: RawConfig, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let r = &raw.redis;
        crate::redis::Topology::parse(&r.url)
            .map_err(|message| ConfigError::invalid("redis.url", message))?;
        check_name("redis.namespace", &r.namespace)?;
        let w = &raw.webhooks;
        positive("webhooks.attempts", u64::from(w.attempts))?;
        positive("webhooks.base_delay_secs", w.base_delay_secs)?;
        positive("webhooks.timeout_secs", w.timeout_secs)?;
        if w.max_delay_secs < w.base_delay_secs {
            return Err(ConfigError::invalid(
                "webhooks.max_delay_secs",
                format!(
                    "{} is below webhooks.base_delay_secs ({})",
                    w.max_delay_secs, w.base_delay_secs
                ),
            ));
        }
        positive("redis.pool_size", r.pool_size as u64)?;
        positive("redis.command_timeout_ms", r.command_timeout_ms)?;

        let p = &raw.provider;
        if !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://")) {
            return Err(ConfigError::invalid(
                "provider.base_url",
                format!("`{}` is not an http(s) URL", p.base_url),
            ));
        }
        positive("provider.request_timeout_secs", p.request_timeout_secs)?;
        if p.default_model.trim().is_empty() {
            return Err(ConfigError::invalid(
                "provider.default_model",
                "must name a model",
            ));
        }
        let mut keys = Vec::new();
        for (i, k) in p.keys.iter().enumerate() {
            check_name(&format!("provider.keys[{i}].name"), &k.name)?;
            if keys.iter().any(|x: &ApiKey| x.name == k.name) {
                return Err(ConfigError::invalid(
                    format!("provider.keys[{i}].name"),
                    format!("`{}` is listed twice; key names must be unique", k.name),
                ));
            }
            if let Some(secret) = env.get(&k.env).filter(|s| !s.trim().is_empty()) {
                keys.push(ApiKey {
                    name: k.name.clone(),
                    secret: Secret::new(secret.trim()),
                });
            }
        }

        let b = &raw.budget;
        let plan = Plan::parse(&b.plan).ok_or_else(|| {
            ConfigError::invalid(
                "budget.plan",
                format!("`{}` is not a plan; allowed: {}", b.plan, Plan::NAMES),
            )
        })?;
        let (plan_rpm, plan_tpm) = plan.limits();
        let limits = ModelLimits {
            requests_per_minute: if b.requests_per_minute == 0 {
                plan_rpm
            } else {
                b.requests_per_minute
            },
            tokens_per_minute: if b.tokens_per_minute == 0 {
                plan_tpm
            } else {
                b.tokens_per_minute
            },
        };
        let in_range = |key: &str, v: f64, ok: bool, allowed: &str| {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(ConfigError::invalid(
                    key,
                    format!("`{v}` is out of range; allowed: {allowed}"),
                ))
            }
        };
        in_range(
            "budget.burst_seconds",
            b.burst_seconds,
            (0.0..=60.0).contains(&b.burst_seconds),
            "0 to 60",
        )?;
        in_range(
            "budget.headroom",
            b.headroom,
            (0.0..0.5).contains(&b.headroom),
            "0 or more, below 0.5",
        )?;
        in_range(
            "budget.adaptive_decrease",
            b.adaptive_decrease,
            b.adaptive_decrease > 0.0 && b.adaptive_decrease < 1.0,
            "above 0, below 1",
        )?;
        in_range(
            "budget.adaptive_quiet_secs",
            b.adaptive_quiet_secs,
            (0.0..=3_600.0).contains(&b.adaptive_quiet_secs),
            "0 to 3600",
        )?;
        in_range(
            "budget.adaptive_recovery_secs",
            b.adaptive_recovery_secs,
            b.adaptive_recovery_secs > 0.0 && b.adaptive_recovery_secs <= 86_400.0,
            "above 0, at most 86400",
        )?;
        positive("budget.learned_ttl_secs", b.learned_ttl_secs)?;
        positive(
            "budget.max_concurrent_requests",
            u64::from(b.max_concurrent_requests),
        )?;
        positive("budget.lease_secs", b.lease_secs)?;
        positive("budget.max_wait_secs", b.max_wait_secs)?;
        for (tenant, share) in &raw.budget_tenants {
            if !(share.is_finite() && *share > 0.0 && *share <= 1.0) {
                return Err(ConfigError::invalid(
                    format!("budget_tenants.{tenant}"),
                    format!(
                        "{share} is not a share of the budget: use a number above 0 and at most 1"
                    ),
                ));
            }
        }
        for (family, l) in &raw.budget_models {
            positive(
                &format!("budget_models.{family}.requests_per_minute"),
                l.requests_per_minute,
            )?;
            positive(
                &format!("budget_models.{family}.tokens_per_minute"),
                l.tokens_per_minute,
            )?;
        }

        let q = &raw.queue;
        positive("queue.visibility_timeout_secs", q.visibility_timeout_secs)?;
        positive("queue.max_attempts", u64::from(q.max_attempts))?;
        positive("queue.max_deliveries", u64::from(q.max_deliveries))?;
        positive("queue.retry_base_ms", q.retry_base_ms)?;
        if q.retry_max_ms < q.retry_base_ms {
            return Err(ConfigError::invalid(
                "queue.retry_max_ms",
                format!(
                    "`{}` is below queue.retry_base_ms ({}); allowed: at least the base",
                    q.retry_max_ms, q.retry_base_ms
                ),
            ));
        }
        positive("queue.claim_block_ms", q.claim_block_ms)?;

        let w = &raw.worker;
        positive("worker.job_timeout_secs", w.job_timeout_secs)?;
        if w.liveness_ttl_ms < 300 {
            return Err(ConfigError::invalid(
                "worker.liveness_ttl_ms",
                format!(
                    "`{}` is too short to survive a slow beat; allowed: 300 or more",
                    w.liveness_ttl_ms
                ),
            ));
        }
        let concurrency = if w.concurrency == 0 {
            b.max_concurrent_requests as usize
        } else {
            w.concurrency
        };

        positive("reports.ttl_secs", raw.reports.ttl_secs)?;
        positive("cache.ttl_secs", raw.cache.ttl_secs)?;
        positive("api.max_body_bytes", raw.api.max_body_bytes as u64)?;
        if raw.api.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "api.listen",
                format!("`{}` is not an address like 0.0.0.0:8080", raw.api.listen),
            ));
        }
        if !raw.metrics.listen.is_empty()
            && raw.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(ConfigError::invalid(
                "metrics.listen",
                format!(
                    "`{}` is not an address like 0.0.0.0:9090 (or \"\" for off)",
                    raw.metrics.listen
                ),
            ));
        }
        if !matches!(raw.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::invalid(
                "log.format",
                format!(
                    "`{}` is not a log format; allowed: text, json",
                    raw.log.format
                ),
            ));
        }
        let ba = &raw.batch_api;
        positive("batch_api.collect_ms", ba.collect_ms)?;
        positive("batch_api.poll_ms", ba.poll_ms)?;
        positive("batch_api.enqueued_tokens", ba.enqueued_tokens)?;
        positive("batch_api.learned_ttl_secs", ba.learned_ttl_secs)?;
        if !(1..=50_000).contains(&ba.max_requests) {
            return Err(ConfigError::invalid(
                "batch_api.max_requests",
                format!(
                    "`{}` is not allowed; allowed: 1 to 50000 (the provider's limit)",
                    ba.max_requests
                ),
            ));
        }
        if !(1024..=200 * 1024 * 1024).contains(&ba.max_file_bytes) {
            return Err(ConfigError::invalid(
                "batch_api.max_file_bytes",
                format!(
                    "`{}` is not allowed; allowed: 1024 to 209715200 (the provider's 200 MB)",
                    ba.max_file_bytes
                ),
            ));
        }
        for (model, tokens) in &raw.batch_api_models {
            positive(&format!("batch_api_models.{model}"), *tokens)?;
        }
        for (model, price) in &raw.prices {
            let batch_ok = price.batch_input.is_none_or(|p| p >= 0.0)
                && price.batch_output.is_none_or(|p| p >= 0.0);
            if !(price.input >= 0.0 && price.output >= 0.0 && batch_ok) {
                return Err(ConfigError::invalid(
                    format!("prices.{model}"),
                    "prices must be zero or more",
                ));
            }
        }
        let tokens = parse_api_tokens(env.get("FANOUT_API_TOKENS").map(String::as_str))?;

        Ok(Self {
            redis: raw.redis,
            provider: ProviderConfig {
                base_url: p.base_url.trim_end_matches('/').to_owned(),
                default_model: p.default_model.clone(),
                request_timeout_secs: p.request_timeout_secs,
                keys,
            },
            budget: BudgetConfig {
                plan,
                limits,
                models: raw.budget_models,
                tenant_shares: raw.budget_tenants,
                burst_seconds: b.burst_seconds,
                headroom: b.headroom,
                max_concurrent_requests: b.max_concurrent_requests,
                lease_secs: b.lease_secs,
                max_wait_secs: b.max_wait_secs,
                refund_unused_tokens: b.refund_unused_tokens,
                caps: LimitCaps {
                    requests_per_minute: (b.requests_per_minute > 0)
                        .then_some(b.requests_per_minute),
                    tokens_per_minute: (b.tokens_per_minute > 0).then_some(b.tokens_per_minute),
                },
                learn_limits: b.learn_limits,
                learned_ttl_secs: b.learned_ttl_secs,
                adaptive: Adaptive {
                    enabled: b.adaptive,
                    decrease: b.adaptive_decrease,
                    quiet_secs: b.adaptive_quiet_secs,
                    recovery_secs: b.adaptive_recovery_secs,
                },
            },
            queue: raw.queue,
            worker: WorkerConfig {
                concurrency,
                job_timeout_secs: w.job_timeout_secs,
                grace_secs: w.grace_secs,
                liveness_ttl_ms: w.liveness_ttl_ms,
            },
            reports: raw.reports,
            cache: raw.cache,
            api: ApiConfig {
                listen: raw.api.listen,
                max_body_bytes: raw.api.max_body_bytes,
                submissions_per_minute: raw.api.submissions_per_minute,
                tokens,
            },
            metrics: raw.metrics,
            log: raw.log,
            webhooks: raw.webhooks,
            batch_api: BatchApiConfig {
                collect_ms: raw.batch_api.collect_ms,
                poll_ms: raw.batch_api.poll_ms,
                live_margin_secs: raw.batch_api.live_margin_secs,
                max_requests: raw.batch_api.max_requests,
                max_file_bytes: raw.batch_api.max_file_bytes,
                enqueued_tokens: raw.batch_api.enqueued_tokens,
                models: raw.batch_api_models,
                learned_ttl_secs: raw.batch_api.learned_ttl_secs,
            },
            prices: raw.prices,
        })
    }

    /// The price of `model`, by exact name then by family.
    pub fn price(&self, model: &str) -> Option<Price> {
        self.prices
            .get(model)
            .or_else(|| self.prices.get(model_family(model)))
            .copied()
    }
}

/// `token=tenant[:admin],…` from `FANOUT_API_TOKENS`.
fn parse_api_tokens(value: Option<&str>) -> Result<Vec<ApiToken>, ConfigError> {
    let Some(value) = value.filter(|v| !v.trim().is_empty()) else {
        return Ok(Vec::new());
    };
    value
        .split(',')
        .map(|pair| {
            let (token, who) = pair.trim().split_once('=').ok_or_else(|| {
                ConfigError::invalid(
                    "FANOUT_API_TOKENS",
                    "each entry must be `token=tenant` or `token=tenant:admin`, separated by commas",
                )
            })?;
            let (tenant, role) = match who.split_once(':') {
                None => (who, Role::Tenant),
                Some((tenant, "admin")) => (tenant, Role::Admin),
                Some((tenant, other)) => {
                    return Err(ConfigError::invalid(
                        "FANOUT_API_TOKENS",
                        format!(
                            "the role `{other}` of tenant `{tenant}` is unknown; allowed: `admin`, or no role"
                        ),
                    ));
                }
            };
            if token.len() < 16 {
                return Err(ConfigError::invalid(
                    "FANOUT_API_TOKENS",
                    format!("the token for tenant `{tenant}` is shorter than 16 characters"),
                ));
            }
            check_name("FANOUT_API_TOKENS tenant", tenant)?;
            Ok(ApiToken {
                secret: Secret::new(token),
                tenant: tenant.to_owned(),
                role,
            })
        })
        .collect()
}

fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::invalid(
            key,
            "`0` is not allowed; allowed: a whole number above 0",
        ));
    }
    Ok(())
}

fn check_name(key: &str, value: &str) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            format!("`{value}` is not a name; allowed: 1-64 of a-z, A-Z, 0-9, '-', '_', '.'"),
        ))
    }
}

/// `redis://user:secret@host` → `redis://user:***@host`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = creds.split_once(':').map(|(u, _)| u).unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

fn parse_toml(origin: &str, text: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
        path: origin.to_owned(),
        message: e.to_string(),
    })
}

/// Deep-merge `overlay` into `base`; a key the defaults do not know is an error that names it.
fn merge(base: &mut toml::Table, overlay: toml::Table, prefix: &str) -> Result<(), ConfigError> {
    for (k, v) in overlay {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        // Free-form maps: their entries are not known in advance.
        let open = matches!(
            prefix,
            "prices" | "budget_models" | "budget_tenants" | "batch_api_models"
        ) || prefix.is_empty();
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o, &path)?,
            (Some(slot), v) => *slot = v,
            (None, v) if open => {
                base.insert(k, v);
            }
            (None, _) => {
                return Err(ConfigError::invalid(
                    path,
                    "unknown key; see config/default.toml for every key",
                ));
            }
        }
    }
    Ok(())
}

/// Set `section.key` from an environment string, typed like the default it replaces.
fn set_path(doc: &mut toml::Table, path: &str, raw: &str) -> Result<(), ConfigError> {
    let (section, key) = path
        .split_once('.')
        .ok_or_else(|| ConfigError::invalid(path, "expected SECTION.KEY"))?;
    let table = match doc.get_mut(section) {
        Some(toml::Value::Table(t)) => t,
        _ => {
            return Err(ConfigError::invalid(
                path,
                format!("unknown section `{section}`; see config/default.toml"),
            ));
        }
    };
    let Some(current) = table.get(key) else {
        return Err(ConfigError::invalid(
            path,
            "unknown key; see config/default.toml for every key",
        ));
    };
    let value = raw.trim();
    let typed = match current {
        toml::Value::String(_) => toml::Value::String(value.to_owned()),
        // A list: comma-separated (`a,b`); empty for none.
        toml::Value::Array(_) => toml::Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(|v| toml::Value::String(v.to_owned()))
                .collect(),
        ),
        toml::Value::Integer(_) => value
            .replace('_', "")
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(toml::Value::Integer)
            .ok_or_else(|| {
                ConfigError::invalid(
                    path,
                    format!("`{value}` is not allowed; allowed: a whole number, 0 or more"),
                )
            })?,
        toml::Value::Float(_) => value.parse::<f64>().map(toml::Value::Float).map_err(|_| {
            ConfigError::invalid(path, format!("`{value}` is not allowed; allowed: a number"))
        })?,
        toml::Value::Boolean(_) => match value.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => toml::Value::Boolean(true),
            "false" | "0" | "no" | "off" => toml::Value::Boolean(false),
            _ => {
                return Err(ConfigError::invalid(
                    path,
                    format!("`{value}` is not allowed; allowed: true or false"),
                ));
            }
        },
        _ => {
            return Err(ConfigError::invalid(
                path,
                "cannot be set from the environment; use a config file",
            ));
        }
    };
    table.insert(key.to_owned(), typed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_validate() {
        let c = Config::load(None, &env(&[])).unwrap();
        assert_eq!(c.budget.plan, Plan::Tier1);
        assert_eq!(c.budget.limits.requests_per_minute, 3_500);
        assert_eq!(c.worker.concurrency, 10);
        assert!(c.provider.keys.is_empty());
        assert!(c.price("gpt-4o-mini-2024-07-18").is_some());
        // The plan is a starting value, not a cap; the code's defaults are the file's.
        assert_eq!(c.budget.caps, LimitCaps::default());
        let d = BudgetConfig::default();
        assert_eq!(
            (c.budget.burst_seconds, c.budget.headroom, c.budget.adaptive),
            (d.burst_seconds, d.headroom, d.adaptive)
        );
        assert_eq!(
            (
                c.budget.learn_limits,
                c.budget.learned_ttl_secs,
                c.budget.limits
            ),
            (d.learn_limits, d.learned_ttl_secs, d.limits)
        );
    }

    #[test]
    fn a_list_is_set_from_the_environment_comma_separated() {
        let c = Config::load(None, &env(&[])).unwrap();
        assert!(c.webhooks.allow_hosts.is_empty());
        let c = Config::load(
            None,
            &env(&[(
                "FANOUT_WEBHOOKS__ALLOW_HOSTS",
                "hooks.internal, 10.1.0.0/16,,127.0.0.1",
            )]),
        )
        .unwrap();
        assert_eq!(
            c.webhooks.allow_hosts,
            ["hooks.internal", "10.1.0.0/16", "127.0.0.1"]
        );
    }

    #[test]
    fn plain_variables_of_the_earlier_tools_apply() {
        let c = Config::load(
            None,
            &env(&[
                ("OPENAI_API_KEY", "sk-test-123"),
                ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/"),
                ("REQUESTS_PER_MINUTE", "50"),
                ("TOKENS_PER_MINUTE", "90000"),
                ("MAX_CONCURRENT_REQUESTS", "5"),
                ("REDIS_URL", "redis://127.0.0.1:7000/2"),
            ]),
        )
        .unwrap();
        assert_eq!(c.provider.keys[0].name, "default");
        assert_eq!(c.provider.keys[0].secret.expose(), "sk-test-123");
        assert_eq!(c.provider.base_url, "http://127.0.0.1:9/v1");
        assert_eq!(c.budget.limits.requests_per_minute, 50);
        assert_eq!(c.budget.limits.tokens_per_minute, 90_000);
        // Set explicitly, they cap whatever the provider advertises.
        assert_eq!(
            c.budget.caps_for("gpt-4o-mini"),
            LimitCaps {
                requests_per_minute: Some(50),
                tokens_per_minute: Some(90_000)
            }
        );
        assert_eq!(c.budget.max_concurrent_requests, 5);
        assert_eq!(c.worker.concurrency, 5);
        assert_eq!(c.redis.url, "redis://127.0.0.1:7000/2");
        assert!(!format!("{c:?}").contains("sk-test-123"));
    }

    #[test]
    fn section_overrides_and_plans() {
        let c = Config::load(
            None,
            &env(&[
                ("FANOUT_QUEUE__MAX_ATTEMPTS", "8"),
                ("FANOUT_BUDGET__PLAN", "free"),
            ]),
        )
        .unwrap();
        assert_eq!(c.queue.max_attempts, 8);
        assert_eq!(c.budget.limits.requests_per_minute, 3);
    }

    #[test]
    fn bad_values_name_the_key_the_value_and_what_is_allowed() {
        let cases = [
            ("FANOUT_BUDGET__PLAN", "gold", "budget.plan", "tier1"),
            (
                "REQUESTS_PER_MINUTE",
                "lots",
                "budget.requests_per_minute",
                "whole number",
            ),
            (
                "FANOUT_QUEUE__MAX_ATTEMPTS",
                "0",
                "queue.max_attempts",
                "above 0",
            ),
            ("REDIS_URL", "localhost:6379", "redis.url", "redis://"),
            ("FANOUT_LOG__FORMAT", "xml", "log.format", "json"),
            ("FANOUT_QUEUE__NOPE", "1", "queue.nope", "unknown key"),
            (
                "FANOUT_BUDGET__REFUND_UNUSED_TOKENS",
                "maybe",
                "budget.refund_unused_tokens",
                "true or false",
            ),
        ];
        for (var, value, key, allowed) in cases {
            let err = Config::load(None, &env(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{var}={value}: {err}");
            assert!(err.contains(allowed), "{var}={value}: {err}");
        }
    }

    #[test]
    fn tenant_shares_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.toml");
        std::fs::write(&path, "[budget_tenants]\nacme = 0.25\n").unwrap();
        let c = Config::load(Some(&path), &env(&[])).unwrap();
        assert_eq!(c.budget.tenant_shares.get("acme"), Some(&0.25));
        for bad in ["0", "1.5", "-0.1"] {
            std::fs::write(&path, format!("[budget_tenants]\nacme = {bad}\n")).unwrap();
            let err = Config::load(Some(&path), &env(&[]))
                .unwrap_err()
                .to_string();
            assert!(err.contains("budget_tenants.acme"), "{err}");
            assert!(err.contains("at most 1"), "{err}");
        }
    }

    #[test]
    fn file_overlay_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[queue]\nmax_attemps = 3\n").unwrap();
        let err = Config::load(Some(&path), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("queue.max_attemps"), "{err}");
        std::fs::write(&path, "[budget]\nplan = \"tier2\"\n[budget_models.\"gpt-4o\"]\nrequests_per_minute = 500\ntokens_per_minute = 30000\n").unwrap();
        let c = Config::load(Some(&path), &env(&[])).unwrap();
        assert_eq!(
            c.budget.limits_for("gpt-4o-2024-08-06").requests_per_minute,
            500
        );
        assert_eq!(
            c.budget.limits_for("gpt-4o-mini").requests_per_minute,
            5_000
        );
    }

    #[test]
    fn api_tokens_and_redaction() {
        let c = Config::load(
            None,
            &env(&[(
                "FANOUT_API_TOKENS",
                "aaaaaaaaaaaaaaaa=acme, bbbbbbbbbbbbbbbb=globex:admin",
            )]),
        )
        .unwrap();
        assert_eq!(c.api.tokens.len(), 2);
        assert_eq!(
            (c.api.tokens[0].tenant.as_str(), c.api.tokens[0].role),
            ("acme", Role::Tenant)
        );
        assert_eq!(
            (c.api.tokens[1].tenant.as_str(), c.api.tokens[1].role),
            ("globex", Role::Admin)
        );
        assert!(Config::load(None, &env(&[("FANOUT_API_TOKENS", "short=acme")])).is_err());
        let e = Config::load(
            None,
            &env(&[("FANOUT_API_TOKENS", "aaaaaaaaaaaaaaaa=acme:root")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("role `root`"), "{e}");
        assert_eq!(
            redact_url("redis://:pw@host:6379"),
            "redis://:***@host:6379"
        );
        assert_eq!(model_family("gpt-4o-2024-08-06"), "gpt-4o");
        assert_eq!(model_family("gpt-4o-mini"), "gpt-4o-mini");
    }
}
