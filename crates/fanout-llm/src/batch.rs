//! The provider's Files and Batch APIs, through the same async-openai clients (one per key)
//! and the same send-once HTTP service as live calls: batch input files are uploaded, batches
//! created, polled, cancelled and looked up again after a restart, and their output and error
//! files read back into the same [`ChatResponse`] / [`CallError`] a live call gives.

use std::collections::HashMap;
use std::future::Future;

use async_openai::error::OpenAIError;
use async_openai::traits::RequestOptionsBuilder as _;
use async_openai::types::InputSource;
use async_openai::types::batches::{
    Batch, BatchCompletionWindow, BatchEndpoint, BatchRequest, BatchRequestOutput, BatchStatus,
};
use async_openai::types::chat::CreateChatCompletionResponse;
use async_openai::types::files::{CreateFileRequest, FileInput, FilePurpose};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::client::{ChatRequest, ChatResponse, LlmClient};
use crate::error::{CallError, ErrorKind};
use crate::headers::RateHeaders;

/// The endpoint every line of our batch files asks for.
pub const BATCH_ENDPOINT: &str = "/v1/chat/completions";

/// Where a batch stands, as the provider says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchState {
    Validating,
    InProgress,
    Finalizing,
    Completed,
    Failed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchState {
    /// Nothing more will happen to it: its files (if any) are final.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Expired | Self::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validating => "validating",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }
}

impl From<BatchStatus> for BatchState {
    fn from(s: BatchStatus) -> Self {
        match s {
            BatchStatus::Validating => Self::Validating,
            BatchStatus::InProgress => Self::InProgress,
            BatchStatus::Finalizing => Self::Finalizing,
            BatchStatus::Completed => Self::Completed,
            BatchStatus::Failed => Self::Failed,
            BatchStatus::Expired => Self::Expired,
            BatchStatus::Cancelling => Self::Cancelling,
            BatchStatus::Cancelled => Self::Cancelled,
        }
    }
}

/// What we read of a provider batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchInfo {
    pub id: String,
    pub state: BatchState,
    pub input_file_id: String,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    /// Why a `failed` batch failed: (code, message) per error.
    pub errors: Vec<(String, String)>,
    pub metadata: HashMap<String, String>,
}

