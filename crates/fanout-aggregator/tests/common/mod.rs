//! Shared test setup: a private redis-server, a store on it, and small templates.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use fanout_aggregator::{NewReport, SectionResult, Store};
use fanout_core::Template;
use fanout_test_support::RedisServer;
use serde_json::{Value, json};

pub struct Env {
    pub redis: RedisServer,
    pub store: Store,
    pub pool: fanout_core::redis::Pool,
}

pub fn pool(url: &str) -> fanout_core::redis::Pool {
    fanout_test_support::redis_pool(url)
}

pub fn env() -> Env {
    env_with_ttl(Duration::from_secs(3600))
}

pub fn env_with_ttl(ttl: Duration) -> Env {
    let redis = RedisServer::start();
    let pool = pool(&redis.url());
    let store = Store::new(pool.clone(), "t", ttl);
    Env { redis, store, pool }
}

/// a, b → c; c → d (skip), c → e (continue); f optional, no dependencies.
pub const DIAMOND: &str = r#"
name = "diamond"
title = "Diamond report"

[[inputs]]
name = "idea"
kind = "text"
required = true

[[sections]]
id = "a"
title = "Section A"
prompt = "a {{ inputs.idea }}"

[[sections]]
id = "b"
title = "Section B"
prompt = "b"

[[sections]]
id = "c"
title = "Section C"
prompt = "c {{ sections.a }} {{ sections.b }}"
depends_on = ["a", "b"]

[[sections]]
id = "d"
title = "Section D"
prompt = "d {{ sections.c }}"
depends_on = ["c"]

[[sections]]
id = "e"
title = "Section E"
prompt = "e {{ sections.c }}"
depends_on = ["c"]
on_dependency_failure = "continue"
"#;

/// A single optional section beside a required one.
pub const OPTIONAL: &str = r#"
name = "optional"
title = "Optional"

[[sections]]
id = "main"
title = "Main"
prompt = "main"

[[sections]]
id = "extra"
title = "Extra"
prompt = "extra"
optional = true
"#;

/// A chain: root → mid (skip) → leaf (skip), and side (continue) on root.
pub const CHAIN: &str = r#"
name = "chain"
title = "Chain"

[[sections]]
id = "root"
title = "Root"
prompt = "root"

[[sections]]
id = "mid"
title = "Mid"
prompt = "mid"
depends_on = ["root"]

[[sections]]
id = "leaf"
title = "Leaf"
prompt = "leaf"
depends_on = ["mid"]

[[sections]]
id = "side"
title = "Side"
prompt = "side"
depends_on = ["root"]
on_dependency_failure = "continue"
"#;

/// A line: a → b → c, each skipped when its dependency fails (the default).
pub const LINE: &str = r#"
name = "line"
title = "Line"

[[sections]]
id = "a"
title = "Section A"
prompt = "a"

[[sections]]
id = "b"
title = "Section B"
prompt = "b {{ sections.a }}"
depends_on = ["a"]

[[sections]]
id = "c"
title = "Section C"
prompt = "c {{ sections.b }}"
depends_on = ["b"]
"#;

pub const PANEL: &str = r#"
name = "panel"
title = "Persona panel"

[[inputs]]
name = "personas"
kind = "list"
required = true
[inputs.items]
kind = "object"
[[inputs.items.fields]]
name = "name"
kind = "string"
required = true

[[sections]]
id = "intro"
title = "Introduction"
prompt = "intro"

[[sections]]
id = "persona"
title = "Persona critique"
for_each = "personas"
prompt = "{{ item.name }}"

[[sections]]
id = "summary"
title = "Panel summary"
prompt = "{{ sections.persona }}"
depends_on = ["persona"]
on_dependency_failure = "continue"
"#;

pub fn new_report(toml: &str, inputs: Value) -> NewReport {
    let template = Template::from_toml("t.toml", toml).expect("template");
    let graph = template.job_graph(&inputs).expect("graph");
    NewReport {
        tenant: "acme".into(),
        template,
        inputs,
        graph,
        lane: "interactive".into(),
        idempotency_key: None,
        callback_url: None,
        batch_api: None,
    }
}

pub fn diamond() -> NewReport {
    new_report(DIAMOND, json!({"idea": "a tea shop"}))
}

pub fn panel(names: &[&str]) -> NewReport {
    let personas: Vec<Value> = names.iter().map(|n| json!({"name": n})).collect();
    new_report(PANEL, json!({"personas": personas}))
}

pub fn result(text: &str) -> SectionResult {
    SectionResult {
        text: text.into(),
        model: "gpt-4o-mini".into(),
        prompt_tokens: 100,
        completion_tokens: 50,
        cost: 0.000045,
        latency_ms: 1200,
        attempts: 1,
        cached: false,
        batch_api: false,
    }
}

pub fn ids(nodes: &[fanout_core::JobNode]) -> Vec<String> {
    let mut v: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    v.sort();
    v
}

/// Complete every job as it becomes ready, in order.
pub async fn run_all(store: &Store, report: &str, mut ready: Vec<fanout_core::JobNode>) {
    while let Some(node) = ready.pop() {
        let released = store
            .complete(report, &node.id, result(&format!("text of {}", node.id)))
            .await
            .unwrap();
        ready.extend(released.ready);
    }
}
