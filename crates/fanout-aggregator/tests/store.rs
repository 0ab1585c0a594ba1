//! The report store against a real Redis: creation, the dependency bookkeeping, idempotency,
//! failure propagation, final status, cancel, events and TTLs.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fanout_aggregator::{
    Error, Format, ListQuery, Reopened, StartOutcome, Started, render_markdown,
};
use fanout_core::{DepOutput, ReportStatus, SectionState};
use redis::Commands;
use serde_json::json;

#[tokio::test]
async fn create_returns_the_roots_and_records_the_report() {
    let env = env();
    let created = env.store.create(diamond()).await.unwrap();
    assert!(!created.duplicate);
    assert_eq!(ids(&created.ready), ["a", "b"]);
    let id = uuid::Uuid::parse_str(&created.report_id).unwrap();
    assert_eq!(id.get_version_num(), 7, "report ids are UUIDv7");

    let view = env.store.view(&created.report_id).await.unwrap().unwrap();
    assert_eq!(view.status, ReportStatus::Running);
    assert_eq!(view.tenant, "acme");
    assert_eq!(view.template, "diamond");
    assert_eq!(view.title, "Diamond report");
    let order: Vec<_> = view.sections.iter().map(|s| s.job_id.as_str()).collect();
    assert_eq!(order, ["a", "b", "c", "d", "e"]);
    let states: Vec<_> = view.sections.iter().map(|s| s.state).collect();
    use SectionState::*;
    assert_eq!(states, [Ready, Ready, Pending, Pending, Pending]);
    assert_eq!(view.totals.sections, 5);
    assert_eq!(view.totals.in_progress, 5);

    let events = env
        .store
        .events(&created.report_id, None, None, 100)
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, "report.created");

    assert!(env.store.view("no-such-report").await.unwrap().is_none());
}

#[tokio::test]
async fn invalid_reports_write_nothing() {
    let env = env();
    let mut r = diamond();
    r.graph.jobs[2].depends_on.push("ghost".into());
    assert!(matches!(
        env.store.create(r).await,
        Err(Error::InvalidReport(_))
    ));
    let mut r = diamond();
    r.lane = "fast".into();
    assert!(matches!(
        env.store.create(r).await,
        Err(Error::InvalidReport(_))
    ));
    let mut c = env.redis.conn();
    let keys: Vec<String> = c.keys("*").unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test]
async fn idempotency_key_returns_the_first_report() {
    let env = env();
    let mut r = diamond();
    r.idempotency_key = Some("req-1".into());
    let first = env.store.create(r.clone()).await.unwrap();
    let second = env.store.create(r.clone()).await.unwrap();
    assert!(second.duplicate);
    assert_eq!(second.report_id, first.report_id);
    // Nothing started yet: the duplicate hands back the ready roots to enqueue again.
    assert_eq!(ids(&second.ready), ["a", "b"]);

    env.store
        .complete(&first.report_id, "a", result("A"))
        .await
        .unwrap();
    let third = env.store.create(r.clone()).await.unwrap();
    assert_eq!(ids(&third.ready), ["b"]);

    // Another tenant with the same key gets its own report.
    r.tenant = "globex".into();
    let other = env.store.create(r).await.unwrap();
    assert!(!other.duplicate);
    assert_ne!(other.report_id, first.report_id);

    let mut c = env.redis.conn();
    let ttl: i64 = c
        .ttl(env.store.keys().idempotency("acme", "req-1"))
        .unwrap();
    assert!(
        ttl > 0 && ttl <= 3600,
        "idempotency key has the report TTL: {ttl}"
    );
}

#[tokio::test]
async fn a_keyed_retry_heals_a_creation_stopped_between_its_two_steps() {
    // Creation is two scripts in two hash slots: the idempotency key and the tenant's index,
    // then the report. A first try that stopped in between left the key and nothing else (its
    // index entry may be swept meanwhile); the retry with the same key creates that report,
    // under the id the key names, and lists it again.
    let env = env();
    let mut r = diamond();
    r.idempotency_key = Some("req-between".into());
    let first = env.store.create(r.clone()).await.unwrap();
    let mut c = env.redis.conn();
    let keys = env.store.keys();
    for key in keys.report(&first.report_id).script_keys() {
        let _: () = c.del(key).unwrap();
    }
    let _: () = c
        .zrem(keys.tenant_reports("acme"), &first.report_id)
        .unwrap();

    let retry = env.store.create(r.clone()).await.unwrap();
    assert_eq!(retry.report_id, first.report_id);
    assert_eq!(ids(&retry.ready), ["a", "b"]);
    assert_eq!(
        env.store.status(&first.report_id).await.unwrap(),
        Some(ReportStatus::Running)
    );
    let listed: Vec<String> = c.zrange(keys.tenant_reports("acme"), 0, -1).unwrap();
    assert_eq!(listed, std::slice::from_ref(&first.report_id));
    // And a report whose creation is under way is not dropped from a listing meanwhile.
    let page = env.store.list("acme", &ListQuery::default()).await.unwrap();
    assert_eq!(page.reports.len(), 1);
}

