use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::traits::RequestOptionsBuilder as _;
use async_openai::types::InputSource;
use async_openai::types::batches::{
    Batch, BatchCompletionWindow, BatchEndpoint, BatchRequest, BatchRequestOutput, BatchStatus,
};
use async_openai::types::chat::CreateChatCompletionResponse;
use async_openai::types::files::{CreateFileRequest, FileInput, FilePurpose, OpenAIFilePurpose};
use fanout_sim::{SimConfig, SimHandle, spawn};
use serde_json::{Value, json};

use crate::common::{KEY, api_error, client, header};

/// One request line of a batch input file.
fn line(custom_id: &str, prompt: &str, max_tokens: u32) -> Value {
    json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
        },
    })
}

/// `n` request lines `req-0` … with distinct prompts.
fn lines(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| line(&format!("req-{i}"), &format!("question {i}"), 100))
        .collect()
}

fn jsonl(lines: &[Value]) -> Vec<u8> {
    let mut out = String::new();
    for line in lines {
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out.into_bytes()
}

/// A simulator whose batches take `turnaround_secs` of real time.
fn config(turnaround_secs: f64) -> SimConfig {
    SimConfig {
        time_scale: turnaround_secs / 600.0,
        batch_turnaround_secs: 600.0,
        ..SimConfig::default()
    }
}

async fn upload(client: &Client<OpenAIConfig>, lines: &[Value]) -> String {
    let request = CreateFileRequest {
        file: FileInput {
            source: InputSource::VecU8 {
                filename: "requests.jsonl".to_owned(),
                vec: jsonl(lines),
            },
        },
        purpose: FilePurpose::Batch,
        expires_after: None,
    };
    client.files().create(request).await.unwrap().id
}

async fn create(client: &Client<OpenAIConfig>, file_id: &str) -> Batch {
    client
        .batches()
        .create(BatchRequest {
            input_file_id: file_id.to_owned(),
            endpoint: BatchEndpoint::V1ChatCompletions,
            completion_window: BatchCompletionWindow::W24H,
            ..BatchRequest::default()
        })
        .await
        .unwrap()
}

/// Polls a batch until `done` holds (or fails after 10 s).
async fn wait_until(
    client: &Client<OpenAIConfig>,
    id: &str,
    done: impl Fn(&Batch) -> bool,
) -> Batch {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let batch = client.batches().retrieve(id).await.unwrap();
        if done(&batch) {
            return batch;
        }
        assert!(
            Instant::now() < deadline,
            "batch never got there: {batch:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for(client: &Client<OpenAIConfig>, id: &str, status: BatchStatus) -> Batch {
    wait_until(client, id, |batch| batch.status == status).await
}

/// The records of an output or error file (none when the batch wrote no such file).
async fn records(client: &Client<OpenAIConfig>, file_id: Option<&str>) -> Vec<BatchRequestOutput> {
    let Some(file_id) = file_id else {
        return Vec::new();
    };
    let content = client.files().content(file_id).await.unwrap();
    std::str::from_utf8(&content)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// Every custom id of an output and an error file, checking that none is there twice.
fn custom_ids(output: &[BatchRequestOutput], errors: &[BatchRequestOutput]) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for record in output.iter().chain(errors) {
        assert!(
            ids.insert(record.custom_id.clone()),
            "{} twice",
            record.custom_id
        );
    }
    ids
}

fn expected_ids(n: usize) -> BTreeSet<String> {
    (0..n).map(|i| format!("req-{i}")).collect()
}

/// A raw request to the simulator, for what async-openai hides.
fn raw(sim: &SimHandle, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .request(method, format!("{}{path}", sim.base_url()))
        .bearer_auth(KEY)
}

async fn raw_upload(sim: &SimHandle, purpose: &str, content: Vec<u8>) -> reqwest::Response {
    let form = reqwest::multipart::Form::new()
        .text("purpose", purpose.to_owned())
        .part(
            "file",
            reqwest::multipart::Part::bytes(content).file_name("requests.jsonl"),
        );
    raw(sim, reqwest::Method::POST, "/files")
        .multipart(form)
        .send()
        .await
        .unwrap()
}

/// The status and OpenAI error object of a response.
async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (status, body["error"].clone())
}

#[tokio::test]
async fn a_batch_runs_to_completion_and_answers_every_request_once() {
    // One request per minute for the live endpoint: the batch's 20 requests do not count.
    let sim = spawn(SimConfig {
        rpm: 1,
        ..config(1.5)
    })
    .await
    .unwrap();
    let client = client(&sim);
    client
        .chat()
        .create(crate::common::chat("a live call", 100))
        .await
        .unwrap();

    let input = lines(20);
    let file_id = upload(&client, &input).await;
    let file = client.files().retrieve(&file_id).await.unwrap();
    assert_eq!(file.object, "file");
    assert_eq!(file.purpose, OpenAIFilePurpose::Batch);
    assert_eq!(file.filename, "requests.jsonl");
    assert_eq!(file.bytes, Some(jsonl(&input).len() as u32));
    assert!(file.id.starts_with("file-"));
    assert_eq!(
        client.files().content(&file.id).await.unwrap(),
        jsonl(&input)
    );

    let created = create(&client, &file.id).await;
    assert!(created.id.starts_with("batch_"), "{}", created.id);
    assert_eq!(created.status, BatchStatus::Validating);
    assert_eq!(created.endpoint, "/v1/chat/completions");
    assert_eq!(created.completion_window, "24h");
    assert_eq!(created.input_file_id, file.id);
    assert_eq!(created.model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(created.in_progress_at, None);
    assert_eq!(created.output_file_id, None);
    // The 24 h window, scaled like the turnaround (1.5 s for 600 s).
    assert_eq!(created.expires_at, Some(created.created_at + 216));

    let running = wait_until(&client, &created.id, |batch| batch.in_progress_at.is_some()).await;
    assert_ne!(running.status, BatchStatus::Validating);
    assert_eq!(running.request_counts.as_ref().unwrap().total, 20);

    let batch = wait_for(&client, &created.id, BatchStatus::Completed).await;
    assert!(batch.finalizing_at.is_some() && batch.completed_at.is_some());
    assert_eq!(
        (batch.failed_at, batch.expired_at, batch.cancelled_at),
        (None, None, None)
    );
    let counts = batch.request_counts.clone().unwrap();
    assert_eq!((counts.total, counts.completed, counts.failed), (20, 20, 0));
    assert_eq!(batch.error_file_id, None);
    let output_id = batch.output_file_id.clone().unwrap();
    let output_file = client.files().retrieve(&output_id).await.unwrap();
    assert_eq!(output_file.purpose, OpenAIFilePurpose::BatchOutput);

    let output = records(&client, Some(&output_id)).await;
    assert_eq!(custom_ids(&output, &[]), expected_ids(20));
    let mut usage_total = 0;
    for record in &output {
        assert!(record.id.starts_with("batch_req_"), "{}", record.id);
        assert!(record.error.is_none());
        let response = record.response.as_ref().unwrap();
        assert_eq!(response.status_code, 200);
        assert!(!response.request_id.is_empty());
        let completion: CreateChatCompletionResponse =
            serde_json::from_value(response.body.clone()).unwrap();
        let usage = completion.usage.unwrap();
        usage_total += usage.total_tokens;
        let content = completion.choices[0].message.content.clone().unwrap();
        assert!(content.starts_with("SIM-ANSWER "), "{content}");
    }
    let usage = batch.usage.unwrap();
    assert_eq!(usage.total_tokens, usage_total);

    // An ended batch cannot be cancelled.
    let (status, error) = error_of(
        raw(
            &sim,
            reqwest::Method::POST,
            &format!("/batches/{}/cancel", batch.id),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(error["type"], "invalid_request_error");

    let stats = sim.stats();
    assert_eq!((stats.totals.requests, stats.totals.admitted), (1, 1));
    let batches = stats.batches;
    assert_eq!((batches.created, batches.completed), (1, 1));
    assert_eq!(
        (batches.requests_completed, batches.requests_failed),
        (20, 0)
    );
    assert_eq!(
        u64::from(usage_total),
        batches.prompt_tokens + batches.completion_tokens
    );
    assert_eq!((batches.files_uploaded, batches.enqueued_tokens), (1, 0));
}

#[tokio::test]
async fn batch_answers_match_the_live_endpoint() {
    let sim = spawn(SimConfig::instant()).await.unwrap();
    let client = client(&sim);
    let request = line("only", "the same question", 64);
    let live: Value = raw(&sim, reqwest::Method::POST, "/chat/completions")
        .json(&request["body"])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let file_id = upload(&client, &[request]).await;
    // At a time scale of 0 a batch is over as soon as it exists.
    let batch = create(&client, &file_id).await;
    assert_eq!(batch.status, BatchStatus::Completed);
    let output = records(&client, batch.output_file_id.as_deref()).await;
    let body = &output[0].response.as_ref().unwrap().body;
    for field in ["object", "model", "choices", "usage", "system_fingerprint"] {
        assert_eq!(body[field], live[field], "{field}");
    }
}

#[tokio::test]
async fn a_line_error_rate_fails_requests_into_the_error_file() {
    let failing = |seed| async move {
        let sim = spawn(SimConfig {
            batch_line_error_rate: 0.3,
            seed,
            ..SimConfig::instant()
        })
        .await
        .unwrap();
        let client = client(&sim);
        let mut input = lines(40);
        // Bodies the live endpoint would refuse fail the same way in a batch.
        input.push(line("req-40", "refused [sim:error=400]", 10));
        input.push(json!({
            "custom_id": "req-41", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": []},
        }));
        let file_id = upload(&client, &input).await;
        let batch = create(&client, &file_id).await;
        assert_eq!(batch.status, BatchStatus::Completed);
        let output = records(&client, batch.output_file_id.as_deref()).await;
        let errors = records(&client, batch.error_file_id.as_deref()).await;
        assert_eq!(custom_ids(&output, &errors), expected_ids(42));
        let counts = batch.request_counts.unwrap();
        assert_eq!(
            (counts.total, counts.completed, counts.failed),
            (42, output.len() as u32, errors.len() as u32)
        );

        let mut failed = BTreeMap::new();
        for record in &errors {
            assert!(record.error.is_none());
            let response = record.response.as_ref().unwrap();
            let error = &response.body["error"];
            assert!(error["message"].is_string() && error["type"].is_string());
            failed.insert(record.custom_id.clone(), response.status_code);
        }
        assert_eq!(failed.remove("req-40"), Some(400));
        assert_eq!(failed.remove("req-41"), Some(400));
        assert!(failed.values().all(|status| *status == 500), "{failed:?}");
        // About 30% of the 40 plain requests.
        assert!((5..=20).contains(&failed.len()), "{failed:?}");
        let stats = sim.stats().batches;
        assert_eq!(stats.requests_failed, errors.len() as u64);
        failed.into_keys().collect::<Vec<_>>()
    };
    let first = failing(7).await;
    assert_eq!(
        failing(7).await,
        first,
        "the same seed fails the same requests"
    );
    assert_ne!(failing(8).await, first);
}

#[tokio::test]
async fn cancelling_stops_the_batch_and_keeps_what_was_done() {
    // 20 s to complete: the 100 requests finish one every 180 ms from 1 s on; a cancel takes
    // 10 provider seconds, 0.33 s here.
    let sim = spawn(config(20.0)).await.unwrap();
    let client = client(&sim);
    let file_id = upload(&client, &lines(100)).await;
    let batch = create(&client, &file_id).await;
    wait_until(&client, &batch.id, |batch| {
        batch.request_counts.as_ref().unwrap().completed >= 1
    })
    .await;

    let cancelling = client.batches().cancel(&batch.id).await.unwrap();
    assert_eq!(cancelling.status, BatchStatus::Cancelling);
    assert!(cancelling.cancelling_at.is_some());
    let done = cancelling.request_counts.unwrap().completed;
    assert!((1..100).contains(&done), "{done}");

    let cancelled = wait_for(&client, &batch.id, BatchStatus::Cancelled).await;
    assert!(cancelled.cancelled_at.is_some());
    assert_eq!(cancelled.completed_at, None);
    assert_eq!(cancelled.request_counts.clone().unwrap().completed, done);
    // Cancelling again changes nothing.
    assert_eq!(
        client.batches().cancel(&batch.id).await.unwrap().status,
        BatchStatus::Cancelled
    );

    let output = records(&client, cancelled.output_file_id.as_deref()).await;
    let errors = records(&client, cancelled.error_file_id.as_deref()).await;
    assert_eq!(custom_ids(&output, &errors), expected_ids(100));
    assert_eq!(output.len() as u32, done);
    for record in &errors {
        assert!(record.response.is_none());
        assert_eq!(record.error.as_ref().unwrap().code, "batch_cancelled");
    }
    let stats = sim.stats().batches;
    assert_eq!(
        (stats.cancelled, stats.requests_cancelled),
        (1, 100 - u64::from(done))
    );
}

#[tokio::test]
async fn a_batch_past_its_window_expires() {
    // A 600 s turnaround in a 300 s window: the batch stops halfway through its requests.
    let sim = spawn(SimConfig {
        batch_window_secs: 300.0,
        ..config(1.2)
    })
    .await
    .unwrap();
    let client = client(&sim);
    let file_id = upload(&client, &lines(10)).await;
    let created = create(&client, &file_id).await;

    let batch = wait_for(&client, &created.id, BatchStatus::Expired).await;
    assert!(batch.expired_at.is_some());
    assert_eq!((batch.completed_at, batch.finalizing_at), (None, None));
    let done = batch.request_counts.clone().unwrap().completed;
    assert!((4..=5).contains(&done), "{done}");

    let output = records(&client, batch.output_file_id.as_deref()).await;
    let errors = records(&client, batch.error_file_id.as_deref()).await;
    assert_eq!(custom_ids(&output, &errors), expected_ids(10));
    assert_eq!(output.len() as u32, done);
    for record in &errors {
        let error = record.error.as_ref().unwrap();
        assert_eq!(error.code, "batch_expired");
        assert!(!error.message.is_empty());
    }
    let stats = sim.stats().batches;
    assert_eq!(
        (stats.expired, stats.requests_expired),
        (1, 10 - u64::from(done))
    );
}

#[tokio::test]
async fn the_enqueued_token_limit_fails_a_batch_in_validation() {
    // Each request holds 3 + 4 prompt tokens ("question N") and 100 of max_tokens: 1,070 for a
    // batch of 10, so a second one does not fit in 1,500.
    let sim = spawn(SimConfig {
        batch_queue_tokens: 1_500,
        ..config(6.0)
    })
    .await
    .unwrap();
    let client = client(&sim);
    let file_id = upload(&client, &lines(10)).await;
    let first = create(&client, &file_id).await;
    assert_eq!(sim.stats().batches.enqueued_tokens, 1_070);

    let second = create(&client, &file_id).await;
    assert_eq!(second.status, BatchStatus::Validating);
    assert_eq!(second.errors, None);
    let failed = wait_for(&client, &second.id, BatchStatus::Failed).await;
    assert!(failed.failed_at.is_some());
    let errors = failed.errors.unwrap().data;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].code, "token_limit_exceeded");
    assert_eq!((errors[0].line, errors[0].param.as_deref()), (None, None));
    assert!(
        errors[0]
            .message
            .starts_with("Enqueued token limit reached for gpt-4o-mini"),
        "{}",
        errors[0].message
    );
    assert!(errors[0].message.contains("Limit: 1,500 enqueued tokens"));
    let counts = failed.request_counts.unwrap();
    assert_eq!((counts.total, counts.completed, counts.failed), (0, 0, 0));
    assert_eq!((failed.output_file_id, failed.error_file_id), (None, None));
    assert_eq!(sim.stats().batches.enqueued_tokens, 1_070);

    // Once the first batch has ended its tokens leave the queue.
    client.batches().cancel(&first.id).await.unwrap();
    wait_for(&client, &first.id, BatchStatus::Cancelled).await;
    assert_eq!(sim.stats().batches.enqueued_tokens, 0);
    let third = create(&client, &file_id).await;
    let running = wait_for(&client, &third.id, BatchStatus::InProgress).await;
    assert_eq!(running.errors, None);
    let stats = sim.stats().batches;
    assert_eq!((stats.created, stats.failed, stats.cancelled), (3, 1, 1));
}

#[tokio::test]
async fn a_batch_uses_one_model() {
    let sim = spawn(SimConfig::instant()).await.unwrap();
    let client = client(&sim);
    let mut input = lines(3);
    input[2]["body"]["model"] = json!("gpt-4o");
    let file_id = upload(&client, &input).await;
    let batch = create(&client, &file_id).await;
    assert_eq!(batch.status, BatchStatus::Failed);
    let errors = batch.errors.unwrap().data;
    assert_eq!(errors[0].code, "model_mismatch");
    assert_eq!(errors[0].line, Some(3));
}

#[tokio::test]
async fn a_bad_file_is_refused_naming_the_line() {
    let sim = spawn(SimConfig::instant()).await.unwrap();
    let mut content = jsonl(&lines(1));
    content.extend_from_slice(b"{\"custom_id\": \"req-1\", \"method\": \"POST\",\n");
    let response = raw_upload(&sim, "batch", content).await;
    assert!(!header(&response, "x-request-id").is_empty());
    let (status, error) = error_of(response).await;
    assert_eq!(status, 400);
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["param"], "file");
    assert_eq!(error["code"], "invalid_json_line");
    assert!(
        error["message"].as_str().unwrap().starts_with("Line 2: "),
        "{error}"
    );

    let mut input = lines(3);
    input.push(line("req-1", "again", 10));
    let (status, error) = error_of(raw_upload(&sim, "batch", jsonl(&input)).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("duplicate_custom_id"))
    );
    let message = error["message"].as_str().unwrap();
    assert!(
        message.starts_with("Line 4: ") && message.contains("req-1"),
        "{message}"
    );

    let mut input = lines(2);
    input[1]["url"] = json!("/v1/embeddings");
    let (status, error) = error_of(raw_upload(&sim, "batch", jsonl(&input)).await).await;
    assert_eq!((status, error["code"].as_str()), (400, Some("invalid_url")));

    let (status, error) = error_of(raw_upload(&sim, "fine-tune", jsonl(&lines(1))).await).await;
    assert_eq!((status, error["param"].as_str()), (400, Some("purpose")));
    let (status, _) = error_of(raw_upload(&sim, "batch", Vec::new()).await).await;
    assert_eq!(status, 400);
    let unauthenticated = reqwest::Client::new()
        .post(format!("{}/files", sim.base_url()))
        .multipart(reqwest::multipart::Form::new().text("purpose", "batch"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    assert_eq!(sim.stats().unauthenticated, 1);
    assert_eq!(sim.stats().batches.files_uploaded, 0);
}

#[tokio::test]
async fn unknown_ids_and_bad_batch_requests_are_refused() {
    let sim = spawn(SimConfig::instant()).await.unwrap();
    let client = client(&sim);
    for path in [
        "/files/file-nope",
        "/files/file-nope/content",
        "/batches/batch_nope",
    ] {
        let (status, error) =
            error_of(raw(&sim, reqwest::Method::GET, path).send().await.unwrap()).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(error["type"], "invalid_request_error");
        assert!(error["message"].as_str().unwrap().contains("nope"));
    }
    let (status, _) = api_error(client.batches().retrieve("batch_nope").await);
    assert_eq!(status, 404);

    let file_id = upload(&client, &lines(2)).await;
    // Files and batches belong to the key that made them.
    let other = crate::common::client_with(&sim, "sk-someone-else-0002", Duration::from_secs(5));
    assert_eq!(api_error(other.files().retrieve(&file_id).await).0, 404);

    let create_raw = |body: Value| {
        raw(&sim, reqwest::Method::POST, "/batches")
            .json(&body)
            .send()
    };
    let valid = json!({
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"run": "nightly"},
    });
    let created: Value = create_raw(valid.clone())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(created["metadata"], json!({"run": "nightly"}));
    for (field, value, param) in [
        ("endpoint", json!("/v1/embeddings"), "endpoint"),
        ("completion_window", json!("48h"), "completion_window"),
        ("metadata", json!({"n": 1}), "metadata"),
    ] {
        let mut body = valid.clone();
        body[field] = value;
        let (status, error) = error_of(create_raw(body).await.unwrap()).await;
        assert_eq!((status, error["param"].as_str()), (400, Some(param)));
    }
    let mut body = valid.clone();
    body.as_object_mut().unwrap().remove("endpoint");
    let (status, error) = error_of(create_raw(body).await.unwrap()).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("missing_required_parameter"))
    );
    let mut body = valid.clone();
    body["input_file_id"] = json!("file-nope");
    assert_eq!(error_of(create_raw(body).await.unwrap()).await.0, 404);
    // An output file is not batch input.
    let output_id = created["output_file_id"].as_str().unwrap();
    let mut body = valid.clone();
    body["input_file_id"] = json!(output_id);
    assert_eq!(error_of(create_raw(body).await.unwrap()).await.0, 400);

    let deleted = client.files().delete(&file_id).await.unwrap();
    assert!(deleted.deleted);
    assert_eq!(
        (deleted.id.as_str(), deleted.object.as_str()),
        (file_id.as_str(), "file")
    );
    assert_eq!(api_error(client.files().retrieve(&file_id).await).0, 404);
}