impl From<Batch> for BatchInfo {
    fn from(b: Batch) -> Self {
        let metadata = b
            .metadata
            .and_then(|m| serde_json::to_value(m).ok())
            .and_then(|v| match v {
                serde_json::Value::Object(map) => Some(
                    map.into_iter()
                        .filter_map(|(k, v)| v.as_str().map(|v| (k, v.to_owned())))
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default();
        Self {
            id: b.id,
            state: b.status.into(),
            input_file_id: b.input_file_id,
            output_file_id: b.output_file_id,
            error_file_id: b.error_file_id,
            errors: b
                .errors
                .map(|e| e.data.into_iter().map(|e| (e.code, e.message)).collect())
                .unwrap_or_default(),
            metadata,
        }
    }
}

/// How many recent batches / files a lookup after a restart reads.
const LOOKUP_LIMIT: &str = "100";

impl ChatRequest {
    /// One line of a batch input file (without its newline): the live request's body under
    /// `custom_id`.
    pub fn batch_line(&self, custom_id: &str) -> String {
        serde_json::json!({
            "custom_id": custom_id,
            "method": "POST",
            "url": BATCH_ENDPOINT,
            "body": self.to_openai(),
        })
        .to_string()
    }
}

/// One record of a batch's output or error file: whose request (`custom_id`) and what it got,
/// classified like a live call's answer. `None` when the line is not a record at all.
pub fn parse_batch_record(line: &str) -> Option<(String, Result<BatchAnswer, CallError>)> {
    let record: BatchRequestOutput = serde_json::from_str(line).ok()?;
    let outcome = match (record.response, record.error) {
        (Some(response), _) if (200..300).contains(&response.status_code) => {
            serde_json::from_value::<CreateChatCompletionResponse>(response.body)
                .map(|body| BatchAnswer { body })
                .map_err(|e| CallError {
                    status: Some(response.status_code),
                    ..CallError::new(
                        ErrorKind::Decode,
                        format!("batch answer is not a completion: {e}"),
                    )
                })
        }
        (Some(response), _) => {
            let error = response.body.get("error");
            let text = |field: &str| {
                error.and_then(|e| e.get(field)).and_then(|v| match v {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Null => None,
                    other => Some(other.to_string()),
                })
            };
            Err(CallError::from_status(
                response.status_code,
                text("type").as_deref(),
                text("code").as_deref(),
                &text("message").unwrap_or_default(),
                RateHeaders::default(),
            ))
        }
        // Not run: expired or cancelled with the batch. Nothing was wrong with the request.
        (None, Some(error)) => Err(CallError::new(
            ErrorKind::Server,
            format!("{}: {}", error.code, error.message),
        )),
        (None, None) => Err(CallError::new(
            ErrorKind::Decode,
            "batch record has neither a response nor an error",
        )),
    };
    Some((record.custom_id, outcome))
}

/// A completion a batch answered, to be read against its request.
#[derive(Debug, Clone)]
pub struct BatchAnswer {
    body: CreateChatCompletionResponse,
}

impl BatchAnswer {
    /// The answer as a live call's response would be; `latency` is how long the batch took.
    pub fn into_response(
        self,
        req: &ChatRequest,
        latency: std::time::Duration,
    ) -> Result<ChatResponse, CallError> {
        ChatResponse::from_openai(self.body, req, latency, RateHeaders::default())
    }
}

/// The least time a file transfer (a batch input file up, an output file down: up to 200 MB)
/// gets, whatever the per-call timeout.
const MIN_FILE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

impl LlmClient {
    /// How long a Files or Batch API request may take.
    pub fn file_timeout(&self) -> std::time::Duration {
        self.request_timeout().max(MIN_FILE_TIMEOUT)
    }

    /// Runs one Files or Batch API request with key `key_name`, within the request timeout,
    /// classifying a failure like a live call's (the key never appears in the message).
    async fn batch_api<'a, T, F, Fut>(&'a self, key_name: &str, op: F) -> Result<T, CallError>
    where
        F: FnOnce(&'a async_openai::Client<async_openai::config::OpenAIConfig>) -> Fut,
        Fut: Future<Output = Result<T, OpenAIError>> + 'a,
    {
        let Some(key) = self.key(key_name) else {
            return Err(CallError::new(
                ErrorKind::Unauthorized,
                format!("no api key named `{key_name}` is configured"),
            ));
        };
        match tokio::time::timeout(self.file_timeout(), op(&key.client)).await {
            Err(_) => Err(CallError::timeout(
                self.file_timeout(),
                None,
                RateHeaders::default(),
            )),
            Ok(Err(e)) => {
                Err(CallError::from_openai(e, None, RateHeaders::default())
                    .redact(key.secret.expose()))
            }
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Uploads a batch input file named `filename`; returns its file id.
    pub async fn upload_batch_file(
        &self,
        key: &str,
        filename: &str,
        content: Vec<u8>,
    ) -> Result<String, CallError> {
        let request = CreateFileRequest {
            file: FileInput {
                source: InputSource::VecU8 {
                    filename: filename.to_owned(),
                    vec: content,
                },
            },
            purpose: FilePurpose::Batch,
            expires_after: None,
        };
        self.batch_api(key, |c| async move { c.files().create(request).await })
            .await
            .map(|f| f.id)
    }

    /// The id of a batch file named `filename` uploaded earlier (among the most recent),
    /// for a submitter that stopped before it recorded the upload.
    pub async fn find_batch_file(
        &self,
        key: &str,
        filename: &str,
    ) -> Result<Option<String>, CallError> {
        let files = self
            .batch_api(key, |c| async move {
                c.files()
                    .query(&[("purpose", "batch"), ("limit", LOOKUP_LIMIT)])?
                    .list()
                    .await
            })
            .await?;
        Ok(files
            .data
            .into_iter()
            .find(|f| f.filename == filename)
            .map(|f| f.id))
    }

    /// Creates a batch of `input_file_id`'s chat requests with the 24 h window, tagged with
    /// `metadata`.
    pub async fn create_batch(
        &self,
        key: &str,
        input_file_id: &str,
        metadata: &[(&str, &str)],
    ) -> Result<BatchInfo, CallError> {
        let request = BatchRequest {
            input_file_id: input_file_id.to_owned(),
            endpoint: BatchEndpoint::V1ChatCompletions,
            completion_window: BatchCompletionWindow::W24H,
            metadata: Some(
                metadata
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
                    .collect(),
            ),
            output_expires_after: None,
        };
        self.batch_api(key, |c| async move { c.batches().create(request).await })
            .await
            .map(BatchInfo::from)
    }

    /// A batch created earlier whose metadata has `name` = `value` (among the most recent),
    /// for a submitter that stopped before it recorded the batch id.
    pub async fn find_batch(
        &self,
        key: &str,
        name: &str,
        value: &str,
    ) -> Result<Option<BatchInfo>, CallError> {
        let batches = self
            .batch_api(key, |c| async move {
                c.batches().query(&[("limit", LOOKUP_LIMIT)])?.list().await
            })
            .await?;
        Ok(batches
            .data
            .into_iter()
            .map(BatchInfo::from)
            .find(|b| b.metadata.get(name).map(String::as_str) == Some(value)))
    }

    pub async fn retrieve_batch(&self, key: &str, batch_id: &str) -> Result<BatchInfo, CallError> {
        self.batch_api(key, |c| async move { c.batches().retrieve(batch_id).await })
            .await
            .map(BatchInfo::from)
    }

    pub async fn cancel_batch(&self, key: &str, batch_id: &str) -> Result<BatchInfo, CallError> {
        self.batch_api(key, |c| async move { c.batches().cancel(batch_id).await })
            .await
            .map(BatchInfo::from)
    }

    /// The content of a file (a batch's output or error file: JSON lines).
    pub async fn file_content(&self, key: &str, file_id: &str) -> Result<Bytes, CallError> {
        self.batch_api(key, |c| async move { c.files().content(file_id).await })
            .await
    }

    pub async fn delete_file(&self, key: &str, file_id: &str) -> Result<(), CallError> {
        self.batch_api(key, |c| async move { c.files().delete(file_id).await })
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> ChatRequest {
        ChatRequest {
            model: "gpt-4o-mini".into(),
            system: None,
            user: "hi".into(),
            max_tokens: 20,
            temperature: None,
        }
    }

    #[test]
    fn a_line_is_the_live_body_under_its_custom_id() {
        let line: serde_json::Value =
            serde_json::from_str(&req().batch_line("r1:persona[0]")).unwrap();
        assert_eq!(line["custom_id"], "r1:persona[0]");
        assert_eq!(line["url"], BATCH_ENDPOINT);
        assert_eq!(line["body"]["max_tokens"], 20);
        assert_eq!(line["body"]["messages"][0]["content"], "hi");
    }

    #[test]
    fn records_are_classified_like_live_answers() {
        let ok = r#"{"id":"b1","custom_id":"a","response":{"status_code":200,"request_id":"x","body":{"id":"c","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"yes"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}},"error":null}"#;
        let (id, answer) = parse_batch_record(ok).unwrap();
        assert_eq!(id, "a");
        let resp = answer
            .unwrap()
            .into_response(&req(), std::time::Duration::from_secs(1))
            .unwrap();
        assert_eq!((resp.text.as_str(), resp.prompt_tokens), ("yes", 3));

        let server = r#"{"id":"b2","custom_id":"b","response":{"status_code":500,"request_id":"x","body":{"error":{"message":"boom","type":"server_error","code":null}}},"error":null}"#;
        let (_, e) = parse_batch_record(server).unwrap();
        let e = e.unwrap_err();
        assert!(e.is_retryable() && e.status == Some(500), "{e:?}");

        let context = r#"{"id":"b3","custom_id":"c","response":{"status_code":400,"request_id":"x","body":{"error":{"message":"too long","type":"invalid_request_error","code":"context_length_exceeded"}}},"error":null}"#;
        let e = parse_batch_record(context).unwrap().1.unwrap_err();
        assert_eq!(e.kind, ErrorKind::ContextLength);
        assert!(!e.is_retryable());

        let expired = r#"{"id":"b4","custom_id":"d","response":null,"error":{"code":"batch_expired","message":"late"}}"#;
        let e = parse_batch_record(expired).unwrap().1.unwrap_err();
        assert!(
            e.is_retryable() && e.message.starts_with("batch_expired"),
            "{e:?}"
        );

        assert!(parse_batch_record("not json").is_none());
    }
}
