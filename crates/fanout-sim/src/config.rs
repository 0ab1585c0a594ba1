//! What the simulator models: latencies per model, limits per key, fault rates.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

use crate::limits::Policy;
use crate::{Error, Result};

/// Everything the simulated provider does, loaded from TOML or built in code.
///
/// Every field has a default, so an empty TOML file is a valid config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Latency profiles of the models that `GET /v1/models` lists.
    pub models: Vec<ModelSpec>,
    /// Latency profile of any model not listed in `models` (such requests are served, not refused).
    pub default_model: LatencySpec,
    /// Multiplies every simulated latency: `0.001` makes a 30 s call take 30 ms.
    /// Rate limits are not scaled: they always run on real time.
    pub time_scale: f64,
    /// Requests per minute allowed for each API key; `0` means unlimited.
    pub rpm: u64,
    /// Tokens per minute allowed for each API key; `0` means unlimited.
    pub tpm: u64,
    /// Limits for particular API keys, keyed by the bearer token itself; they override `rpm`/`tpm`
    /// and `model_limits`.
    pub keys: BTreeMap<String, KeyLimits>,
    /// Limits of particular models, keyed by model id; they override `rpm`/`tpm`. Each key is
    /// limited for such a model apart from its other models; models without limits of their
    /// own share the key's limits.
    pub model_limits: BTreeMap<String, KeyLimits>,
    /// How each per-minute limit is enforced: a token bucket, a sliding or a fixed window.
    pub limit_shape: LimitShape,
    /// The window of `limit_shape`, in seconds: a limit of `L` per minute allows
    /// `L × window_secs / 60` per window (at least 1). Finite and above 0.
    pub window_secs: f64,
    /// Whether chat responses carry `x-ratelimit-*` headers; `false` simulates a provider that
    /// does not advertise its limits (a 429 still carries `retry-after`).
    pub rate_headers: bool,
    /// Share of each limited dimension of every key that another application on the same key
    /// uses, in `[0, 1)`; clients see it only in `remaining` and in 429s.
    pub neighbour_share: f64,
    /// Share of admitted requests answered with a 500, in `[0, 1]`.
    pub fail_rate: f64,
    /// Share of admitted requests that never get an answer, in `[0, 1]`.
    pub hang_rate: f64,
    /// Share of admitted requests whose 200 body is cut in the middle, in `[0, 1]`.
    pub truncate_rate: f64,
    /// Share of requests refused with 429 `insufficient_quota` (before admission), in `[0, 1]`.
    pub quota_rate: f64,
    /// Seed of the random draws (faults, latency jitter); the same seed gives the same run.
    pub seed: u64,
    /// Completion limit used when a request sets neither `max_completion_tokens` nor `max_tokens`.
    pub default_max_tokens: u32,
    /// Context window: a request whose prompt plus `max_tokens` exceeds it gets a 400
    /// `context_length_exceeded`.
    pub context_window: u64,
    /// Provider seconds a batch takes from creation to `completed`, multiplied by `time_scale`
    /// like every latency (default 600: ten minutes). Finite and >= 0.
    pub batch_turnaround_secs: f64,
    /// The completion window in provider seconds (default 86,400: OpenAI's `24h`), multiplied
    /// by `time_scale`; a batch whose turnaround is longer expires at its end. Finite and above 0.
    pub batch_window_secs: f64,
    /// Share of batch requests that fail with a 500 in the error file, in `[0, 1]`; drawn from
    /// `seed` and the batch's rank, so the same run fails the same requests.
    pub batch_line_error_rate: f64,
    /// Enqueued-token limit of every model, per API key: prompt + `max_tokens` of all requests
    /// of the batches that have not ended; a batch that would exceed it fails validation with
    /// `token_limit_exceeded`. `0` means unlimited.
    pub batch_queue_tokens: u64,
    /// Enqueued-token limits of particular models, keyed by model id; they override
    /// `batch_queue_tokens` (`0` = unlimited).
    pub model_batch_queue_tokens: BTreeMap<String, u64>,
}