#[tokio::test]
async fn complete_releases_a_dependent_only_when_all_its_inputs_are_done() {
    let env = env();
    let r = env.store.create(diamond()).await.unwrap().report_id;
    let after_a = env.store.complete(&r, "a", result("A")).await.unwrap();
    assert!(after_a.ready.is_empty());
    assert!(!after_a.report_finished);
    let after_b = env.store.complete(&r, "b", result("B")).await.unwrap();
    assert_eq!(ids(&after_b.ready), ["c"]);
    assert_eq!(after_b.ready[0].depends_on, ["a", "b"]);

    let ctx = env.store.job_context(&r, "c").await.unwrap();
    assert_eq!(ctx.state, SectionState::Ready);
    assert_eq!(ctx.deps["a"], DepOutput::Text(Some("A".into())));
    assert_eq!(ctx.deps["b"], DepOutput::Text(Some("B".into())));
    assert_eq!(ctx.inputs, json!({"idea": "a tea shop"}));
    assert_eq!(ctx.template.name, "diamond");

    // What a worker gets in one call: the job marked running and the same context.
    let Started::Run(started) = env.store.start_with_context(&r, "c", 1).await.unwrap() else {
        panic!("c is ready: it runs");
    };
    assert_eq!(started.state, SectionState::Running);
    assert_eq!(
        (&started.deps, &started.inputs, &started.node, started.lane),
        (&ctx.deps, &ctx.inputs, &ctx.node, ctx.lane)
    );
    assert_eq!(started.template, ctx.template);
    assert_eq!(
        (started.tenant.as_str(), ctx.tenant.as_str()),
        ("acme", "acme")
    );
    let c = env.store.view(&r).await.unwrap().unwrap();
    assert_eq!(c.section("c").unwrap().state, SectionState::Running);

    let after_c = env.store.complete(&r, "c", result("C")).await.unwrap();
    assert_eq!(ids(&after_c.ready), ["d", "e"]);
    assert!(matches!(
        env.store.start_with_context(&r, "c", 2).await.unwrap(),
        Started::Not(StartOutcome::AlreadyDone)
    ));
    assert!(matches!(
        env.store.start_with_context(&r, "zzz", 1).await.unwrap(),
        Started::Not(StartOutcome::Missing)
    ));
    assert!(matches!(
        env.store.start_with_context("nope", "a", 1).await.unwrap(),
        Started::Not(StartOutcome::Missing)
    ));
}

#[tokio::test]
async fn complete_twice_is_idempotent() {
    let env = env();
    let r = env.store.create(diamond()).await.unwrap().report_id;
    env.store.complete(&r, "a", result("A")).await.unwrap();
    let first = env.store.complete(&r, "b", result("first")).await.unwrap();
    let events_before = env.store.events(&r, None, None, 1000).await.unwrap().len();

    // A worker that crashed before acking runs the call again, with another result.
    let repeat = env.store.complete(&r, "b", result("second")).await.unwrap();
    assert_eq!(repeat, first, "the repeat returns the same ready set");
    assert_eq!(ids(&repeat.ready), ["c"]);

    let view = env.store.view(&r).await.unwrap().unwrap();
    assert_eq!(view.section("b").unwrap().text.as_deref(), Some("first"));
    let events_after = env.store.events(&r, None, None, 1000).await.unwrap().len();
    assert_eq!(events_after, events_before, "a repeat appends no event");

    let mut c = env.redis.conn();
    let remaining: i64 = c
        .hget(env.store.keys().report(&r).remaining(), "c")
        .unwrap();
    assert_eq!(remaining, 0, "c's counter was decremented once per input");

    // Once c started, it is no longer handed out.
    assert_eq!(
        env.store.start(&r, "c", 1).await.unwrap(),
        StartOutcome::Run
    );
    let again = env.store.complete(&r, "b", result("third")).await.unwrap();
    assert!(again.ready.is_empty());

    // `released` gives a redelivered, already-done job the same answer as `complete`.
    assert_eq!(
        env.store.start(&r, "a", 2).await.unwrap(),
        StartOutcome::AlreadyDone
    );
    assert!(env.store.released(&r, "a").await.unwrap().ready.is_empty());
}

#[tokio::test]
async fn start_marks_running_keeps_the_first_start_and_counts_attempts() {
    let env = env();
    let r = env.store.create(diamond()).await.unwrap().report_id;
    assert_eq!(
        env.store.start(&r, "a", 1).await.unwrap(),
        StartOutcome::Run
    );
    let first = env.store.view(&r).await.unwrap().unwrap();
    let a = first.section("a").unwrap();
    assert_eq!(a.state, SectionState::Running);
    let started = a.started_at.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        env.store.start(&r, "a", 2).await.unwrap(),
        StartOutcome::Run
    );
    let view = env.store.view(&r).await.unwrap().unwrap();
    let a = view.section("a").unwrap();
    assert_eq!(a.started_at, Some(started));
    assert_eq!(a.attempts, 2);

    assert_eq!(
        env.store.start("nope", "a", 1).await.unwrap(),
        StartOutcome::Missing
    );
    assert_eq!(
        env.store.start(&r, "zzz", 1).await.unwrap(),
        StartOutcome::Missing
    );
    assert!(matches!(
        env.store.complete("nope", "a", result("x")).await,
        Err(Error::ReportNotFound { .. })
    ));
    assert!(matches!(
        env.store.complete(&r, "zzz", result("x")).await,
        Err(Error::UnknownJob { .. })
    ));
}

