//! `fanout bench --only budget`: the shared budget as a matrix. Real `fanout worker` processes
//! work through a backlog of persona calls against a simulated provider, for every combination of
//! the provider's enforcement shape, the number of worker processes, the limit that binds
//! (requests or tokens) and what the budget was told (the right limits, three times too much, or
//! nothing). It measures what users rely on: 429s, 429s per success, the share of the provider's
//! real limit used while there is a backlog, and how long the budget took to stop earning 429s.

use std::collections::HashMap;

use fanout_sim::{LimitShape, RateEvent, SimConfig};
use tokio_util::sync::CancellationToken;

use crate::bench::{producer_for, spawn_worker, submit_persona_backlog, uuid_like};

/// The budget matrix's own flags (part of `fanout bench`).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BudgetArgs {
    /// Requests per minute the provider enforces when requests bind.
    #[arg(long, default_value_t = 1_800)]
    budget_rpm: u64,
    /// Tokens per minute the provider enforces when tokens bind (a persona call is ~800 tokens).
    #[arg(long, default_value_t = 3_000_000)]
    budget_tpm: u64,
    /// Persona calls in each run's backlog.
    #[arg(long, default_value_t = 300)]
    budget_calls: usize,
    /// Worker process counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 4, 8])]
    budget_processes: Vec<usize>,
    /// Run only these enforcement shapes (comma-separated: token-bucket, sliding-2s,
    /// fixed-1s, fixed-10s, fixed-60s).
    #[arg(long, value_delimiter = ',')]
    budget_shapes: Vec<String>,
    /// Run only the runs where this limit binds (requests or tokens).
    #[arg(long, value_parser = ["requests", "tokens"])]
    budget_binding: Option<String>,
}