/// A model the simulator knows by name, with its latency profile.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Model id as clients send it (`gpt-4o-mini`).
    pub name: String,
    /// Median time to first token, in milliseconds.
    pub ttft_ms: f64,
    /// Time to generate each output token, in milliseconds.
    pub ms_per_output_token: f64,
    /// Sigma of the log-normal distribution of the time to first token (`0` = always the median).
    #[serde(default = "default_spread")]
    pub spread: f64,
}

/// The latency profile of a model: see [`ModelSpec`] for the meaning of each field.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencySpec {
    /// Median time to first token, in milliseconds.
    pub ttft_ms: f64,
    /// Time to generate each output token, in milliseconds.
    pub ms_per_output_token: f64,
    /// Sigma of the log-normal distribution of the time to first token.
    #[serde(default = "default_spread")]
    pub spread: f64,
}

/// Limit overrides of a key or a model; an absent field falls back to the next rule (a key's
/// to the model's, a model's to the global `rpm`/`tpm`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    /// Requests per minute; `0` means unlimited.
    pub rpm: Option<u64>,
    /// Tokens per minute; `0` means unlimited.
    pub tpm: Option<u64>,
}

/// How the simulated provider enforces a per-minute limit `L` over a window `W`
/// (`window_secs`), each limited dimension with a capacity `C = L × W / 60` per window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LimitShape {
    /// A bucket holding `C` that refills `L / 60` per second (OpenAI's quantized limits,
    /// Anthropic).
    #[default]
    TokenBucket,
    /// A log: what was admitted in the last `W` plus the new cost must fit in `C`.
    SlidingWindow,
    /// Windows of `W` from the start, each allowing `C` (Azure's minute, OpenRouter's 10 s).
    FixedWindow,
}

impl LimitShape {
    /// Its name in TOML and on the command line (`token-bucket`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TokenBucket => "token-bucket",
            Self::SlidingWindow => "sliding-window",
            Self::FixedWindow => "fixed-window",
        }
    }
}

impl std::fmt::Display for LimitShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The shortest and longest `window_secs`: windows are kept in whole nanoseconds, and headers
/// in milliseconds.
const WINDOW_SECS: std::ops::RangeInclusive<f64> = 0.001..=86_400.0;

fn default_spread() -> f64 {
    0.3
}

impl ModelSpec {
    fn new(name: &str, ttft_ms: f64, ms_per_output_token: f64) -> Self {
        Self {
            name: name.to_owned(),
            ttft_ms,
            ms_per_output_token,
            spread: default_spread(),
        }
    }

    /// This model's latency profile.
    pub fn latency(&self) -> LatencySpec {
        LatencySpec {
            ttft_ms: self.ttft_ms,
            ms_per_output_token: self.ms_per_output_token,
            spread: self.spread,
        }
    }
}

impl Default for LatencySpec {
    fn default() -> Self {
        Self {
            ttft_ms: 500.0,
            ms_per_output_token: 30.0,
            spread: default_spread(),
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            models: vec![
                ModelSpec::new("gpt-4o-mini", 400.0, 25.0),
                ModelSpec::new("gpt-4o", 600.0, 35.0),
            ],
            default_model: LatencySpec::default(),
            time_scale: 1.0,
            rpm: 0,
            tpm: 0,
            keys: BTreeMap::new(),
            model_limits: BTreeMap::new(),
            limit_shape: LimitShape::TokenBucket,
            window_secs: 1.0,
            rate_headers: true,
            neighbour_share: 0.0,
            fail_rate: 0.0,
            hang_rate: 0.0,
            truncate_rate: 0.0,
            quota_rate: 0.0,
            seed: 0,
            default_max_tokens: 256,
            context_window: 128_000,
            batch_turnaround_secs: 600.0,
            batch_window_secs: 86_400.0,
            batch_line_error_rate: 0.0,
            batch_queue_tokens: 0,
            model_batch_queue_tokens: BTreeMap::new(),
        }
    }
}

