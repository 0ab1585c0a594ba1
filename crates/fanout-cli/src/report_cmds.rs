//! `fanout submit`, `fanout watch`, `fanout report`: the user's side of a report.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use fanout_aggregator::{Format, ReportEvent, ReportView};
use fanout_core::report::{Lane, ReportStatus, SectionState};
use fanout_producer::api::DocFormat;
use fanout_producer::{BatchApiChoice, SubmitRequest};

use crate::backend::{Backend, remote_error};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

#[derive(Debug, clap::Args)]
pub(crate) struct SubmitArgs {
    /// A template name (see config/templates) or a path to a template file.
    #[arg(long, short)]
    template: String,
    /// A JSON file with the template's inputs ("-" reads stdin).
    #[arg(long, short)]
    input: PathBuf,
    /// Wait until the report is final and print where to read it; exit 1 if it failed or was
    /// cancelled, 2 if it completed with failed sections.
    #[arg(long)]
    wait: bool,
    /// A repeated submit with the same key returns the first report.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// POST the final report here when it finishes (signed; public addresses only, unless
    /// `webhooks.allow_hosts` lists the receiver).
    #[arg(long, value_name = "URL")]
    callback_url: Option<String>,
    /// Queue lane: interactive (default) or batch.
    #[arg(long, value_parser = parse_lane)]
    lane: Option<Lane>,
    /// Run the sections through the provider's Batch API (half the price, answers within
    /// 24 h); the template's `batch_api` is the default.
    #[arg(long, conflicts_with = "live")]
    batch_api: bool,
    /// Run the sections as live calls, even when the template asks for the Batch API.
    #[arg(long)]
    live: bool,
    /// Run through the Batch API and finish within this many seconds; sections a batch would
    /// not answer in time run as live calls.
    #[arg(long, value_name = "SECS", conflicts_with = "live")]
    deadline_secs: Option<u64>,
    /// With --wait, show live progress.
    #[arg(long)]
    progress: bool,
}

fn parse_lane(s: &str) -> Result<Lane, String> {
    Lane::parse(s).ok_or_else(|| format!("`{s}` is not a lane; use interactive or batch"))
}