#[tokio::test]
async fn fail_skips_skip_dependents_transitively_and_releases_continue_ones() {
    let env = env();
    let r = env
        .store
        .create(new_report(CHAIN, json!({})))
        .await
        .unwrap()
        .report_id;
    let released = env
        .store
        .fail(&r, "root", "provider said 400")
        .await
        .unwrap();
    assert_eq!(ids(&released.ready), ["side"]);
    assert!(!released.report_finished);
    // Same answer on a repeat, and a late result does not overwrite the failure.
    assert_eq!(env.store.fail(&r, "root", "again").await.unwrap(), released);
    assert_eq!(
        env.store
            .complete(&r, "root", result("late"))
            .await
            .unwrap(),
        released
    );

    let view = env.store.view(&r).await.unwrap().unwrap();
    let root = view.section("root").unwrap();
    assert_eq!(root.state, SectionState::Failed);
    assert_eq!(root.reason.as_deref(), Some("provider said 400"));
    assert!(root.text.is_none());
    let mid = view.section("mid").unwrap();
    assert_eq!(mid.state, SectionState::Skipped);
    assert_eq!(mid.reason.as_deref(), Some("dependency `root` failed"));
    let leaf = view.section("leaf").unwrap();
    assert_eq!(leaf.state, SectionState::Skipped);
    assert_eq!(leaf.reason.as_deref(), Some("dependency `mid` was skipped"));
    assert_eq!(view.section("side").unwrap().state, SectionState::Ready);

    let ctx = env.store.job_context(&r, "side").await.unwrap();
    assert_eq!(ctx.deps["root"], DepOutput::Text(None));

    let kinds: Vec<_> = env
        .store
        .events(&r, None, None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.kind, e.job_id.unwrap_or_default()))
        .collect();
    assert!(kinds.contains(&("section.failed".into(), "root".into())));
    assert!(kinds.contains(&("section.skipped".into(), "mid".into())));
    assert!(kinds.contains(&("section.skipped".into(), "leaf".into())));

    let last = env.store.complete(&r, "side", result("S")).await.unwrap();
    assert!(last.report_finished);
    let view = env.store.view(&r).await.unwrap().unwrap();
    assert_eq!(view.status, ReportStatus::CompletedWithFailures);
}

#[tokio::test]
async fn for_each_summary_waits_for_every_item_and_keeps_input_order() {
    let env = env();
    let names = ["Zoe", "Adam", "Marta, tasca owner"];
    let created = env.store.create(panel(&names)).await.unwrap();
    let r = created.report_id;
    assert_eq!(
        ids(&created.ready),
        ["intro", "persona[0]", "persona[1]", "persona[2]"]
    );

    // Items finish out of order; the summary waits for all of them.
    assert!(
        env.store
            .complete(&r, "persona[2]", result("third"))
            .await
            .unwrap()
            .ready
            .is_empty()
    );
    assert!(
        env.store
            .complete(&r, "persona[0]", result("first"))
            .await
            .unwrap()
            .ready
            .is_empty()
    );
    let released = env.store.fail(&r, "persona[1]", "timeout").await.unwrap();
    assert_eq!(ids(&released.ready), ["summary"]);

    let ctx = env.store.job_context(&r, "summary").await.unwrap();
    assert_eq!(
        ctx.deps["persona"],
        DepOutput::List(vec![Some("first".into()), None, Some("third".into())])
    );

    env.store
        .complete(&r, "summary", result("consensus"))
        .await
        .unwrap();
    let done = env
        .store
        .complete(&r, "intro", result("hello"))
        .await
        .unwrap();
    assert!(done.report_finished);

    let view = env.store.view(&r).await.unwrap().unwrap();
    let order: Vec<_> = view.sections.iter().map(|s| s.job_id.as_str()).collect();
    assert_eq!(
        order,
        ["intro", "persona[0]", "persona[1]", "persona[2]", "summary"]
    );
    let items: Vec<_> = view
        .sections
        .iter()
        .filter_map(|s| s.item.as_deref())
        .collect();
    assert_eq!(items, names);

    let md = render_markdown(&view);
    let pos = |s: &str| {
        md.find(s)
            .unwrap_or_else(|| panic!("`{s}` missing in:\n{md}"))
    };
    assert!(pos("## Introduction") < pos("## Persona critique"));
    assert!(pos("### Zoe") < pos("### Adam"));
    assert!(pos("### Adam") < pos("### Marta, tasca owner"));
    assert!(pos("### Marta, tasca owner") < pos("## Panel summary"));
    assert!(pos("### Adam") < pos("❌ failed: timeout"));
    assert!(pos("❌ failed: timeout") < pos("### Marta"));
}

