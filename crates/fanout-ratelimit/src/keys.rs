//! Every Redis key the budget uses, built in one place.
//!
//! All of them share the hash tag `{<namespace>:budget}`: the admission script touches the
//! leases, the waiting room and every bucket of a family at once, so they must live in one
//! cluster slot.

/// Key names under one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(namespace: &str) -> Self {
        Self {
            prefix: format!("{{{namespace}:budget}}"),
        }
    }

    /// ZSET lease id → expiry (ms, Redis clock): the cluster-wide concurrency leases.
    pub(crate) fn leases(&self) -> String {
        format!("{}:leases", self.prefix)
    }

    /// The (key name, family) of a [`Keys::bucket`] or [`Keys::limits`] key.
    pub(crate) fn parse_pair(&self, key: &str) -> Option<(String, String)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix(':')?;
        let rest = rest
            .strip_prefix("bucket:")
            .or_else(|| rest.strip_prefix("limits:"))?;
        let (k, f) = rest.split_once(':')?;
        Some((k.to_owned(), f.to_owned()))
    }

    /// SCAN patterns of every bucket and limits key.
    pub(crate) fn pair_patterns(&self) -> [String; 2] {
        [
            format!("{}:bucket:*", self.prefix),
            format!("{}:limits:*", self.prefix),
        ]
    }

    /// HASH `rtat`, `ttat`, `paused` of one (API key name, model family) budget.
    pub(crate) fn bucket(&self, key: &str, family: &str) -> String {
        format!("{}:bucket:{key}:{family}", self.prefix)
    }

    /// HASH of what was learnt about one (API key name, model family) budget: advertised limits,
    /// adaptive ceilings, the probe (see `lua/limits.lua`).
    pub(crate) fn limits(&self, key: &str, family: &str) -> String {
        format!("{}:limits:{key}:{family}", self.prefix)
    }

    /// HASH `rtat`, `ttat` of one tenant's share of a model family's budget.
    pub(crate) fn tenant(&self, tenant: &str, family: &str) -> String {
        format!("{}:tenant:{tenant}:{family}", self.prefix)
    }

    /// ZSET waiter id → order score: the waiting room of one model family.
    pub(crate) fn room(&self, family: &str) -> String {
        format!("{}:room:{family}", self.prefix)
    }

    /// ZSET waiter id → expiry (ms): when a silent waiter loses its place.
    pub(crate) fn room_expiry(&self, family: &str) -> String {
        format!("{}:room-exp:{family}", self.prefix)
    }

    /// HASH waiter id → estimated tokens, so the script can play the waiters ahead.
    pub(crate) fn room_cost(&self, family: &str) -> String {
        format!("{}:room-cost:{family}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let k = Keys::new("fanout");
        for key in [
            k.leases(),
            k.bucket("default", "gpt-4o"),
            k.limits("default", "gpt-4o"),
            k.room("gpt-4o"),
            k.room_expiry("gpt-4o"),
            k.room_cost("gpt-4o"),
            k.tenant("acme", "gpt-4o"),
        ] {
            assert!(key.starts_with("{fanout:budget}:"), "{key}");
        }
        assert_eq!(k.bucket("a", "gpt-4o"), "{fanout:budget}:bucket:a:gpt-4o");
    }
}