impl SimConfig {
    /// No latency, no limits, no faults: the default models answering at once, for fast tests.
    pub fn instant() -> Self {
        Self {
            time_scale: 0.0,
            ..Self::default()
        }
    }

    /// Parses a TOML config (unknown fields are an error) and validates it.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let config: Self = toml::from_str(text).map_err(|e| Error::ParseConfig(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a TOML config file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text)
    }

    /// Checks that rates, scales and latencies make sense.
    pub fn validate(&self) -> Result<()> {
        let rates = [
            ("fail_rate", self.fail_rate),
            ("hang_rate", self.hang_rate),
            ("truncate_rate", self.truncate_rate),
            ("quota_rate", self.quota_rate),
        ];
        for (field, rate) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return Err(invalid(field, format!("must be in [0, 1], got {rate}")));
            }
        }
        let sum: f64 = rates.iter().map(|(_, rate)| rate).sum();
        if sum > 1.0 + 1e-9 {
            return Err(invalid(
                "fail_rate",
                format!("the four fault rates add up to {sum}, more than 1"),
            ));
        }
        if !self.time_scale.is_finite() || self.time_scale < 0.0 {
            return Err(invalid(
                "time_scale",
                format!("must be a finite number >= 0, got {}", self.time_scale),
            ));
        }
        if !self.window_secs.is_finite() || !WINDOW_SECS.contains(&self.window_secs) {
            return Err(invalid(
                "window_secs",
                format!(
                    "must be a finite number of seconds above 0 (from {} to {}), got {}",
                    WINDOW_SECS.start(),
                    WINDOW_SECS.end(),
                    self.window_secs
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.neighbour_share) {
            return Err(invalid(
                "neighbour_share",
                format!("must be in [0, 1), got {}", self.neighbour_share),
            ));
        }
        if self.default_max_tokens == 0 {
            return Err(invalid(
                "default_max_tokens",
                "must be at least 1".to_owned(),
            ));
        }
        if self.context_window == 0 {
            return Err(invalid("context_window", "must be at least 1".to_owned()));
        }
        if !self.batch_turnaround_secs.is_finite() || self.batch_turnaround_secs < 0.0 {
            return Err(invalid(
                "batch_turnaround_secs",
                format!(
                    "must be a finite number of seconds >= 0, got {}",
                    self.batch_turnaround_secs
                ),
            ));
        }
        if !self.batch_window_secs.is_finite() || self.batch_window_secs <= 0.0 {
            return Err(invalid(
                "batch_window_secs",
                format!(
                    "must be a finite number of seconds above 0, got {}",
                    self.batch_window_secs
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.batch_line_error_rate) {
            return Err(invalid(
                "batch_line_error_rate",
                format!("must be in [0, 1], got {}", self.batch_line_error_rate),
            ));
        }
        validate_latency("default_model", &self.default_model)?;
        let mut names = std::collections::BTreeSet::new();
        for model in &self.models {
            if model.name.is_empty() {
                return Err(invalid("models", "a model has an empty name".to_owned()));
            }
            if !names.insert(model.name.as_str()) {
                return Err(invalid(
                    "models",
                    format!("model {:?} is listed twice", model.name),
                ));
            }
            validate_latency("models", &model.latency())?;
        }
        Ok(())
    }

    /// The latency profile for `model`, falling back to `default_model`.
    pub(crate) fn latency_for(&self, model: &str) -> LatencySpec {
        self.models
            .iter()
            .find(|spec| spec.name == model)
            .map_or(self.default_model, ModelSpec::latency)
    }

    /// The (rpm, tpm) limits of an API key, for the models without limits of their own.
    pub(crate) fn limits_for(&self, key: &str) -> (u64, u64) {
        let overrides = self.keys.get(key).copied().unwrap_or_default();
        (
            overrides.rpm.unwrap_or(self.rpm),
            overrides.tpm.unwrap_or(self.tpm),
        )
    }

    /// The (rpm, tpm) limits of an API key for `model`, if the model has limits of its own (and
    /// so is limited apart from the key's other models): the key's override, else the model's
    /// limit, else the global one.
    pub(crate) fn model_limits_for(&self, key: &str, model: &str) -> Option<(u64, u64)> {
        let model_limits = self.model_limits.get(model)?;
        let overrides = self.keys.get(key).copied().unwrap_or_default();
        Some((
            overrides.rpm.or(model_limits.rpm).unwrap_or(self.rpm),
            overrides.tpm.or(model_limits.tpm).unwrap_or(self.tpm),
        ))
    }

    /// The enqueued-token limit of `model`'s batch queue (`0` = unlimited).
    pub(crate) fn batch_queue_limit(&self, model: &str) -> u64 {
        self.model_batch_queue_tokens
            .get(model)
            .copied()
            .unwrap_or(self.batch_queue_tokens)
    }

    /// How the limiters enforce the limits.
    pub(crate) fn limit_policy(&self) -> Policy {
        Policy {
            shape: self.limit_shape,
            window: std::time::Duration::try_from_secs_f64(self.window_secs)
                .unwrap_or(std::time::Duration::from_secs(1)),
            headers: self.rate_headers,
            neighbour_share: self.neighbour_share,
        }
    }
}

fn validate_latency(field: &'static str, spec: &LatencySpec) -> Result<()> {
    let values = [spec.ttft_ms, spec.ms_per_output_token, spec.spread];
    if values.iter().any(|v| !v.is_finite() || *v < 0.0) {
        return Err(invalid(
            field,
            "ttft_ms, ms_per_output_token and spread must be finite numbers >= 0".to_owned(),
        ));
    }
    Ok(())
}

fn invalid(field: &'static str, reason: String) -> Error {
    Error::InvalidConfig { field, reason }
}

/// Flags of `fanout sim`. Flags override the values of `--config`, which override the defaults.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: SocketAddr,
    /// TOML file with a full simulator config (see the fanout-sim README).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Requests per minute allowed per API key (0 = unlimited).
    #[arg(long)]
    pub rpm: Option<u64>,
    /// Tokens per minute allowed per API key, charged as prompt + max_tokens (0 = unlimited).
    #[arg(long)]
    pub tpm: Option<u64>,
    /// How limits are enforced.
    #[arg(long, value_enum, value_name = "SHAPE")]
    pub limit_shape: Option<LimitShape>,
    /// Window of the limit shape in seconds (default 1): a limit allows limit × window / 60 per window.
    #[arg(long, value_name = "SECONDS")]
    pub window_secs: Option<f64>,
    /// Send no x-ratelimit-* headers, like a provider that does not advertise its limits.
    #[arg(long)]
    pub no_rate_headers: bool,
    /// Share of each limit used by another application on the same key, in [0, 1).
    #[arg(long, value_name = "SHARE")]
    pub neighbour_share: Option<f64>,
    /// Multiplier of every simulated latency (0.001 turns 30 s into 30 ms); limits stay in real time.
    #[arg(long)]
    pub time_scale: Option<f64>,
    /// Median time to first token in milliseconds, for every model.
    #[arg(long)]
    pub latency_ms: Option<f64>,
    /// Log-normal sigma of the time to first token, for every model (0 = always the median).
    #[arg(long)]
    pub latency_spread: Option<f64>,
    /// Share of admitted requests answered with a 500 (0 to 1).
    #[arg(long)]
    pub fail_rate: Option<f64>,
    /// Share of admitted requests that never get an answer (0 to 1).
    #[arg(long)]
    pub hang_rate: Option<f64>,
    /// Share of admitted requests whose 200 body is cut in the middle (0 to 1).
    #[arg(long)]
    pub truncate_rate: Option<f64>,
    /// Share of requests refused with 429 insufficient_quota (0 to 1).
    #[arg(long)]
    pub quota_rate: Option<f64>,
    /// Seed of the random draws (faults, latency jitter, batch request errors).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Provider seconds a batch takes to complete (default 600), scaled by --time-scale.
    #[arg(long, value_name = "SECONDS")]
    pub batch_turnaround_secs: Option<f64>,
    /// Completion window of a batch in provider seconds (default 86400, OpenAI's 24h); a longer
    /// turnaround expires.
    #[arg(long, value_name = "SECONDS")]
    pub batch_window_secs: Option<f64>,
    /// Share of batch requests that fail with a 500 in the error file (0 to 1).
    #[arg(long, value_name = "SHARE")]
    pub batch_line_error_rate: Option<f64>,
    /// Enqueued-token limit of every model's batch queue, per API key (0 = unlimited).
    #[arg(long, value_name = "TOKENS")]
    pub batch_queue_tokens: Option<u64>,
}

impl SimArgs {
    /// The config file (or the defaults) with the flags applied on top, validated.
    pub fn into_config(self) -> anyhow::Result<SimConfig> {
        let mut config = match &self.config {
            Some(path) => SimConfig::from_toml_file(path)
                .with_context(|| format!("loading sim config {}", path.display()))?,
            None => SimConfig::default(),
        };
        let set = |target: &mut f64, value: Option<f64>| {
            if let Some(value) = value {
                *target = value;
            }
        };
        set(&mut config.time_scale, self.time_scale);
        set(&mut config.fail_rate, self.fail_rate);
        set(&mut config.hang_rate, self.hang_rate);
        set(&mut config.truncate_rate, self.truncate_rate);
        set(&mut config.quota_rate, self.quota_rate);
        set(&mut config.window_secs, self.window_secs);
        set(&mut config.neighbour_share, self.neighbour_share);
        set(
            &mut config.batch_turnaround_secs,
            self.batch_turnaround_secs,
        );
        set(&mut config.batch_window_secs, self.batch_window_secs);
        set(
            &mut config.batch_line_error_rate,
            self.batch_line_error_rate,
        );
        config.batch_queue_tokens = self.batch_queue_tokens.unwrap_or(config.batch_queue_tokens);
        config.limit_shape = self.limit_shape.unwrap_or(config.limit_shape);
        if self.no_rate_headers {
            config.rate_headers = false;
        }
        config.rpm = self.rpm.unwrap_or(config.rpm);
        config.tpm = self.tpm.unwrap_or(config.tpm);
        config.seed = self.seed.unwrap_or(config.seed);
        let profiles = config
            .models
            .iter_mut()
            .map(|model| (&mut model.ttft_ms, &mut model.spread))
            .chain([(
                &mut config.default_model.ttft_ms,
                &mut config.default_model.spread,
            )]);
        for (ttft_ms, spread) in profiles {
            set(ttft_ms, self.latency_ms);
            set(spread, self.latency_spread);
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    #[test]
    fn empty_toml_is_the_default() {
        assert_eq!(SimConfig::from_toml_str("").unwrap(), SimConfig::default());
    }

    #[test]
    fn toml_overrides_and_unknown_fields() {
        let config = SimConfig::from_toml_str(
            r#"
            rpm = 60
            time_scale = 0.01
            [[models]]
            name = "m"
            ttft_ms = 10
            ms_per_output_token = 1
            [keys.sk-a]
            tpm = 1000
            "#,
        )
        .unwrap();
        assert_eq!(config.limits_for("sk-a"), (60, 1000));
        assert_eq!(config.limits_for("sk-b"), (60, 0));
        assert_eq!(config.latency_for("m").spread, 0.3);
        assert_eq!(config.latency_for("other"), LatencySpec::default());
        assert!(SimConfig::from_toml_str("rpn = 3").is_err());
        assert!(SimConfig::from_toml_str("fail_rate = 1.5").is_err());
        assert!(SimConfig::from_toml_str("fail_rate = 0.6\nhang_rate = 0.6").is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, b"rpm = 60\ntpm = 5000\n").unwrap();
        let cli = Cli::parse_from([
            "sim",
            "--config",
            file.path().to_str().unwrap(),
            "--rpm",
            "120",
            "--latency-ms",
            "50",
            "--fail-rate",
            "0.1",
        ]);
        assert_eq!(cli.sim.listen, "127.0.0.1:8089".parse().unwrap());
        let config = cli.sim.into_config().unwrap();
        assert_eq!((config.rpm, config.tpm), (120, 5000));
        assert_eq!(config.fail_rate, 0.1);
        assert!(config.models.iter().all(|m| m.ttft_ms == 50.0));
        assert_eq!(config.default_model.ttft_ms, 50.0);
        assert_eq!(config.limit_policy(), Policy::default());
    }

    #[test]
    fn the_readme_example_is_valid() {
        let readme = include_str!("../README.md");
        let start = readme.find("```toml\n").unwrap() + "```toml\n".len();
        let end = start + readme[start..].find("```").unwrap();
        let config = SimConfig::from_toml_str(&readme[start..end]).unwrap();
        assert_eq!(config.limit_shape, LimitShape::SlidingWindow);
        assert_eq!(
            config.model_limits_for("sk-sim-tier1", "gpt-4o"),
            Some((3_500, 30_000))
        );
        assert_eq!(config.batch_queue_limit("gpt-4o"), 90_000);
        assert_eq!(config.batch_queue_limit("gpt-4o-mini"), 2_000_000);
    }

    #[test]
    fn limit_shapes_and_their_switches() {
        let config = SimConfig::from_toml_str(
            r#"
            limit_shape = "sliding-window"
            window_secs = 10
            rate_headers = false
            neighbour_share = 0.25
            "#,
        )
        .unwrap();
        assert_eq!(
            config.limit_policy(),
            Policy {
                shape: LimitShape::SlidingWindow,
                window: std::time::Duration::from_secs(10),
                headers: false,
                neighbour_share: 0.25,
            }
        );
        let fixed = SimConfig::from_toml_str("limit_shape = \"fixed-window\"").unwrap();
        assert_eq!(fixed.limit_shape, LimitShape::FixedWindow);
        assert_eq!(LimitShape::FixedWindow.to_string(), "fixed-window");
        assert!(SimConfig::from_toml_str("limit_shape = \"leaky-bucket\"").is_err());

        let refusal = |text: &str| match SimConfig::from_toml_str(text) {
            Err(Error::InvalidConfig { field, reason }) => (field, reason),
            other => panic!("expected an invalid config, got {other:?}"),
        };
        for bad in ["0", "-1", "0.0001", "1e9"] {
            let (field, reason) = refusal(&format!("window_secs = {bad}"));
            assert_eq!(field, "window_secs");
            assert!(reason.contains("above 0"), "{reason}");
        }
        for bad in ["nan", "inf"] {
            assert_eq!(refusal(&format!("window_secs = {bad}")).0, "window_secs");
        }
        for bad in ["1.0", "-0.1", "nan"] {
            let (field, reason) = refusal(&format!("neighbour_share = {bad}"));
            assert_eq!(field, "neighbour_share");
            assert!(reason.contains("[0, 1)"), "{reason}");
        }
        let message = SimConfig::from_toml_str("window_secs = 0")
            .unwrap_err()
            .to_string();
        assert!(message.contains("window_secs"), "{message}");
    }

    #[test]
    fn model_limits_fall_between_key_and_global_limits() {
        let config = SimConfig::from_toml_str(
            r#"
            rpm = 60
            tpm = 10000
            [model_limits."gpt-4o"]
            rpm = 6
            [model_limits.o1]
            tpm = 500
            [keys.sk-a]
            rpm = 600
            "#,
        )
        .unwrap();
        assert_eq!(config.model_limits_for("sk-b", "gpt-4o"), Some((6, 10_000)));
        assert_eq!(config.model_limits_for("sk-b", "o1"), Some((60, 500)));
        // A key's override wins over the model's limit.
        assert_eq!(
            config.model_limits_for("sk-a", "gpt-4o"),
            Some((600, 10_000))
        );
        assert_eq!(config.model_limits_for("sk-a", "o1"), Some((600, 500)));
        // Other models share the key's limits.
        assert_eq!(config.model_limits_for("sk-a", "gpt-4o-mini"), None);
        assert_eq!(config.limits_for("sk-a"), (600, 10_000));
        assert!(SimConfig::from_toml_str("[model_limits.m]\nrpn = 1").is_err());
    }

    #[test]
    fn batch_settings_from_toml_and_flags() {
        let config = SimConfig::from_toml_str(
            r#"
            batch_turnaround_secs = 60
            batch_queue_tokens = 2000000
            [model_batch_queue_tokens]
            "gpt-4o" = 90000
            "#,
        )
        .unwrap();
        assert_eq!(config.batch_turnaround_secs, 60.0);
        assert_eq!(config.batch_window_secs, 86_400.0);
        assert_eq!(config.batch_queue_limit("gpt-4o"), 90_000);
        assert_eq!(config.batch_queue_limit("gpt-4o-mini"), 2_000_000);
        for bad in [
            "batch_turnaround_secs = -1",
            "batch_window_secs = 0",
            "batch_line_error_rate = 1.5",
        ] {
            assert!(SimConfig::from_toml_str(bad).is_err(), "{bad}");
        }

        let config = Cli::parse_from([
            "sim",
            "--batch-turnaround-secs",
            "30",
            "--batch-window-secs",
            "20",
            "--batch-line-error-rate",
            "0.1",
            "--batch-queue-tokens",
            "5000",
        ])
        .sim
        .into_config()
        .unwrap();
        assert_eq!(
            (
                config.batch_turnaround_secs,
                config.batch_window_secs,
                config.batch_line_error_rate,
                config.batch_queue_tokens,
            ),
            (30.0, 20.0, 0.1, 5_000)
        );
    }

    #[test]
    fn limit_flags_override_the_file() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(
            &mut file,
            b"limit_shape = \"sliding-window\"\nwindow_secs = 10\nneighbour_share = 0.5\n",
        )
        .unwrap();
        let path = file.path().to_str().unwrap();
        let config = Cli::parse_from([
            "sim",
            "--config",
            path,
            "--limit-shape",
            "fixed-window",
            "--window-secs",
            "60",
            "--no-rate-headers",
        ])
        .sim
        .into_config()
        .unwrap();
        assert_eq!(config.limit_shape, LimitShape::FixedWindow);
        assert_eq!(config.window_secs, 60.0);
        assert!(!config.rate_headers);
        assert_eq!(config.neighbour_share, 0.5);

        let config = Cli::parse_from(["sim", "--config", path, "--neighbour-share", "0.1"])
            .sim
            .into_config()
            .unwrap();
        assert_eq!(config.limit_shape, LimitShape::SlidingWindow);
        assert_eq!(config.neighbour_share, 0.1);
        assert!(config.rate_headers);
        let bad = Cli::parse_from(["sim", "--neighbour-share", "1"])
            .sim
            .into_config();
        assert!(format!("{:#}", bad.unwrap_err()).contains("neighbour_share"));
        assert!(Cli::try_parse_from(["sim", "--limit-shape", "leaky"]).is_err());
    }
}