#[derive(Debug, clap::Args)]
pub(crate) struct WatchArgs {
    /// The report id that `fanout submit` printed.
    id: String,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ReportsArgs {
    /// Whose reports: without --api, default `default` (what `fanout submit` submits as);
    /// with --api, default the token's tenant (another one needs an admin token).
    #[arg(long)]
    tenant: Option<String>,
    /// Only reports in this status (running, completed, completed_with_failures, failed,
    /// cancelled).
    #[arg(long, value_parser = parse_status)]
    status: Option<ReportStatus>,
    /// Only reports of this template.
    #[arg(long)]
    template: Option<String>,
    /// How many (1 to 100).
    #[arg(long, short = 'n', default_value_t = 20)]
    limit: usize,
}

fn parse_status(s: &str) -> Result<ReportStatus, String> {
    ReportStatus::parse(s).ok_or_else(|| {
        format!("`{s}` is not a status; use running, completed, completed_with_failures, failed or cancelled")
    })
}

#[derive(Debug, clap::Args)]
pub(crate) struct ReportArgs {
    /// The report id that `fanout submit` printed.
    id: String,
    /// md (Markdown) or json.
    #[arg(long, short, default_value = "md", value_parser = ["md", "json"])]
    format: String,
    /// Write to this file instead of stdout.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct CancelArgs {
    /// The report id that `fanout submit` printed.
    id: String,
}

/// Cancel a running report; a report already cancelled is fine, a finished one is an error.
pub(crate) async fn cancel(backend: &Backend, args: CancelArgs) -> anyhow::Result<ExitCode> {
    let status = match backend {
        Backend::Local(local) => {
            let store = local.store()?;
            let status = store
                .status(&args.id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no report `{}` (unknown, or expired)", args.id))?;
            if status.is_terminal() && status != ReportStatus::Cancelled {
                anyhow::bail!("report `{}` already finished ({status})", args.id);
            }
            local
                .producer()?
                .cancel(&args.id)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            ReportStatus::Cancelled
        }
        Backend::Remote(client) => client.cancel(&args.id).await.map_err(remote_error)?.status,
    };
    println!("{} {status}", args.id);
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn read_inputs(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("cannot read the inputs from stdin")?
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --input {}", path.display()))?
    };
    serde_json::from_str(&text).with_context(|| {
        format!(
            "--input {} is not valid JSON (it must be the template's inputs object)",
            path.display()
        )
    })
}

pub(crate) async fn submit(backend: &Backend, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let inputs = read_inputs(&args.input)?;
    let request = SubmitRequest {
        template: args.template,
        inputs,
        lane: args.lane,
        idempotency_key: args.idempotency_key,
        callback_url: args.callback_url,
        batch_api: match (args.batch_api, args.live, args.deadline_secs) {
            (_, _, Some(secs)) => Some(BatchApiChoice::On {
                deadline_secs: Some(secs),
            }),
            (true, _, None) => Some(BatchApiChoice::On {
                deadline_secs: None,
            }),
            (_, true, None) => Some(BatchApiChoice::Off),
            _ => None,
        },
    };
    let (id, duplicate, warnings) = match backend {
        Backend::Local(local) => {
            let submitted = local
                .producer()?
                .submit("default", request)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let warning = local.ops()?.idle_warning().await.ok().flatten();
            (
                submitted.report_id,
                submitted.duplicate,
                warning.into_iter().collect(),
            )
        }
        Backend::Remote(client) => {
            let a = client.submit(&request).await.map_err(remote_error)?;
            (a.id, a.duplicate, a.warnings)
        }
    };
    println!("{id}");
    if duplicate {
        eprintln!("(an earlier submit with this idempotency key made this report)");
    }
    for w in warnings {
        eprintln!("warning: {w}");
    }
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let view = watch_view(backend, &id, args.progress).await?;
    eprintln!(
        "report {} {}: {} of {} sections done, {} failed, {} skipped; read it with `fanout report {}`",
        view.id,
        view.status,
        view.totals.done,
        view.totals.sections,
        view.totals.failed,
        view.totals.skipped,
        view.id
    );
    Ok(exit_code(view.status))
}

pub(crate) fn exit_code(status: ReportStatus) -> ExitCode {
    match status {
        ReportStatus::Completed => ExitCode::SUCCESS,
        ReportStatus::CompletedWithFailures => ExitCode::from(2),
        _ => ExitCode::from(1),
    }
}

/// Wait for the report's final status by following its event stream (no polling).
pub(crate) async fn wait_final(
    store: &fanout_aggregator::Store,
    id: &str,
) -> anyhow::Result<ReportView> {
    let mut after: Option<String> = None;
    loop {
        let events = store
            .events(id, after.as_deref(), Some(Duration::from_secs(2)), 100)
            .await
            .with_context(|| format!("report {id}"))?;
        if let Some(last) = events.last() {
            after = Some(last.id.clone());
        }
        if events.iter().any(|e| e.kind == "report.finished") || events.is_empty() {
            let view = store
                .view(id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no report `{id}` (unknown, or expired)"))?;
            if view.status.is_terminal() {
                return Ok(view);
            }
        }
    }
}

/// The report as it stands, locally or over the API.
async fn load_view(backend: &Backend, id: &str) -> anyhow::Result<ReportView> {
    match backend {
        Backend::Local(local) => local
            .store()?
            .view(id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no report `{id}` (unknown, or expired)")),
        Backend::Remote(client) => client.get(id).await.map_err(remote_error),
    }
}

pub(crate) async fn watch(backend: &Backend, args: WatchArgs) -> anyhow::Result<ExitCode> {
    let view = watch_view(backend, &args.id, true).await?;
    Ok(exit_code(view.status))
}

/// Follow a report until it is final: with `progress`, one line per section (per persona for
/// `for_each` sections) as bars on a terminal, as event lines otherwise; the final state as
/// lines on stdout when it is not a terminal.
pub(crate) async fn watch_view(
    backend: &Backend,
    id: &str,
    progress: bool,
) -> anyhow::Result<ReportView> {
    let mut view = load_view(backend, id).await?;
    let multi = MultiProgress::new();
    if !progress {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut bars = Progress::new(&multi, &view);
    let mut after: Option<String> = None;
    let mut events = match backend {
        Backend::Remote(client) => Some(Box::pin(client.events(id, None))),
        Backend::Local(_) => None,
    };
    loop {
        bars.update(&view);
        if view.status.is_terminal() {
            bars.finish(&view);
            // `watch` piped: the final state as lines on stdout. `submit --wait` keeps stdout
            // for the report id (`ID=$(fanout submit --wait …)`).
            if progress && !std::io::stdout().is_terminal() {
                print_final(&view);
            }
            return Ok(view);
        }
        let batch: Vec<ReportEvent> = match (backend, events.as_mut()) {
            (Backend::Local(local), _) => {
                let got = local
                    .store()?
                    .events(id, after.as_deref(), Some(Duration::from_millis(500)), 200)
                    .await?;
                if let Some(last) = got.last() {
                    after = Some(last.id.clone());
                }
                got
            }
            (Backend::Remote(client), Some(stream)) => {
                use futures::StreamExt as _;
                match stream.next().await {
                    Some(Ok(e)) => e.body().into_iter().collect(),
                    Some(Err(e)) => return Err(remote_error(e)),
                    // The stream ended (the report finished, or the server closed it): pick
                    // up where it left off.
                    None => {
                        let last = after.clone();
                        *stream = Box::pin(client.events(id, last.as_deref()));
                        Vec::new()
                    }
                }
            }
            (Backend::Remote(_), None) => unreachable!("remote watch has a stream"),
        };
        if let Some(last) = batch.last() {
            after = Some(last.id.clone());
        }
        // Without a terminal (CI logs, pipes) the bars stay hidden: print the events as lines.
        if progress && !std::io::stderr().is_terminal() {
            for e in &batch {
                eprintln!(
                    "{} {}{}{}",
                    e.kind,
                    e.job_id.as_deref().unwrap_or(""),
                    e.state
                        .as_deref()
                        .map(|s| format!(" {s}"))
                        .unwrap_or_default(),
                    if e.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", e.message)
                    }
                );
            }
        }
        view = load_view(backend, id).await?;
    }
}

/// Progress bars for one report.
pub(crate) struct Progress {
    header: ProgressBar,
    sections: Vec<ProgressBar>,
}

impl Progress {
    pub(crate) fn new(multi: &MultiProgress, view: &ReportView) -> Self {
        let header = multi.add(ProgressBar::new(view.sections.len() as u64));
        header.set_style(
            ProgressStyle::with_template("{prefix:.bold} [{bar:30.cyan/blue}] {pos}/{len} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        header.set_prefix(format!("{} {}", view.template, short(&view.id)));
        let style = ProgressStyle::with_template("  {spinner} {prefix:28} {msg}")
            .expect("valid template")
            .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ ");
        let sections = view
            .sections
            .iter()
            .map(|s| {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(style.clone());
                let name = match &s.item {
                    Some(item) => format!("{} · {item}", s.title),
                    None => s.title.clone(),
                };
                bar.set_prefix(truncate(&name, 28));
                bar.enable_steady_tick(Duration::from_millis(120));
                bar
            })
            .collect();
        Self { header, sections }
    }

    pub(crate) fn update(&mut self, view: &ReportView) {
        let t = &view.totals;
        self.header
            .set_position((t.done + t.failed + t.skipped + t.cancelled) as u64);
        self.header.set_message(format!(
            "{} · {} tokens · ${:.4}",
            view.status, t.total_tokens, t.cost
        ));
        for (bar, s) in self.sections.iter().zip(&view.sections) {
            let msg = match s.state {
                SectionState::Done => format!(
                    "✔ done in {:.1}s · {} tokens{}",
                    s.latency_ms.unwrap_or(0) as f64 / 1000.0,
                    s.prompt_tokens + s.completion_tokens,
                    if s.cached { " · cached" } else { "" }
                ),
                SectionState::Failed => format!("✖ failed: {}", s.reason.as_deref().unwrap_or("")),
                SectionState::Skipped => format!("⏭ {}", s.reason.as_deref().unwrap_or("skipped")),
                SectionState::Cancelled => "cancelled".into(),
                SectionState::Running => format!("running (attempt {})", s.attempts.max(1)),
                SectionState::Ready => "queued".into(),
                SectionState::Pending => "waiting for inputs".into(),
            };
            if s.state.is_terminal() && !bar.is_finished() {
                bar.finish_with_message(msg);
            } else if !bar.is_finished() {
                bar.set_message(msg);
            }
        }
    }

    pub(crate) fn finish(&self, view: &ReportView) {
        self.header.finish_with_message(format!(
            "{} in {:.1}s · {} tokens · ${:.4}",
            view.status,
            view.totals.wall_ms as f64 / 1000.0,
            view.totals.total_tokens,
            view.totals.cost
        ));
    }
}

/// One line per section (per persona) and a summary line: what the bars show at the end.
fn print_final(view: &ReportView) {
    for s in &view.sections {
        let mut line = format!(
            "{} {} {} tokens",
            s.job_id,
            s.state,
            s.prompt_tokens + s.completion_tokens
        );
        if let Some(reason) = &s.reason {
            line.push_str(&format!(": {reason}"));
        }
        println!("{line}");
    }
    println!(
        "{} {} in {:.1}s · {} tokens · ${:.4}",
        view.id,
        view.status,
        view.totals.wall_ms as f64 / 1000.0,
        view.totals.total_tokens,
        view.totals.cost
    );
}

fn short(id: &str) -> &str {
    &id[id.len().saturating_sub(8)..]
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let cut: String = s.chars().take(n - 1).collect();
        format!("{cut}…")
    }
}

pub(crate) async fn report(backend: &Backend, args: ReportArgs) -> anyhow::Result<ExitCode> {
    let json = args.format == "json";
    let doc = match backend {
        Backend::Local(local) => local
            .store()?
            .document(&args.id, if json { Format::Json } else { Format::Markdown })
            .await?
            .ok_or_else(|| anyhow::anyhow!("no report `{}` (unknown, or expired)", args.id))?,
        Backend::Remote(client) => client
            .report(&args.id, if json { DocFormat::Json } else { DocFormat::Md })
            .await
            .map_err(remote_error)?,
    };
    match args.output {
        Some(path) => std::fs::write(&path, doc)
            .with_context(|| format!("cannot write --output {}", path.display()))?,
        None => println!("{doc}"),
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn reports(backend: &Backend, args: ReportsArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!((1..=100).contains(&args.limit), "--limit must be 1 to 100");
    let reports = match backend {
        Backend::Local(local) => {
            let tenant = args.tenant.as_deref().unwrap_or("default");
            local
                .store()?
                .list(
                    tenant,
                    &fanout_aggregator::ListQuery {
                        status: args.status,
                        template: args.template,
                        since: None,
                        limit: args.limit,
                        cursor: None,
                    },
                )
                .await?
                .reports
        }
        Backend::Remote(client) => {
            let mut q = form_urlencoded::Serializer::new(String::new());
            q.append_pair("limit", &args.limit.to_string());
            if let Some(s) = args.status {
                q.append_pair("status", s.as_str());
            }
            if let Some(t) = &args.template {
                q.append_pair("template", t);
            }
            if let Some(t) = &args.tenant {
                q.append_pair("tenant", t);
            }
            client
                .list(&q.finish())
                .await
                .map_err(remote_error)?
                .reports
        }
    };
    if reports.is_empty() {
        eprintln!("no reports");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<36}  {:<23}  {:<16}  {:>4}  CREATED",
        "ID", "STATUS", "TEMPLATE", "JOBS"
    );
    for r in &reports {
        let created = fanout_aggregator::format_time(r.created_at);
        println!(
            "{:<36}  {:<23}  {:<16}  {:>4}  {created}",
            r.id,
            r.status.to_string(),
            truncate(&r.template, 16),
            r.jobs
        );
    }
    Ok(ExitCode::SUCCESS)
}
