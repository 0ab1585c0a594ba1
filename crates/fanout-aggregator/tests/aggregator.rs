//! The aggregator process against a real Redis: assembles each finished report once across
//! several processes, claims notifications of a dead one, survives a Redis restart.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use fanout_aggregator::{AggregatorOptions, Format, GROUP, Reopened, ReportView, Store, run};
use fanout_core::ReportStatus;
use redis::Commands;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

type Seen = Arc<Mutex<Vec<ReportView>>>;

fn start(
    store: &Store,
    name: &str,
    claim_idle: Duration,
    shutdown: &CancellationToken,
) -> (Seen, JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let sink = seen.clone();
    let options = AggregatorOptions {
        consumer: name.into(),
        block: Duration::from_millis(200),
        claim_idle,
        on_finished: Some(Arc::new(move |v: ReportView| sink.lock().unwrap().push(v))),
        ..AggregatorOptions::default()
    };
    let handle = tokio::spawn(run(store.clone(), options, shutdown.child_token()));
    let handle = tokio::spawn(async move {
        handle.await.unwrap().unwrap();
    });
    (seen, handle)
}

async fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn count(seen: &Seen, report: &str) -> usize {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|v| v.id == report)
        .count()
}

#[tokio::test]
async fn two_aggregators_assemble_each_report_once() {
    let env = env();
    let shutdown = CancellationToken::new();
    let (seen_a, task_a) = start(&env.store, "agg-a", Duration::from_secs(30), &shutdown);
    let (seen_b, task_b) = start(&env.store, "agg-b", Duration::from_secs(30), &shutdown);

    let mut reports = Vec::new();
    for i in 0..6 {
        let c = if i % 2 == 0 {
            env.store.create(diamond()).await.unwrap()
        } else {
            env.store.create(panel(&["Ann", "Bo"])).await.unwrap()
        };
        run_all(&env.store, &c.report_id, c.ready).await;
        reports.push(c.report_id);
    }
    // Duplicate notifications (a repeated finish, a replay) must not assemble again.
    let mut conn = env.redis.conn();
    for r in &reports {
        let _: String = conn
            .xadd(
                env.store.keys().notifications(),
                "*",
                &[("report_id", r.as_str()), ("kind", "report.finished")],
            )
            .unwrap();
    }

    let total = || seen_a.lock().unwrap().len() + seen_b.lock().unwrap().len();
    wait_for("every report assembled", Duration::from_secs(10), || {
        total() >= reports.len()
    })
    .await;
    // Let the duplicates be processed too.
    wait_for("notifications drained", Duration::from_secs(10), || {
        let len: usize = conn.xlen(env.store.keys().notifications()).unwrap();
        len == 0
    })
    .await;
    for r in &reports {
        assert_eq!(
            count(&seen_a, r) + count(&seen_b, r),
            1,
            "report {r} assembled once"
        );
        let stored: Option<String> = conn.get(env.store.keys().report(r).doc_markdown()).unwrap();
        let md = stored.expect("markdown stored");
        assert!(md.contains("✅ Completed"), "{md}");
        let json: Option<String> = conn.get(env.store.keys().report(r).doc_json()).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&json.unwrap()).unwrap()["status"],
            "completed"
        );
        let ttl: i64 = conn.ttl(env.store.keys().report(r).doc_markdown()).unwrap();
        assert!(ttl > 0 && ttl <= 3600);
        assert_eq!(
            env.store
                .document(r, Format::Markdown)
                .await
                .unwrap()
                .as_deref(),
            Some(md.as_str())
        );
    }
    let views: Vec<ReportView> = seen_a
        .lock()
        .unwrap()
        .iter()
        .chain(seen_b.lock().unwrap().iter())
        .cloned()
        .collect();
    assert!(views.iter().all(|v| v.status == ReportStatus::Completed));

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), async {
        task_a.await.unwrap();
        task_b.await.unwrap();
    })
    .await
    .expect("aggregators stop on shutdown");
}

