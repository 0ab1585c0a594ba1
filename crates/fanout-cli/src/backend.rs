//! Where the user-facing commands go: straight to Redis (the default, for operators on the
//! cluster's network), or through the HTTP API with `--api URL --token T` (for anyone with a
//! token and no Redis access).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use fanout_core::Config;
use fanout_producer::client::{ClientError, FanoutClient};

/// `--api` and `--token`, shared by every command.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RemoteArgs {
    /// Talk to this Fanout API (e.g. https://fanout.example.com) instead of Redis: for
    /// submit, watch, report, reports, status, dead and webhooks (`fanout --api URL submit …`).
    #[arg(long, env = "FANOUT_API", value_name = "URL")]
    pub(crate) api: Option<String>,
    /// Bearer token for --api (a tenant's, or an admin's for status, dead and webhooks).
    #[arg(
        long,
        env = "FANOUT_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub(crate) token: Option<String>,
}

pub(crate) enum Backend {
    Local(Local),
    Remote(FanoutClient),
}

impl Backend {
    /// Remote when `--api` is given, otherwise local over the config's Redis.
    pub(crate) fn new(remote: &RemoteArgs, config: Option<PathBuf>) -> anyhow::Result<Self> {
        match &remote.api {
            Some(url) => {
                let parsed = url::Url::parse(url).map_err(|e| {
                    anyhow::anyhow!("--api `{url}` is not a URL ({e}); e.g. http://127.0.0.1:8080")
                })?;
                anyhow::ensure!(
                    matches!(parsed.scheme(), "http" | "https"),
                    "--api must be an http:// or https:// URL"
                );
                Ok(Self::Remote(FanoutClient::new(
                    url.clone(),
                    remote.token.clone(),
                )))
            }
            None => Ok(Self::Local(Local {
                config_path: config,
                config: OnceLock::new(),
                pool: OnceLock::new(),
            })),
        }
    }
}

/// The local side: config and pool are built on first use.
pub(crate) struct Local {
    config_path: Option<PathBuf>,
    config: OnceLock<Arc<Config>>,
    pool: OnceLock<fanout_core::redis::Pool>,
}

impl Local {
    pub(crate) fn config(&self) -> anyhow::Result<Arc<Config>> {
        if let Some(c) = self.config.get() {
            return Ok(c.clone());
        }
        let c = crate::load_config(self.config_path.as_deref())?;
        Ok(self.config.get_or_init(|| c).clone())
    }

    fn pool(&self) -> anyhow::Result<fanout_core::redis::Pool> {
        if let Some(p) = self.pool.get() {
            return Ok(p.clone());
        }
        let p = fanout_worker::redis_pool(&*self.config()?)?;
        Ok(self.pool.get_or_init(|| p).clone())
    }

    pub(crate) fn store(&self) -> anyhow::Result<fanout_aggregator::Store> {
        Ok(fanout_aggregator::Store::from_config(
            self.pool()?,
            &*self.config()?,
        ))
    }

    pub(crate) fn queue(&self) -> anyhow::Result<fanout_queue::Queue> {
        let config = self.config()?;
        Ok(fanout_queue::Queue::from_config(self.pool()?, &config))
    }

    pub(crate) fn producer(&self) -> anyhow::Result<fanout_producer::Producer> {
        let config = self.config()?;
        let templates = fanout_producer::Templates::load(&config.reports.templates_dir)?;
        let targets = fanout_producer::WebhookTargets::new(&config.webhooks.allow_hosts)
            .map_err(|e| anyhow::anyhow!("config key `webhooks.allow_hosts`: {e}"))?;
        Ok(
            fanout_producer::Producer::new(self.store()?, self.queue()?, templates)
                .with_webhook_targets(targets),
        )
    }

    pub(crate) fn ops(&self) -> anyhow::Result<fanout_producer::ops::Operations> {
        Ok(fanout_producer::ops::Operations::new(
            self.queue()?,
            self.store()?,
            &*self.config()?,
        )?)
    }
}

/// An API error as the CLI says it: what the server said, and what to do about a token.
pub(crate) fn remote_error(e: ClientError) -> anyhow::Error {
    match e.status() {
        Some(401) => anyhow::anyhow!(
            "the API refused the request: {e}; pass a token with --token or FANOUT_TOKEN"
        ),
        Some(403) => anyhow::anyhow!("the API refused the request: {e}; this needs an admin token"),
        _ => anyhow::anyhow!("{e}"),
    }
}

/// Who the audit log names for a local operator action.
pub(crate) fn local_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}
