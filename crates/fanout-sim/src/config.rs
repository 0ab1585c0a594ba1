//! What the simulator models: latencies per model, limits per key, fault rates.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

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
    /// Limits for particular API keys, keyed by the bearer token itself; they override `rpm`/`tpm`.
    pub keys: BTreeMap<String, KeyLimits>,
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

/// Per-key limit overrides; an absent field falls back to the global `rpm`/`tpm`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    /// Requests per minute for this key; `0` means unlimited.
    pub rpm: Option<u64>,
    /// Tokens per minute for this key; `0` means unlimited.
    pub tpm: Option<u64>,
}

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
            fail_rate: 0.0,
            hang_rate: 0.0,
            truncate_rate: 0.0,
            quota_rate: 0.0,
            seed: 0,
            default_max_tokens: 256,
            context_window: 128_000,
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
        if self.default_max_tokens == 0 {
            return Err(invalid(
                "default_max_tokens",
                "must be at least 1".to_owned(),
            ));
        }
        if self.context_window == 0 {
            return Err(invalid("context_window", "must be at least 1".to_owned()));
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

    /// The (rpm, tpm) limits of an API key.
    pub(crate) fn limits_for(&self, key: &str) -> (u64, u64) {
        let overrides = self.keys.get(key).copied().unwrap_or_default();
        (
            overrides.rpm.unwrap_or(self.rpm),
            overrides.tpm.unwrap_or(self.tpm),
        )
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
    /// Seed of the random draws (faults, latency jitter).
    #[arg(long)]
    pub seed: Option<u64>,
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
    }
}