#[tokio::test]
async fn final_status_follows_the_rules() {
    let env = env();

    // Every section done: completed.
    let c = env.store.create(diamond()).await.unwrap();
    run_all(&env.store, &c.report_id, c.ready).await;
    assert_eq!(
        env.store.status(&c.report_id).await.unwrap(),
        Some(ReportStatus::Completed)
    );

    // Some failed or skipped, some done: completed_with_failures.
    let c = env.store.create(diamond()).await.unwrap();
    let r = c.report_id;
    env.store.complete(&r, "a", result("A")).await.unwrap();
    env.store.complete(&r, "b", result("B")).await.unwrap();
    let rel = env.store.fail(&r, "c", "bad").await.unwrap();
    assert_eq!(ids(&rel.ready), ["e"]);
    let rel = env.store.complete(&r, "e", result("E")).await.unwrap();
    assert!(rel.report_finished);
    let view = env.store.view(&r).await.unwrap().unwrap();
    assert_eq!(view.status, ReportStatus::CompletedWithFailures);
    assert_eq!(
        (view.totals.done, view.totals.failed, view.totals.skipped),
        (3, 1, 1)
    );
    assert!(view.finished_at.is_some());

    // Nothing done: failed.
    let c = env
        .store
        .create(new_report(CHAIN, json!({})))
        .await
        .unwrap();
    let r = c.report_id;
    env.store.fail(&r, "root", "down").await.unwrap();
    let rel = env.store.fail(&r, "side", "down").await.unwrap();
    assert!(rel.report_finished);
    assert_eq!(
        env.store.status(&r).await.unwrap(),
        Some(ReportStatus::Failed)
    );

    // Only an optional section failed: completed.
    let c = env
        .store
        .create(new_report(OPTIONAL, json!({})))
        .await
        .unwrap();
    let r = c.report_id;
    env.store.complete(&r, "main", result("M")).await.unwrap();
    env.store.fail(&r, "extra", "nope").await.unwrap();
    assert_eq!(
        env.store.status(&r).await.unwrap(),
        Some(ReportStatus::Completed)
    );

    let events = env.store.events(&r, None, None, 100).await.unwrap();
    let last = events.last().unwrap();
    assert_eq!(last.kind, "report.finished");
    assert_eq!(last.state.as_deref(), Some("completed"));
}

