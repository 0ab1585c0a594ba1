//! What a call cost, from its real usage and the configured prices.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Mutex, PoisonError};

use fanout_core::config::{Config, Price, model_family};
use tracing::warn;

use crate::client::ChatResponse;

/// Cost of `prompt` + `completion` tokens at `price` (per million tokens); 0 without a price.
pub fn cost(price: Option<Price>, prompt_tokens: u64, completion_tokens: u64) -> f64 {
    price.map_or(0.0, |p| p.cost(prompt_tokens, completion_tokens))
}

/// The configured prices, looked up like [`Config::price`] (exact model name, then its family).
/// A model without a price costs 0 and is logged once per process.
#[derive(Debug, Default)]
pub struct CostTable {
    prices: BTreeMap<String, Price>,
    unpriced: Mutex<HashSet<String>>,
}

impl CostTable {
    pub fn new(prices: BTreeMap<String, Price>) -> Self {
        Self {
            prices,
            unpriced: Mutex::default(),
        }
    }

    pub fn from_config(config: &Config) -> Self {
        Self::new(config.prices.clone())
    }

    /// The price of `model`, by exact name then by family.
    pub fn price(&self, model: &str) -> Option<Price> {
        self.prices
            .get(model)
            .or_else(|| self.prices.get(model_family(model)))
            .copied()
    }

    /// Cost of a call to `model` with this usage.
    pub fn cost(&self, model: &str, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        let price = self.price(model);
        if price.is_none() {
            let first = self
                .unpriced
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(model.to_owned());
            if first {
                warn!(
                    model,
                    "no price configured for model, its calls count as free"
                );
            }
        }
        cost(price, prompt_tokens, completion_tokens)
    }

    /// Cost of a response (0 when it came from the cache: nothing was spent).
    pub fn cost_of(&self, response: &ChatResponse) -> f64 {
        if response.cached {
            return 0.0;
        }
        self.cost(
            &response.model,
            response.prompt_tokens,
            response.completion_tokens,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_matches_config_price() {
        let config = Config::load(None, &Default::default()).unwrap();
        let table = CostTable::from_config(&config);
        for m in [
            "gpt-4o-mini",
            "gpt-4o-mini-2024-07-18",
            "gpt-4o",
            "gpt-4.1",
            "unknown-model",
        ] {
            assert_eq!(table.price(m), config.price(m), "{m}");
        }
        // gpt-4o-mini: 0.15 in, 0.60 out per million.
        let c = table.cost("gpt-4o-mini-2024-07-18", 1_000_000, 500_000);
        assert!((c - 0.45).abs() < 1e-12, "{c}");
        assert_eq!(table.cost("unknown-model", 1_000, 1_000), 0.0);
        assert_eq!(cost(None, 10, 10), 0.0);
    }
}