#[tokio::test]
async fn batches_are_listed_newest_first_a_page_at_a_time() {
    let sim = spawn(SimConfig::instant()).await.unwrap();
    let client = client(&sim);
    let file_id = upload(&client, &lines(1)).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(create(&client, &file_id).await.id);
    }
    ids.reverse();
    let page = |query: Vec<(&'static str, String)>| {
        let client = client.clone();
        async move {
            client
                .batches()
                .query(&query)
                .unwrap()
                .list()
                .await
                .unwrap()
        }
    };

    let all = page(vec![]).await;
    assert_eq!(all.object, "list");
    let listed: Vec<String> = all.data.iter().map(|b| b.id.clone()).collect();
    assert_eq!(listed, ids);
    assert!(!all.has_more);

    let first = page(vec![("limit", "2".to_owned())]).await;
    let listed: Vec<String> = first.data.iter().map(|b| b.id.clone()).collect();
    assert_eq!(listed, ids[..2]);
    assert!(first.has_more);
    assert_eq!(first.first_id.as_deref(), Some(ids[0].as_str()));
    assert_eq!(first.last_id.as_deref(), Some(ids[1].as_str()));
    let second = page(vec![("limit", "2".to_owned()), ("after", ids[1].clone())]).await;
    let listed: Vec<String> = second.data.iter().map(|b| b.id.clone()).collect();
    assert_eq!(listed, ids[2..4]);
    assert!(second.has_more);
    let last = page(vec![("limit", "2".to_owned()), ("after", ids[3].clone())]).await;
    let listed: Vec<String> = last.data.iter().map(|b| b.id.clone()).collect();
    assert_eq!(listed, ids[4..]);
    assert!(!last.has_more);

    for limit in ["0", "101", "ten"] {
        let response = raw(
            &sim,
            reqwest::Method::GET,
            &format!("/batches?limit={limit}"),
        )
        .send()
        .await
        .unwrap();
        let (status, error) = error_of(response).await;
        assert_eq!(
            (status, error["param"].as_str()),
            (400, Some("limit")),
            "{limit}"
        );
    }
    let other = crate::common::client_with(&sim, "sk-someone-else-0002", Duration::from_secs(5));
    let theirs = other.batches().list().await.unwrap();
    assert!(theirs.data.is_empty() && theirs.first_id.is_none());

    // Files are listed too, newest first: the five output files, then the input.
    let files: Value = raw(&sim, reqwest::Method::GET, "/files?purpose=batch")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(files["data"].as_array().unwrap().len(), 1);
    assert_eq!(files["data"][0]["id"], file_id);

    sim.reset();
    assert_eq!(api_error(client.batches().retrieve(&ids[0]).await).0, 404);
    assert_eq!(api_error(client.files().retrieve(&file_id).await).0, 404);
    assert_eq!(sim.stats().batches, fanout_sim::BatchStats::default());
}
