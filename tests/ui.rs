//! The web app at `/ui`, driven in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, installed by `scripts/install-deps.sh`) against real processes: a
//! report submitted through the form fills in live, a persona's name cannot run script, and the
//! operations page replays a dead letter. Screenshots go to `target/ui-screenshots/`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fanout_system_tests::{Cluster, ClusterSpec};
use fanout_test_support::{FanoutProcess, free_port, wait_for_port, workspace_root};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const ADMIN: &str = "ui-admin-token-0123456789";
const XSS: &str = "<img src=x onerror=alert(1)>";

/// A cluster with an API process, and the API's base URL.
fn stack(workers: usize, env: &[(&str, &str)]) -> (Cluster, FanoutProcess, String) {
    fanout_test_support::use_fanout_bin(env!("CARGO_BIN_EXE_fanout"));
    let mut all: Vec<(String, String)> = vec![
        ("FANOUT_API_TOKENS".into(), format!("{ADMIN}=ops:admin")),
        ("FANOUT_QUEUE__VISIBILITY_TIMEOUT_SECS".into(), "30".into()),
    ];
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let cluster = Cluster::start(ClusterSpec {
        workers,
        concurrency: 4,
        time_scale: 0.04,
        env: all,
        ..ClusterSpec::default()
    });
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let api = FanoutProcess::start("api", &["api", "--listen", &listen], &cluster.env);
    assert!(
        wait_for_port(port, Duration::from_secs(20)),
        "api did not listen"
    );
    (cluster, api, format!("http://{listen}"))
}

/// ChromeDriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Self {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is not installed: run scripts/install-deps.sh");
        assert!(
            wait_for_port(port, Duration::from_secs(20)),
            "chromedriver did not listen"
        );
        Self { child, port }
    }

    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1100"],
            }),
        );
        ClientBuilder::rustls()
            .expect("tls")
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn screenshot(b: &Client, name: &str) {
    let dir = workspace_root().join("target/ui-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    let png = b.screenshot().await.expect("screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
}

/// Run `script` (a function body returning a value) until it returns something truthy.
async fn until(b: &Client, what: &str, timeout: Duration, script: &str) -> Value {
    let start = Instant::now();
    loop {
        let v = b.execute(script, vec![]).await.unwrap_or(Value::Null);
        if !(v.is_null() || v == json!(false) || v == json!("") || v == json!([])) {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn fill(b: &Client, path: &str, text: &str) {
    let field = b
        .find(Locator::Css(&format!("[data-path=\"{path}\"]")))
        .await
        .unwrap_or_else(|e| panic!("no field {path}: {e}"));
    field.clear().await.expect("clear");
    field.send_keys(text).await.expect("type");
}

async fn sign_in(b: &Client, api: &str) {
    b.goto(&format!("{api}/ui")).await.expect("open /ui");
    let token = b
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Id("token"))
        .await
        .expect("the token form");
    token.send_keys(ADMIN).await.expect("type token");
    b.find(Locator::Id("token-save"))
        .await
        .expect("save")
        .click()
        .await
        .expect("click");
}

async fn choose_template(b: &Client, name: &str) {
    let select = b
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Id("template"))
        .await
        .expect("the template select");
    until(
        b,
        "templates loaded",
        Duration::from_secs(10),
        &format!("return !!document.querySelector('#template option[value=\"{name}\"]')"),
    )
    .await;
    select.select_by_value(name).await.expect("select template");
}

async fn submit(b: &Client) -> String {
    b.find(Locator::Id("submit"))
        .await
        .expect("submit button")
        .click()
        .await
        .expect("click submit");
    until(
        b,
        "the report page",
        Duration::from_secs(20),
        "const r = document.getElementById('report'); return r && r.dataset.reportId",
    )
    .await
    .as_str()
    .unwrap()
    .to_owned()
}

const SECTIONS: &str = "return [...document.querySelectorAll('#report .section')]\
    .map(s => [s.dataset.sectionId, s.dataset.state])";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_fills_in_live_in_a_browser_and_report_text_never_runs_as_script() {
    // Two provider calls at a time: the critical path (profile → research → recommendations)
    // goes first, and the enhancements fill in behind it, as users of the original tool saw.
    let (_cluster, _api, api) = stack(2, &[("MAX_CONCURRENT_REQUESTS", "2")]);
    let driver = Driver::start();
    let b = driver.browser().await;
    sign_in(&b, &api).await;

    // A startup report through the form generated from the template's inputs. Sent empty
    // first: the API's 422 shows beside the field it names.
    choose_template(&b, "startup-report").await;
    b.find(Locator::Id("submit"))
        .await
        .expect("submit button")
        .click()
        .await
        .expect("click submit");
    let message = until(
        &b,
        "the error beside the idea field",
        Duration::from_secs(10),
        "const e = document.querySelector('.field-error[data-error-for=\"inputs.idea\"]'); \
         return e && !e.hidden && e.textContent",
    )
    .await;
    assert!(
        message.as_str().unwrap_or("").contains("required"),
        "{message}"
    );
    screenshot(&b, "form-error").await;
    let inputs: Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("config/examples/startup-report.json"))
            .unwrap(),
    )
    .unwrap();
    for (name, value) in inputs.as_object().unwrap() {
        fill(&b, &format!("inputs.{name}"), value.as_str().unwrap()).await;
    }
    submit(&b).await;

    // Watch it fill in: at some point the core chain is done while an enhancement is not.
    let core = ["profile", "research", "recommendations"];
    let mut core_before_last = false;
    let mut shot = false;
    let start = Instant::now();
    loop {
        let states: Vec<(String, String)> =
            serde_json::from_value(b.execute(SECTIONS, vec![]).await.unwrap()).unwrap();
        let done = |id: &str| states.iter().any(|(s, st)| s == id && st == "done");
        let pending_enhancement = states
            .iter()
            .any(|(s, st)| !core.contains(&s.as_str()) && st != "done");
        if core.iter().all(|c| done(c)) && pending_enhancement {
            core_before_last = true;
            if !shot {
                // Tall enough to show several sections in one picture.
                b.set_window_size(1280, 2400).await.unwrap();
                screenshot(&b, "report-filling-in").await;
                b.set_window_size(1280, 1100).await.unwrap();
                shot = true;
            }
        }

        let status: String = serde_json::from_value(
            b.execute(
                "return document.getElementById('report').dataset.status",
                vec![],
            )
            .await
            .unwrap(),
        )
        .unwrap();
        if status != "running" {
            assert_eq!(status, "completed");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "report did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        core_before_last,
        "the core sections were readable before the last enhancement"
    );
    let cost = b
        .find(Locator::Id("report-cost"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        cost.starts_with('$') && cost != "$0.0000",
        "cost shown: {cost}"
    );
    let text = b
        .find(Locator::Css(
            "[data-section-id=\"recommendations\"] .section-body",
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.len() > 100, "the recommendations are rendered: {text}");
    screenshot(&b, "report-completed").await;
    // A panel whose persona's name is markup: it shows as text and no script runs.
    b.find(Locator::Id("nav-reports"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    choose_template(&b, "persona-panel").await;
    fill(
        &b,
        "inputs.content",
        "A subscription app for restaurant stock.",
    )
    .await;
    fill(&b, "inputs.content_type", "landing page").await;
    fill(&b, "inputs.question", "Would you pay for it?").await;
    fill(&b, "inputs.personas[0].name", XSS).await;
    fill(
        &b,
        "inputs.personas[0].description",
        "Owns a tasca; wary of subscriptions.",
    )
    .await;
    let id = submit(&b).await;
    until(
        &b,
        "the panel to finish",
        Duration::from_secs(60),
        "return document.getElementById('report').dataset.status !== 'running'",
    )
    .await;
    assert!(
        b.get_alert_text().await.is_err(),
        "an alert fired: markup in a persona's name ran as script"
    );
    let page = b
        .find(Locator::Id("report"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(XSS), "the name shows as typed: {page}");
    let injected: bool = serde_json::from_value(
        b.execute(
            "return document.querySelectorAll('#report img[src=\"x\"]').length > 0",
            vec![],
        )
        .await
        .unwrap(),
    )
    .unwrap();
    assert!(!injected, "report {id}: markup became an element");
    screenshot(&b, "panel-with-markup-name").await;

    // Readable on a phone: nothing wider than the screen.
    b.set_window_size(360, 800).await.unwrap();
    let overflow: bool = serde_json::from_value(
        b.execute(
            "return document.documentElement.scrollWidth > window.innerWidth + 1",
            vec![],
        )
        .await
        .unwrap(),
    )
    .unwrap();
    screenshot(&b, "report-360px").await;
    assert!(!overflow, "the page scrolls sideways at 360 px");
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operations_page_shows_a_dead_letter_and_replays_it() {
    // One delivery allowed: the jobs a killed worker held are dead-lettered.
    let (mut cluster, _api, api) = stack(2, &[("FANOUT_QUEUE__MAX_DELIVERIES", "1")]);
    let pid0 = cluster.workers[0].pid();
    let (code, out, err) = fanout_test_support::run_fanout(
        &[
            "--api",
            &api,
            "--token",
            ADMIN,
            "submit",
            "--template",
            "persona-panel",
            "--input",
            "config/examples/persona-panel.json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let id = out.lines().next().unwrap().trim().to_owned();
    // Kill the first worker while it runs some of the panel.
    let status = |api: &str| -> Value {
        let (_, out, _) = fanout_test_support::run_fanout(
            &["--api", api, "--token", ADMIN, "status", "--json"],
            &[],
        );
        serde_json::from_str(&out).unwrap_or(Value::Null)
    };
    let start = Instant::now();
    while !status(&api)["workers"].as_array().is_some_and(|ws| {
        ws.iter().any(|w| {
            w["pid"].as_u64() == Some(u64::from(pid0)) && w["in_flight"].as_u64() > Some(0)
        })
    }) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "worker 0 never ran a job"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.workers[0].kill();

    let driver = Driver::start();
    let b = driver.browser().await;
    sign_in(&b, &api).await;
    b.goto(&format!("{api}/ui#/ops")).await.unwrap();
    let dead_id = until(
        &b,
        "a dead letter on the operations page",
        Duration::from_secs(30),
        "const r = document.querySelector('#dead-letters tr[data-dead-id]'); \
         return r && r.dataset.deadId",
    )
    .await;
    let dead_id = dead_id.as_str().unwrap().to_owned();
    let row = b
        .find(Locator::Css(&format!("tr[data-dead-id=\"{dead_id}\"]")))
        .await
        .unwrap();
    assert!(row.text().await.unwrap().contains("delivery limit"));
    screenshot(&b, "operations-dead-letter").await;
    row.find(Locator::Css("button.replay"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        &b,
        "the replay's outcome",
        Duration::from_secs(10),
        "const m = document.getElementById('ops-message'); \
         return m && /replayed/i.test(m.textContent)",
    )
    .await;
    screenshot(&b, "operations-replayed").await;
    b.close().await.unwrap();

    // The report finishes (the other letters' sections failed); replaying the rest reopens it,
    // and it completes.
    let _ = fanout_test_support::run_fanout(&["--api", &api, "--token", ADMIN, "watch", &id], &[]);
    let (code, out, _) = fanout_test_support::run_fanout(
        &[
            "--api", &api, "--token", ADMIN, "dead", "replay", "--report", &id,
        ],
        &[],
    );
    assert!(code == 0 || out.contains("nothing selected"), "{out}");
    let (code, out, err) =
        fanout_test_support::run_fanout(&["--api", &api, "--token", ADMIN, "watch", &id], &[]);
    assert_eq!(
        code, 0,
        "the report completed after the replays: {out}\n{err}"
    );
}