/// The enforcement shapes measured, as (name, shape, window seconds).
const SHAPES: &[(&str, LimitShape, f64)] = &[
    ("token-bucket", LimitShape::TokenBucket, 1.0),
    ("sliding-2s", LimitShape::SlidingWindow, 2.0),
    ("fixed-1s", LimitShape::FixedWindow, 1.0),
    ("fixed-10s", LimitShape::FixedWindow, 10.0),
    ("fixed-60s", LimitShape::FixedWindow, 60.0),
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Binding {
    Requests,
    Tokens,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Told {
    Right,
    ThreeTimes,
    Nothing,
}

impl Told {
    fn label(self) -> &'static str {
        match self {
            Self::Right => "right",
            Self::ThreeTimes => "3× too much",
            Self::Nothing => "nothing",
        }
    }
}

/// One run of the matrix.
struct Cell {
    shape: &'static str,
    window: f64,
    limit_shape: LimitShape,
    processes: usize,
    binding: Binding,
    told: Told,
    /// Does the provider send `x-ratelimit-*` headers?
    advertises: bool,
}

/// What one run measured.
struct Outcome {
    successes: usize,
    refused: usize,
    /// Share of the binding limit used from the first admission (or the last 429) to the last
    /// admission of the backlog.
    used: f64,
    /// Seconds from the first call to the last 429 (0 without any).
    converged_after: f64,
}

pub(crate) async fn run(
    args: &BudgetArgs,
    redis_url: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(args.budget_rpm >= 60, "--budget-rpm must be at least 60");
    anyhow::ensure!(
        args.budget_tpm >= 60_000,
        "--budget-tpm must be at least 60000"
    );
    anyhow::ensure!(
        args.budget_processes.iter().all(|&p| p >= 1),
        "--budget-processes must be at least 1 each"
    );
    for s in &args.budget_shapes {
        anyhow::ensure!(
            SHAPES.iter().any(|(name, ..)| name == s),
            "--budget-shapes: `{s}` is not a shape; allowed: token-bucket, sliding-2s, fixed-1s, fixed-10s, fixed-60s"
        );
    }
    let shapes: Vec<_> = SHAPES
        .iter()
        .filter(|(name, ..)| {
            args.budget_shapes.is_empty() || args.budget_shapes.iter().any(|s| s == name)
        })
        .collect();
    println!(
        "## Shared budget ({} persona calls per run; requests bind at {} RPM, tokens at {} TPM)\n",
        args.budget_calls, args.budget_rpm, args.budget_tpm
    );
    // Every run's row as it finishes (the matrix takes a while), folded away in the markdown;
    // the summary per shape and binding limit follows it.
    println!("<details><summary>every run</summary>\n");
    println!(
        "| provider's shape | worker processes | binding | budget told | calls | 429s | 429s per success | real limit used while backlogged | 429s stop after |"
    );
    println!("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |");
    let mut summary: Vec<Summary> = Vec::new();
    for &&(shape, limit_shape, window) in &shapes {
        for &processes in &args.budget_processes {
            for binding in [Binding::Requests, Binding::Tokens] {
                let name = binding_name(binding);
                if args.budget_binding.as_deref().is_some_and(|b| b != name) {
                    continue;
                }
                for told in [Told::Right, Told::ThreeTimes, Told::Nothing] {
                    let cell = Cell {
                        shape,
                        window,
                        limit_shape,
                        processes,
                        binding,
                        told,
                        advertises: true,
                    };
                    let outcome = measure(args, &cell, redis_url, shutdown).await?;
                    print_row(&cell, &outcome);
                    match summary
                        .iter_mut()
                        .find(|s| s.shape == shape && s.binding == binding)
                    {
                        Some(s) => s.add(&outcome),
                        None => summary.push(Summary::new(shape, binding, &outcome)),
                    }
                }
            }
        }
    }
    println!("\n</details>\n");
    print_summary(&summary);
    println!(
        "\nA provider that advertises its limits (`x-ratelimit-limit-*`). \"Used\" is the binding limit's share taken between the first admission (or the last 429, when there were any) and the backlog's last persona call (a summary, many times its size, comes after its panel); \"429s stop after\" is the time from the first call to the last 429.\n"
    );

    // The same where the provider advertises nothing: only 429s can tell the budget.
    println!("### A provider that advertises no limits (requests bind, 4 worker processes)\n");
    println!(
        "| provider's shape | worker processes | binding | budget told | calls | 429s | 429s per success | real limit used while backlogged | 429s stop after |"
    );
    println!("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for &&(shape, limit_shape, window) in shapes.iter().take(2) {
        for told in [Told::Right, Told::ThreeTimes] {
            let cell = Cell {
                shape,
                window,
                limit_shape,
                processes: 4,
                binding: Binding::Requests,
                told,
                advertises: false,
            };
            let outcome = measure(args, &cell, redis_url, shutdown).await?;
            print_row(&cell, &outcome);
        }
    }
    println!();
    Ok(())
}

/// The runs of one provider's shape and binding limit, folded together.
struct Summary {
    shape: &'static str,
    binding: Binding,
    runs: usize,
    successes: usize,
    refused: usize,
    least_used: f64,
}

impl Summary {
    fn new(shape: &'static str, binding: Binding, o: &Outcome) -> Self {
        Self {
            shape,
            binding,
            runs: 1,
            successes: o.successes,
            refused: o.refused,
            least_used: o.used,
        }
    }

    fn add(&mut self, o: &Outcome) {
        self.runs += 1;
        self.successes += o.successes;
        self.refused += o.refused;
        self.least_used = self.least_used.min(o.used);
    }
}

/// One row per shape and binding limit ("least used" is the worst of its runs), then the total.
fn print_summary(summary: &[Summary]) {
    println!(
        "| provider's shape | binding | runs (worker processes × what the budget was told) | 429s | calls | least of the real limit used while backlogged |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    for s in summary {
        println!(
            "| {} | {} | {} | {} | {} | {:.1}% |",
            s.shape,
            binding_name(s.binding),
            s.runs,
            s.refused,
            s.successes,
            s.least_used * 100.0
        );
    }
    let runs: usize = summary.iter().map(|s| s.runs).sum();
    let refused: usize = summary.iter().map(|s| s.refused).sum();
    let least = summary
        .iter()
        .map(|s| s.least_used)
        .fold(f64::INFINITY, f64::min);
    if runs > 0 {
        println!(
            "\nAll {runs} runs: {refused} × 429 in total; every run used at least {:.1}% of the real limit while backlogged (the schedule runs at {:.0}%: `budget.headroom`).",
            least * 100.0,
            (1.0 - fanout_core::config::BudgetConfig::default().headroom) * 100.0
        );
    }
}

fn binding_name(binding: Binding) -> &'static str {
    match binding {
        Binding::Requests => "requests",
        Binding::Tokens => "tokens",
    }
}

fn print_row(cell: &Cell, o: &Outcome) {
    println!(
        "| {} | {} | {} | {} | {} | {} | {:.3} | {:.1}% | {:.1} s |",
        cell.shape,
        cell.processes,
        binding_name(cell.binding),
        cell.told.label(),
        o.successes,
        o.refused,
        o.refused as f64 / o.successes.max(1) as f64,
        o.used * 100.0,
        o.converged_after
    );
}

