//! Every Redis key the aggregator touches, built in one place.
//!
//! A report's keys share the hash tag `{r:<report id>}`, so every report script touches one
//! cluster slot. The global keys (the notification stream, idempotency keys) share the tag
//! `{<namespace>}`.

/// Whether `id` can be a report id. Report ids are UUIDs; this is looser (any id the store
/// could hold), and keeps odd bytes out of Redis key names.
pub fn is_report_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Key names for one namespace.
#[derive(Debug, Clone)]
pub struct Keys {
    namespace: String,
}

impl Keys {
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The keys of one report.
    pub fn report(&self, report_id: &str) -> ReportKeys {
        ReportKeys {
            prefix: format!("{}:{{r:{report_id}}}", self.namespace),
        }
    }

    /// STREAM of report notifications (`report_id`, `kind`) that the aggregator processes
    /// read through the consumer group [`crate::GROUP`].
    pub fn notifications(&self) -> String {
        format!("{{{}}}:events", self.namespace)
    }

    /// ZSET report id → when its webhook is next due (ms since the epoch on the Redis clock; 0:
    /// at once). A delivery in progress holds its entry by pushing this time one lease ahead.
    pub fn webhooks_due(&self) -> String {
        format!("{{{}}}:webhooks:due", self.namespace)
    }

    /// HASH report id → callback URL of a webhook not yet delivered.
    pub fn webhooks_url(&self) -> String {
        format!("{{{}}}:webhooks:url", self.namespace)
    }

    /// HASH report id → delivery attempts started.
    pub fn webhooks_attempts(&self) -> String {
        format!("{{{}}}:webhooks:attempts", self.namespace)
    }

    /// STREAM of webhooks given up on: `report`, `url`, `attempts`, `reason`.
    pub fn webhooks_dead(&self) -> String {
        format!("{{{}}}:webhooks:dead", self.namespace)
    }

    /// SET of every tenant's report index ([`Keys::tenant_reports`]), for the aggregators'
    /// sweep of expired entries.
    pub fn report_indexes(&self) -> String {
        format!("{{{}}}:report-indexes", self.namespace)
    }

    /// ZSET report id → created (ms since the epoch): a tenant's reports, newest last. Entries
    /// of expired reports are removed when a listing meets them, and by the aggregators' sweep.
    pub fn tenant_reports(&self, tenant: &str) -> String {
        format!("{{{}}}:reports:{tenant}", self.namespace)
    }

    /// STRING tenant + idempotency key → report id, with the report TTL.
    pub fn idempotency(&self, tenant: &str, key: &str) -> String {
        format!("{{{}}}:idem:{tenant}:{key}", self.namespace)
    }
}

/// The keys of one report: `<namespace>:{r:<id>}:<name>`.
#[derive(Debug, Clone)]
pub struct ReportKeys {
    prefix: String,
}

impl ReportKeys {
    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    /// HASH: the report record (tenant, template, inputs, lane, status, times, counters).
    pub fn meta(&self) -> String {
        self.key("meta")
    }
    /// HASH job id → JobNode JSON.
    pub fn nodes(&self) -> String {
        self.key("nodes")
    }
    /// HASH job id → section state.
    pub fn state(&self) -> String {
        self.key("state")
    }
    /// HASH job id → dependencies not yet terminal.
    pub fn remaining(&self) -> String {
        self.key("remaining")
    }
    /// HASH job id → JSON array of its dependents.
    pub fn dependents(&self) -> String {
        self.key("dependents")
    }
    /// HASH job id → flags: `s` skip on dependency failure, `o` optional.
    pub fn flags(&self) -> String {
        self.key("flags")
    }
    /// HASH job id → SectionResult JSON.
    pub fn results(&self) -> String {
        self.key("results")
    }
    /// HASH `<job>|started`, `<job>|finished`, `<job>|attempts`, `<job>|error`.
    pub fn info(&self) -> String {
        self.key("info")
    }
    /// STREAM: the report's events.
    pub fn events(&self) -> String {
        self.key("events")
    }
    /// STRING: the assembled Markdown document.
    pub fn doc_markdown(&self) -> String {
        self.key("doc:md")
    }
    /// STRING: the assembled JSON document.
    pub fn doc_json(&self) -> String {
        self.key("doc:json")
    }
    /// STRING: `lock:<consumer>` while an aggregator assembles the final report, then `done`.
    pub fn assembled(&self) -> String {
        self.key("assembled")
    }

    /// The KEYS[1..9] every report script gets (see `lua/lib.lua`).
    pub fn script_keys(&self) -> [String; 9] {
        [
            self.meta(),
            self.nodes(),
            self.state(),
            self.remaining(),
            self.dependents(),
            self.flags(),
            self.results(),
            self.info(),
            self.events(),
        ]
    }

    /// Every key of the report, for tests and cleanup.
    pub fn all(&self) -> Vec<String> {
        let mut keys = self.script_keys().to_vec();
        keys.extend([self.doc_markdown(), self.doc_json(), self.assembled()]);
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_keys_share_one_hash_tag() {
        let keys = Keys::new("fanout");
        let r = keys.report("0190-abc");
        for k in r.all() {
            assert!(k.starts_with("fanout:{r:0190-abc}:"), "{k}");
        }
        assert_eq!(keys.notifications(), "{fanout}:events");
        assert_eq!(keys.idempotency("acme", "k1"), "{fanout}:idem:acme:k1");
    }
}