#[tokio::test]
async fn a_dead_aggregators_notifications_are_claimed() {
    let env = env();
    let c = env
        .store
        .create(new_report(OPTIONAL, json!({})))
        .await
        .unwrap();
    let r = c.report_id.clone();
    env.store.fail(&r, "main", "down").await.unwrap();
    env.store.fail(&r, "extra", "down").await.unwrap();

    // A consumer reads the notification and dies without acknowledging it.
    let mut conn = env.redis.conn();
    let stream = env.store.keys().notifications();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query(&mut conn)
        .unwrap();
    let got: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("dead")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query(&mut conn)
        .unwrap();
    assert_eq!(got.keys[0].ids.len(), 1);

    let shutdown = CancellationToken::new();
    let claim_idle = Duration::from_millis(500);
    let (seen, task) = start(&env.store, "alive", claim_idle, &shutdown);
    wait_for(
        "the stale notification claimed",
        claim_idle * 2 + Duration::from_secs(5),
        || count(&seen, &r) == 1,
    )
    .await;
    assert_eq!(seen.lock().unwrap()[0].status, ReportStatus::Failed);
    let md = env
        .store
        .document(&r, Format::Markdown)
        .await
        .unwrap()
        .unwrap();
    assert!(md.contains("❌ Failed"), "{md}");
    assert!(md.contains("❌ failed: down"), "{md}");

    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn the_aggregator_survives_a_redis_restart() {
    if fanout_test_support::skip_on_cluster(
        "restarts the server (tests/failover.rs kills a master)",
    ) {
        return;
    }
    let mut env = env();
    let shutdown = CancellationToken::new();
    let (seen, task) = start(&env.store, "agg", Duration::from_secs(30), &shutdown);

    let c = env.store.create(diamond()).await.unwrap();
    run_all(&env.store, &c.report_id, c.ready).await;
    wait_for("first report", Duration::from_secs(10), || {
        count(&seen, &c.report_id) == 1
    })
    .await;

    // Everything is gone after the restart, the consumer group too.
    env.redis.restart();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !task.is_finished(),
        "the aggregator keeps running through the outage"
    );

    // Pool connections to the old server fail once, then reconnect.
    let c = loop {
        match env.store.create(diamond()).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    run_all(&env.store, &c.report_id, c.ready).await;
    wait_for("report after restart", Duration::from_secs(15), || {
        count(&seen, &c.report_id) == 1
    })
    .await;

    shutdown.cancel();
    task.await.unwrap();
}

async fn stored(env: &Env, report: &str) -> Option<String> {
    let mut conn = env.redis.conn();
    conn.get(env.store.keys().report(report).doc_markdown())
        .unwrap()
}

#[tokio::test]
async fn a_reopened_report_is_assembled_and_queued_for_its_webhook_again() {
    let env = env();
    let shutdown = CancellationToken::new();
    let (seen, task) = start(&env.store, "agg", Duration::from_secs(30), &shutdown);
    let k = env.store.keys().clone();
    let mut conn = env.redis.conn();

    let mut r = new_report(LINE, json!({}));
    r.callback_url = Some("https://example.com/hook".into());
    let r = env.store.create(r).await.unwrap().report_id;
    env.store.fail(&r, "a", "provider down").await.unwrap();
    wait_for(
        "the first finish assembled",
        Duration::from_secs(10),
        || count(&seen, &r) == 1,
    )
    .await;
    let md = stored(&env, &r).await.expect("markdown stored");
    assert!(md.contains("❌ failed: provider down"), "{md}");
    // The deliverer delivered it: the outbox entry is gone, the record says delivered.
    let _: () = conn.zrem(k.webhooks_due(), &r).unwrap();
    let _: () = conn.hdel(k.webhooks_url(), &r).unwrap();
    let _: () = conn
        .hset(k.report(&r).meta(), "webhook_state", "delivered")
        .unwrap();

    let reopened = env.store.reopen(&r, "a").await.unwrap();
    let Reopened::Reopened {
        node,
        report_was_finished: true,
    } = reopened
    else {
        panic!("a failed in a finished report: {reopened:?}");
    };
    assert_eq!(stored(&env, &r).await, None, "the old document is gone");
    run_all(&env.store, &r, vec![node]).await;
    wait_for(
        "the second finish assembled",
        Duration::from_secs(10),
        || count(&seen, &r) == 2,
    )
    .await;
    let md = stored(&env, &r).await.expect("markdown stored again");
    assert!(md.contains("✅ Completed"), "{md}");
    assert!(md.contains("text of a"), "{md}");
    assert!(!md.contains("provider down"), "{md}");
    let last = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.status, ReportStatus::Completed);
    // A fresh webhook is queued, due at once, shown pending on the report.
    let due: Option<f64> = conn.zscore(k.webhooks_due(), &r).unwrap();
    assert_eq!(due, Some(0.0));
    let view = env.store.view(&r).await.unwrap().unwrap();
    assert_eq!(
        view.webhook.map(|w| w.state),
        Some(fanout_aggregator::WebhookState::Pending)
    );

    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_reopened_while_it_is_assembled_is_assembled_at_its_next_finish() {
    let env = env();
    let shutdown = CancellationToken::new();
    let r = env
        .store
        .create(new_report(LINE, json!({})))
        .await
        .unwrap()
        .report_id;

    // The hook runs after the documents are stored and before the report counts as
    // assembled: the report is reopened right there, once.
    let seen: Seen = Arc::default();
    let sink = seen.clone();
    let store = env.store.clone();
    let id = r.clone();
    let options = AggregatorOptions {
        consumer: "agg".into(),
        block: Duration::from_millis(200),
        on_finished: Some(Arc::new(move |v: ReportView| {
            let first = {
                let mut seen = sink.lock().unwrap();
                seen.push(v);
                seen.len() == 1
            };
            if first {
                let reopened = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(store.reopen(&id, "a"))
                });
                assert!(matches!(reopened, Ok(Reopened::Reopened { .. })));
            }
        })),
        ..AggregatorOptions::default()
    };
    let task = tokio::spawn(run(env.store.clone(), options, shutdown.child_token()));

    env.store.fail(&r, "a", "provider down").await.unwrap();
    wait_for(
        "the first finish assembled",
        Duration::from_secs(10),
        || count(&seen, &r) == 1,
    )
    .await;
    let mut conn = env.redis.conn();
    let assembled: Option<String> = conn.get(env.store.keys().report(&r).assembled()).unwrap();
    assert_eq!(assembled, None, "not marked assembled: it was reopened");

    let a = env.store.view(&r).await.unwrap().unwrap();
    assert_eq!(a.status, ReportStatus::Running);
    let node = env.store.job_context(&r, "a").await.unwrap().node;
    run_all(&env.store, &r, vec![node]).await;
    wait_for(
        "the second finish assembled",
        Duration::from_secs(10),
        || count(&seen, &r) == 2,
    )
    .await;
    let md = stored(&env, &r).await.expect("markdown stored");
    assert!(md.contains("✅ Completed"), "{md}");

    shutdown.cancel();
    task.await.unwrap().unwrap();
}