/// One run: a fresh provider and namespace, `processes` workers, the backlog, the timeline.
async fn measure(
    args: &BudgetArgs,
    cell: &Cell,
    redis_url: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Outcome> {
    // The dimension that does not bind is still limited (and advertised), far above the load.
    let (rpm, tpm) = match cell.binding {
        Binding::Requests => (args.budget_rpm, 1_000_000_000),
        Binding::Tokens => (1_000_000, args.budget_tpm),
    };
    let sim = fanout_sim::spawn(SimConfig {
        time_scale: 0.002,
        rpm,
        tpm,
        limit_shape: cell.limit_shape,
        window_secs: cell.window,
        rate_headers: cell.advertises,
        seed: 3,
        ..SimConfig::default()
    })
    .await?;
    let ns = format!("bench-budget-{}", uuid_like());
    let mut env: HashMap<String, String> = [
        ("REDIS_URL", redis_url.to_owned()),
        ("OPENAI_BASE_URL", sim.base_url()),
        ("OPENAI_API_KEY", "sk-bench-000000000000".to_owned()),
        ("MAX_CONCURRENT_REQUESTS", "200".to_owned()),
        ("FANOUT_REDIS__NAMESPACE", ns),
        ("FANOUT_LOG__LEVEL", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let factor = match cell.told {
        Told::Right => Some(1),
        Told::ThreeTimes => Some(3),
        Told::Nothing => None,
    };
    if let Some(f) = factor {
        env.insert("REQUESTS_PER_MINUTE".into(), (rpm * f).to_string());
        env.insert("TOKENS_PER_MINUTE".into(), (tpm * f).to_string());
    }
    let concurrency = (64 / cell.processes).max(8).to_string();
    let mut children = Vec::new();
    for _ in 0..cell.processes {
        children.push(spawn_worker(&env, &["--concurrency", &concurrency])?);
    }
    let (store, producer) = producer_for(&env)?;
    let ids = submit_persona_backlog(&producer, args.budget_calls, Some(fanout_core::Lane::Batch))
        .await?;
    for id in &ids {
        tokio::select! {
            v = crate::report_cmds::wait_final(&store, id) => { v?; }
            _ = shutdown.cancelled() => anyhow::bail!("interrupted"),
        }
    }
    for mut c in children {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }
    let timeline = sim.timeline();
    let _ = sim.shutdown().await;
    let per_minute = match cell.binding {
        Binding::Requests => rpm,
        Binding::Tokens => tpm,
    };
    Ok(outcome(&timeline, cell.binding, per_minute))
}

fn outcome(timeline: &[RateEvent], binding: Binding, per_minute: u64) -> Outcome {
    let admitted: Vec<&RateEvent> = timeline.iter().filter(|e| e.admitted).collect();
    let refused = timeline.len() - admitted.len();
    let first = timeline.first().map_or(0.0, |e| e.at_ms);
    let last_refused = timeline.iter().rev().find(|e| !e.admitted).map(|e| e.at_ms);
    // The backlog is the persona calls: it ends with the last of them. A panel's summary (a
    // prompt of every critique, many times a persona call's tokens) comes after its panel.
    let mut sizes: Vec<u64> = admitted.iter().map(|e| e.tokens).collect();
    sizes.sort_unstable();
    let typical = sizes.get(sizes.len() / 2).copied().unwrap_or(0);
    let to = admitted
        .iter()
        .rev()
        .find(|e| e.tokens <= typical.saturating_mul(4))
        .map_or(first, |e| e.at_ms);
    // Once converged: from the last 429, unless that came after the backlog (a summary).
    let from = last_refused.filter(|t| *t < to).unwrap_or(first);
    // The last admission only starts at `to`: count what went in before it.
    let cost = |e: &RateEvent| match binding {
        Binding::Requests => 1.0,
        Binding::Tokens => e.tokens as f64,
    };
    let taken: f64 = admitted
        .iter()
        .filter(|e| e.at_ms >= from && e.at_ms < to)
        .map(|e| cost(e))
        .sum();
    let span_s = ((to - from) / 1000.0).max(1e-9);
    Outcome {
        successes: admitted.len(),
        refused,
        used: taken / (span_s * per_minute as f64 / 60.0),
        converged_after: last_refused.map_or(0.0, |t| (t - first) / 1000.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(at_ms: f64, admitted: bool) -> RateEvent {
        RateEvent {
            at_ms,
            admitted,
            tokens: 100,
        }
    }

    #[test]
    fn use_is_measured_after_the_last_429() {
        // 60 RPM: one a second. A 429 at 1 s, then one a second from 1 s to 5 s.
        let timeline = [
            event(0.0, true),
            event(1_000.0, false),
            event(1_000.0, true),
            event(2_000.0, true),
            event(3_000.0, true),
            event(4_000.0, true),
            event(5_000.0, true),
        ];
        let o = outcome(&timeline, Binding::Requests, 60);
        assert_eq!((o.successes, o.refused), (6, 1));
        assert!((o.used - 1.0).abs() < 1e-9, "{}", o.used);
        assert!((o.converged_after - 1.0).abs() < 1e-9);
        let o = outcome(&timeline, Binding::Tokens, 12_000);
        assert!((o.used - 0.5).abs() < 1e-9, "{}", o.used);
    }

    #[test]
    fn a_429_after_the_backlog_leaves_its_use_measured_from_the_start() {
        // One a second from 0 to 4 s, then a summary (many times the size) refused and served.
        let mut timeline: Vec<RateEvent> =
            (0..5).map(|i| event(i as f64 * 1_000.0, true)).collect();
        timeline.push(RateEvent {
            at_ms: 4_500.0,
            admitted: false,
            tokens: 5_000,
        });
        timeline.push(RateEvent {
            at_ms: 5_500.0,
            admitted: true,
            tokens: 5_000,
        });
        let o = outcome(&timeline, Binding::Requests, 60);
        assert!((o.used - 1.0).abs() < 1e-9, "{}", o.used);
        assert!((o.converged_after - 4.5).abs() < 1e-9);
    }
}