#[tokio::test]
async fn cancel_stops_the_report_and_names_the_queued_jobs() {
    let env = env();
    let r = env.store.create(diamond()).await.unwrap().report_id;
    assert_eq!(
        env.store.start(&r, "a", 1).await.unwrap(),
        StartOutcome::Run
    );

    let mut dropped = env.store.cancel(&r).await.unwrap();
    dropped.sort();
    assert_eq!(dropped, ["a", "b"], "ready and running jobs");
    let mut again = env.store.cancel(&r).await.unwrap();
    again.sort();
    assert_eq!(again, dropped, "a repeated cancel answers the same");

    let view = env.store.view(&r).await.unwrap().unwrap();
    assert_eq!(view.status, ReportStatus::Cancelled);
    assert!(
        view.sections
            .iter()
            .all(|s| s.state == SectionState::Cancelled)
    );
    assert_eq!(view.totals.cancelled, 5);

    assert_eq!(
        env.store.start(&r, "b", 1).await.unwrap(),
        StartOutcome::Cancelled
    );
    // The running call finishing later changes nothing.
    let late = env.store.complete(&r, "a", result("late")).await.unwrap();
    assert!(late.ready.is_empty());
    assert!(late.report_finished);
    let view = env.store.view(&r).await.unwrap().unwrap();
    assert!(view.section("a").unwrap().text.is_none());

    // The aggregators were notified by the cancel, and again by the repeated cancel and the
    // late completion: a call that finds the report finished notifies again, in case the one that finished it stopped
    // before its notification (another slot on a cluster). The assembly marker keeps the
    // report from being assembled twice.
    let mut c = env.redis.conn();
    let len: usize = c.xlen(env.store.keys().notifications()).unwrap();
    assert_eq!(len, 3);

    // A finished report cannot be cancelled; an unknown one is an error.
    let done = env.store.create(diamond()).await.unwrap();
    run_all(&env.store, &done.report_id, done.ready).await;
    assert!(env.store.cancel(&done.report_id).await.unwrap().is_empty());
    assert_eq!(
        env.store.status(&done.report_id).await.unwrap(),
        Some(ReportStatus::Completed)
    );
    assert!(env.store.cancel("nope").await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn events_are_ordered_and_replayable_after_an_id() {
    let env = env();
    let c = env.store.create(diamond()).await.unwrap();
    let r = c.report_id.clone();
    env.store.start(&r, "a", 1).await.unwrap();
    env.store.complete(&r, "a", result("A")).await.unwrap();
    env.store.fail(&r, "b", "boom").await.unwrap();

    let all = env.store.events(&r, None, None, 100).await.unwrap();
    let kinds: Vec<_> = all.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "report.created",
            "section.started",
            "section.completed",
            "section.failed",
            "section.skipped", // c (skip), then d (skip); e continues
            "section.skipped",
            "section.ready",
        ]
    );
    assert!(all.windows(2).all(|w| w[0].ts <= w[1].ts));
    let failed = &all[3];
    assert_eq!(failed.job_id.as_deref(), Some("b"));
    assert_eq!(failed.state.as_deref(), Some("failed"));
    assert_eq!(failed.message, "boom");

    // Replay after an id, in pages.
    let page = env
        .store
        .events(&r, Some(&all[1].id), None, 2)
        .await
        .unwrap();
    assert_eq!(page, all[2..4].to_vec());
    let rest = env
        .store
        .events(&r, Some(&page[1].id), None, 100)
        .await
        .unwrap();
    assert_eq!(rest, all[4..].to_vec());
    assert!(
        env.store
            .events(&r, Some(&all.last().unwrap().id), None, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // A blocking read wakes up on the next event.
    let last = all.last().unwrap().id.clone();
    let store = env.store.clone();
    let r2 = r.clone();
    let waiter = tokio::spawn(async move {
        let t = Instant::now();
        let got = store
            .events(&r2, Some(&last), Some(Duration::from_secs(10)), 10)
            .await
            .unwrap();
        (got, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    env.store.complete(&r, "e", result("E")).await.unwrap();
    let (got, waited) = waiter.await.unwrap();
    assert_eq!(got[0].kind, "section.completed");
    assert!(
        waited < Duration::from_secs(5),
        "woke on the event, not the timeout: {waited:?}"
    );

    // A blocking read with nothing new returns empty after the block.
    let tail = env.store.events(&r, None, None, 1000).await.unwrap();
    let quiet = env
        .store
        .events(
            &r,
            Some(&tail.last().unwrap().id),
            Some(Duration::from_millis(100)),
            10,
        )
        .await
        .unwrap();
    assert!(quiet.is_empty());
    assert!(
        env.store
            .events("nope", None, None, 10)
            .await
            .unwrap_err()
            .is_not_found()
    );
}

#[tokio::test]
async fn a_report_still_running_outlives_a_short_ttl_and_gets_it_when_it_finishes() {
    // A backlog longer than `reports.ttl_secs` must not delete the reports waiting in it.
    let env = env_with_ttl(Duration::from_secs(3));
    let c = env.store.create(diamond()).await.unwrap();
    let r = c.report_id.clone();
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(
        env.store.status(&r).await.unwrap(),
        Some(ReportStatus::Running)
    );
    let meta = env.store.keys().report(&r).meta();
    let mut conn = env.redis.conn();
    let ttl: i64 = conn.ttl(&meta).unwrap();
    assert!(ttl > 6 * 86400, "a running report is kept a week: {ttl}");
    run_all(&env.store, &r, c.ready).await;
    assert_eq!(
        env.store.status(&r).await.unwrap(),
        Some(ReportStatus::Completed)
    );
    let ttl: i64 = conn.ttl(&meta).unwrap();
    assert!((0..=3).contains(&ttl), "finished, it has the TTL: {ttl}");
}

#[tokio::test]
async fn the_sweep_forgets_expired_reports_in_any_order_and_keeps_the_live_ones() {
    let env = env_with_ttl(Duration::from_secs(3600));
    let older = env.store.create(diamond()).await.unwrap().report_id;
    let newer = env.store.create(diamond()).await.unwrap().report_id;
    let third = env.store.create(diamond()).await.unwrap().report_id;
    // The newest expired while an older one still runs (reports expire as they finish).
    let mut c = env.redis.conn();
    for id in [&newer, &third] {
        let _: () = c.del(env.store.keys().report(id).meta()).unwrap();
    }
    let indexes: Vec<String> = c.smembers(env.store.keys().report_indexes()).unwrap();
    assert_eq!(indexes.len(), 1);
    // Entries of the last minute stay: one may name a report whose creation is between its
    // two steps (index, then report).
    assert_eq!(env.store.forget_expired(1000).await.unwrap(), 0);
    // Two minutes later, the expired ones go.
    for id in [&older, &newer, &third] {
        let created: f64 = c.zscore(&indexes[0], id).unwrap();
        let _: () = c.zadd(&indexes[0], id, created - 120_000.0).unwrap();
    }
    assert_eq!(env.store.forget_expired(1000).await.unwrap(), 2);
    assert_eq!(env.store.forget_expired(1000).await.unwrap(), 0);
    let left: Vec<String> = c.zrange(&indexes[0], 0, -1).unwrap();
    assert_eq!(left, [older]);
}

#[tokio::test]
async fn every_report_key_gets_the_ttl_when_the_report_finishes() {
    let env = env_with_ttl(Duration::from_secs(120));
    let c = env.store.create(diamond()).await.unwrap();
    let r = c.report_id.clone();
    run_all(&env.store, &r, c.ready).await;
    assert_eq!(
        env.store.status(&r).await.unwrap(),
        Some(ReportStatus::Completed)
    );

    let keys = env.store.keys().report(&r);
    let mut c = env.redis.conn();
    for key in [
        keys.meta(),
        keys.nodes(),
        keys.state(),
        keys.remaining(),
        keys.dependents(),
        keys.flags(),
        keys.results(),
        keys.info(),
        keys.events(),
    ] {
        let ttl: i64 = c.ttl(&key).unwrap();
        assert!(ttl > 0 && ttl <= 120, "{key}: ttl {ttl}");
    }
    let stored: Vec<String> = c.keys(format!("t:{{r:{r}}}:*")).unwrap();
    for key in stored {
        let ttl: i64 = c.ttl(&key).unwrap();
        assert!(ttl > 0, "{key} has no TTL");
    }
    // No aggregator ran: the document is assembled on the fly.
    let md = env
        .store
        .document(&r, Format::Markdown)
        .await
        .unwrap()
        .unwrap();
    assert!(md.starts_with("# Diamond report"));
    let json = env.store.document(&r, Format::Json).await.unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["status"], "completed");
    // A stored document is served as stored; one stored in the earlier shape (ISO timestamps,
    // `id` for the section) is assembled again.
    let _: () = c.set(keys.doc_json(), &json).unwrap();
    let again = env.store.document(&r, Format::Json).await.unwrap().unwrap();
    assert_eq!(again, json);
    let mut legacy = v.clone();
    legacy["created_at"] = "2025-01-02T10:00:00.000Z".into();
    let _: () = c.set(keys.doc_json(), legacy.to_string()).unwrap();
    let current = env.store.document(&r, Format::Json).await.unwrap().unwrap();
    let current: serde_json::Value = serde_json::from_str(&current).unwrap();
    assert_eq!(current["created_at"], v["created_at"]);
    assert!(
        env.store
            .document("nope", Format::Json)
            .await
            .unwrap()
            .is_none()
    );
}

/// The kinds, job ids and states of the events after `after` (an index into all events).
async fn events_from(
    store: &fanout_aggregator::Store,
    report: &str,
    after: usize,
) -> Vec<(String, String, String)> {
    store.events(report, None, None, 1000).await.unwrap()[after..]
        .iter()
        .map(|e| {
            (
                e.kind.clone(),
                e.job_id.clone().unwrap_or_default(),
                e.state.clone().unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test]
async fn reopen_runs_a_failed_section_again_and_the_report_finishes_again() {
    let env = env();
    let mut r = new_report(LINE, json!({}));
    r.callback_url = Some("https://example.com/hook".into());
    let r = env.store.create(r).await.unwrap().report_id;
    let keys = env.store.keys().report(&r);
    let k = env.store.keys();
    let mut c = env.redis.conn();

    // a is dead-lettered after three deliveries: b and c are skipped, the report is failed.
    for attempt in 1..=3 {
        env.store.start(&r, "a", attempt).await.unwrap();
    }
    let failed = env
        .store
        .fail_after(&r, "a", "provider down", 4)
        .await
        .unwrap();
    assert!(failed.report_finished);
    assert!(failed.ready.is_empty());
    assert_eq!(
        env.store.status(&r).await.unwrap(),
        Some(ReportStatus::Failed)
    );
    // What the aggregator and the webhook deliverer leave behind for a finished report.
    let _: () = c.set(keys.assembled(), "done").unwrap();
    let _: () = c.set(keys.doc_markdown(), "# Line (failed)").unwrap();
    let _: () = c.set(keys.doc_json(), "{}").unwrap();
    let _: () = c
        .hset_multiple(
            keys.meta(),
            &[
                ("webhook_state", "retrying"),
                ("webhook_attempts", "2"),
                ("webhook_next_at", "1"),
                ("webhook_error", "the receiver answered 503"),
            ],
        )
        .unwrap();
    let _: () = c.zadd(k.webhooks_due(), &r, 12345).unwrap();
    let _: () = c
        .hset(k.webhooks_url(), &r, "https://example.com/hook")
        .unwrap();
    let _: () = c.hset(k.webhooks_attempts(), &r, 2).unwrap();
    let seen = env.store.events(&r, None, None, 1000).await.unwrap().len();

    let reopened = env.store.reopen(&r, "a").await.unwrap();
    let Reopened::Reopened {
        node,
        report_was_finished,
    } = reopened
    else {
        panic!("a failed: it is reopened, got {reopened:?}");
    };
    assert_eq!(node.id, "a");
    assert!(node.depends_on.is_empty());
    assert!(report_was_finished);

    let view = env.store.view(&r).await.unwrap().unwrap();
    assert_eq!(view.status, ReportStatus::Running);
    assert_eq!(view.finished_at, None);
    assert_eq!(
        view.webhook, None,
        "the webhook state of the last finish is gone"
    );
    let a = view.section("a").unwrap();
    assert_eq!(a.state, SectionState::Ready);
    assert_eq!(
        (a.reason.as_deref(), a.attempts, a.started_at, a.finished_at),
        (None, 0, None, None),
        "fresh attempts"
    );
    for job in ["b", "c"] {
        let s = view.section(job).unwrap();
        assert_eq!(s.state, SectionState::Pending, "{job}");
        assert_eq!((s.reason.as_deref(), s.finished_at), (None, None), "{job}");
    }
    assert_eq!(view.totals.in_progress, 3);
    let remaining: Vec<i64> = c.hmget(keys.remaining(), &["b", "c"]).unwrap();
    assert_eq!(remaining, [1, 1]);
    let terminal: i64 = c.hget(keys.meta(), "terminal").unwrap();
    assert_eq!(terminal, 0);
    // Assembled again and sent again at the next finish: nothing of the last one is left.
    let left: i64 = c
        .exists(&[keys.assembled(), keys.doc_markdown(), keys.doc_json()])
        .unwrap();
    assert_eq!(left, 0);
    let due: Option<f64> = c.zscore(k.webhooks_due(), &r).unwrap();
    let url: Option<String> = c.hget(k.webhooks_url(), &r).unwrap();
    let attempts: Option<u32> = c.hget(k.webhooks_attempts(), &r).unwrap();
    assert_eq!((due, url, attempts), (None, None, None));
    let ttl: i64 = c.ttl(keys.meta()).unwrap();
    // Running again, it is kept at least a week (the store's TTL here is an hour).
    assert!(
        ttl > 3600 && ttl <= 7 * 86400,
        "the report keys keep a running TTL: {ttl}"
    );
    assert_eq!(
        events_from(&env.store, &r, seen).await,
        [
            ("report.reopened".into(), "".into(), "running".into()),
            ("section.reopened".into(), "a".into(), "ready".into()),
            ("section.reopened".into(), "b".into(), "pending".into()),
            ("section.reopened".into(), "c".into(), "pending".into()),
        ]
    );
    // Listings and documents show it running.
    let page = env
        .store
        .list(
            "acme",
            &ListQuery {
                limit: 10,
                ..ListQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page.reports.len(), 1);
    assert_eq!(page.reports[0].status, ReportStatus::Running);
    assert_eq!(page.reports[0].finished_at, None);
    let doc = env.store.document(&r, Format::Json).await.unwrap().unwrap();
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(doc["status"], "running");

    // A second replay before the section ran changes nothing.
    let seen = env.store.events(&r, None, None, 1000).await.unwrap().len();
    assert_eq!(
        env.store.reopen(&r, "a").await.unwrap(),
        Reopened::NotFailed {
            state: SectionState::Ready
        }
    );
    assert!(events_from(&env.store, &r, seen).await.is_empty());

    // The section runs again; the report finishes again, completed.
    assert_eq!(
        env.store.start(&r, "a", 1).await.unwrap(),
        StartOutcome::Run
    );
    let after_a = env.store.complete(&r, "a", result("A")).await.unwrap();
    assert_eq!(ids(&after_a.ready), ["b"]);
    assert!(!after_a.report_finished);
    let after_b = env.store.complete(&r, "b", result("B")).await.unwrap();
    assert_eq!(ids(&after_b.ready), ["c"]);
    let after_c = env.store.complete(&r, "c", result("C")).await.unwrap();
    assert!(after_c.report_finished);
    let view = env.store.view(&r).await.unwrap().unwrap();
    assert_eq!(view.status, ReportStatus::Completed);
    assert!(view.finished_at.is_some());
    assert_eq!(view.section("a").unwrap().attempts, 1);
    assert_eq!(view.section("a").unwrap().text.as_deref(), Some("A"));
    let finishes = env
        .store
        .events(&r, None, None, 1000)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind == "report.finished")
        .count();
    assert_eq!(finishes, 2);
    let notified: usize = c.xlen(k.notifications()).unwrap();
    assert_eq!(notified, 2, "the aggregators are told of both finishes");

    // Done now: replaying again is a no-op.
    assert_eq!(
        env.store.reopen(&r, "a").await.unwrap(),
        Reopened::NotFailed {
            state: SectionState::Done
        }
    );
    assert_eq!(
        env.store.status(&r).await.unwrap(),
        Some(ReportStatus::Completed)
    );
    assert!(matches!(
        env.store.reopen(&r, "zzz").await,
        Err(Error::UnknownJob { .. })
    ));
    assert!(matches!(
        env.store.reopen("nope", "a").await,
        Err(Error::ReportNotFound { .. })
    ));
}

#[tokio::test]
async fn reopen_keeps_a_dependent_skipped_while_another_dependency_failed() {
    let env = env();
    // a, b → c (skip) → d (skip); c → e (continue).
    let r = env.store.create(diamond()).await.unwrap().report_id;
    env.store.fail(&r, "a", "a down").await.unwrap();
    let rel = env.store.fail(&r, "b", "b down").await.unwrap();
    assert_eq!(ids(&rel.ready), ["e"], "e continues without c");
    env.store.complete(&r, "e", result("E")).await.unwrap();
    assert_eq!(
        env.store.status(&r).await.unwrap(),
        Some(ReportStatus::CompletedWithFailures)
    );
    let mut conn = env.redis.conn();
    let keys = env.store.keys().report(&r);

    // a again: c still has a failed dependency (b), so c and d stay skipped.
    let reopened = env.store.reopen(&r, "a").await.unwrap();
    assert!(matches!(
        reopened,
        Reopened::Reopened {
            ref node,
            report_was_finished: true
        } if node.id == "a"
    ));
    let view = env.store.view(&r).await.unwrap().unwrap();
    assert_eq!(view.status, ReportStatus::Running);
    let state = |id: &str| view.section(id).unwrap().state;
    use SectionState::*;
    assert_eq!(
        [state("a"), state("b"), state("c"), state("d"), state("e")],
        [Ready, Failed, Skipped, Skipped, Done]
    );
    assert_eq!(
        view.section("c").unwrap().reason.as_deref(),
        Some("dependency `b` failed"),
        "the reason names what keeps it skipped"
    );
    assert_eq!(
        view.section("d").unwrap().reason.as_deref(),
        Some("dependency `c` was skipped")
    );
    let terminal: i64 = conn.hget(keys.meta(), "terminal").unwrap();
    assert_eq!(terminal, 4);

    // b again: nothing keeps c skipped any more; c and d wait for a and b.
    assert!(matches!(
        env.store.reopen(&r, "b").await.unwrap(),
        Reopened::Reopened {
            report_was_finished: false,
            ..
        }
    ));
    let view = env.store.view(&r).await.unwrap().unwrap();
    let state = |id: &str| view.section(id).unwrap().state;
    assert_eq!(
        [state("a"), state("b"), state("c"), state("d"), state("e")],
        [Ready, Ready, Pending, Pending, Done],
        "e already ran without c: it is left done"
    );
    let remaining: Vec<i64> = conn.hmget(keys.remaining(), &["c", "d"]).unwrap();
    assert_eq!(remaining, [2, 1]);

    assert!(
        env.store
            .complete(&r, "a", result("A"))
            .await
            .unwrap()
            .ready
            .is_empty()
    );
    let rel = env.store.complete(&r, "b", result("B")).await.unwrap();
    assert_eq!(ids(&rel.ready), ["c"]);
    let rel = env.store.complete(&r, "c", result("C")).await.unwrap();
    assert_eq!(ids(&rel.ready), ["d"], "e is done, not released again");
    let rel = env.store.complete(&r, "d", result("D")).await.unwrap();
    assert!(rel.report_finished);
    let view = env.store.view(&r).await.unwrap().unwrap();
    assert_eq!(view.status, ReportStatus::Completed);
    assert_eq!(view.section("e").unwrap().text.as_deref(), Some("E"));
}

#[tokio::test]
async fn reopen_gives_a_waiting_dependent_its_input_back_and_waits_for_a_reopened_dependency() {
    let env = env();
    let mut conn = env.redis.conn();

    // summary (continue) waits for three personas; one failed, so it waits for two.
    let r = env
        .store
        .create(panel(&["Ann", "Bo", "Cy"]))
        .await
        .unwrap()
        .report_id;
    let keys = env.store.keys().report(&r);
    env.store.fail(&r, "persona[0]", "down").await.unwrap();
    let left: i64 = conn.hget(keys.remaining(), "summary").unwrap();
    assert_eq!(left, 2);
    assert!(matches!(
        env.store.reopen(&r, "persona[0]").await.unwrap(),
        Reopened::Reopened {
            report_was_finished: false,
            ..
        }
    ));
    let left: i64 = conn.hget(keys.remaining(), "summary").unwrap();
    assert_eq!(left, 3, "the reopened persona is outstanding again");
    for p in ["persona[0]", "persona[1]"] {
        env.store.complete(&r, p, result(p)).await.unwrap();
    }
    let rel = env
        .store
        .complete(&r, "persona[2]", result("C"))
        .await
        .unwrap();
    assert_eq!(ids(&rel.ready), ["summary"]);

    // root failed, side (continue) ran without it and failed too. Reopening root, then side:
    // side waits for root, which releases it.
    let r = env
        .store
        .create(new_report(CHAIN, json!({})))
        .await
        .unwrap()
        .report_id;
    env.store.fail(&r, "root", "down").await.unwrap();
    let rel = env.store.fail(&r, "side", "no input").await.unwrap();
    assert!(rel.report_finished);
    assert!(matches!(
        env.store.reopen(&r, "root").await.unwrap(),
        Reopened::Reopened {
            report_was_finished: true,
            ..
        }
    ));
    let view = env.store.view(&r).await.unwrap().unwrap();
    assert_eq!(
        view.section("side").unwrap().state,
        SectionState::Failed,
        "a dependent that already ran is left as it is"
    );
    let waiting = env.store.reopen(&r, "side").await.unwrap();
    assert!(
        matches!(&waiting, Reopened::Waiting { node } if node.id == "side"),
        "{waiting:?}"
    );
    let view = env.store.view(&r).await.unwrap().unwrap();
    assert_eq!(view.section("side").unwrap().state, SectionState::Pending);
    let rel = env.store.complete(&r, "root", result("R")).await.unwrap();
    assert_eq!(ids(&rel.ready), ["mid", "side"]);
}

#[tokio::test]
async fn a_cancelled_report_cannot_be_reopened() {
    let env = env();
    let r = env.store.create(diamond()).await.unwrap().report_id;
    env.store.fail(&r, "a", "down").await.unwrap();
    env.store.cancel(&r).await.unwrap();
    let seen = env.store.events(&r, None, None, 1000).await.unwrap().len();

    assert_eq!(
        env.store.reopen(&r, "a").await.unwrap(),
        Reopened::Cancelled,
        "a failed job of a cancelled report"
    );
    assert_eq!(
        env.store.reopen(&r, "b").await.unwrap(),
        Reopened::Cancelled,
        "a cancelled job"
    );
    let view = env.store.view(&r).await.unwrap().unwrap();
    assert_eq!(view.status, ReportStatus::Cancelled);
    assert_eq!(view.section("a").unwrap().state, SectionState::Failed);
    assert!(events_from(&env.store, &r, seen).await.is_empty());
}
