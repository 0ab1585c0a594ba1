//! The JSON bodies of the API that exist only here. Each derives its OpenAPI schema
//! (`ToSchema`). A report and its events are served as they are:
//! [`fanout_aggregator::ReportView`] and [`fanout_aggregator::ReportEvent`] derive their own
//! schemas, as do the wire enums of fanout-core ([`Lane`], [`ReportStatus`], …).

use fanout_core::{InputKind, InputSpec, ItemSpec, Lane, ReportStatus, Template};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa::openapi::schema::{Object, ObjectBuilder, SchemaType, Type};

use crate::{BatchApiChoice, SubmitRequest};

/// `POST /v1/reports`: a report from a template and its inputs. Its schema in
/// `/openapi.json` is refined per template (one alternative per template, with that
/// template's inputs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    /// A template name, as listed by `GET /v1/templates`.
    #[schema(example = "persona-panel")]
    pub template: String,
    /// The template's inputs: an object with the fields the template declares.
    #[schema(value_type = Object)]
    pub inputs: serde_json::Value,
    /// Queue lane: `interactive` (a user is waiting; claimed first) or `batch`. Default: the
    /// template's lane.
    #[serde(default)]
    pub lane: Option<Lane>,
    /// A second submit with the same key (per tenant) answers 200 with the first report
    /// instead of creating another; also heals a submit that failed half-way (503).
    /// 1 to 200 printable ASCII characters.
    #[serde(default)]
    #[schema(pattern = "^[\\x21-\\x7e]{1,200}$", max_length = 200, min_length = 1)]
    pub idempotency_key: Option<String>,
    /// Where to POST the final report JSON when the report finishes (signed, see the
    /// webhooks section of the crate README). An http(s) URL without user info whose host
    /// resolves to public addresses only (internal receivers: `webhooks.allow_hosts`).
    #[serde(default)]
    // The same as `crate::target::CALLBACK_URL_PATTERN` (a test checks).
    #[schema(
        pattern = r"^https?://((([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)|((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9]))(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?([/?][!-~]*)?$"
    )]
    pub callback_url: Option<String>,
    /// Run the sections through the provider's Batch API (half the price, answers within 24
    /// hours, sooner in practice): `true`, or `{"deadline_secs": N}` to have the report
    /// finished within N seconds (1 to 2592000) of the submit (sections a batch would not
    /// answer in time run as live calls); `false` for live calls. Default: the template's
    /// `batch_api` (and `batch_deadline_secs`).
    #[serde(default)]
    #[schema(schema_with = batch_api_schema)]
    pub batch_api: Option<BatchApiChoice>,
}

/// `batch_api`'s schema: a boolean, or an object with an optional `deadline_secs`.
fn batch_api_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{AdditionalProperties, OneOfBuilder, Type};
    let deadline = ObjectBuilder::new()
        .schema_type(SchemaType::Array(vec![Type::Integer, Type::Null]))
        .minimum(Some(1))
        .maximum(Some(fanout_core::template::MAX_BATCH_DEADLINE_SECS))
        .description(Some(
            "Seconds after the submit by which the report must be finished.",
        ))
        .build();
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(SchemaType::Type(Type::Boolean))
                .build(),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(SchemaType::Type(Type::Object))
                .property("deadline_secs", deadline)
                .additional_properties(Some(AdditionalProperties::FreeForm(false)))
                .build(),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(SchemaType::Type(Type::Null))
                .build(),
        )
        .build()
        .into()
}

impl From<SubmitBody> for SubmitRequest {
    fn from(b: SubmitBody) -> Self {
        let SubmitBody {
            template,
            inputs,
            lane,
            idempotency_key,
            callback_url,
            batch_api,
        } = b;
        Self {
            template,
            inputs,
            lane,
            idempotency_key,
            callback_url,
            batch_api,
        }
    }
}

/// Links to a report's resources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Links {
    /// `GET` (view), `DELETE` (cancel).
    #[serde(rename = "self")]
    #[schema(example = "/v1/reports/0190f5d2-6f5b-7c2e-9a51-3c2d1e0f9a8b")]
    pub this: String,
    /// Server-Sent Events of the report's progress.
    pub events: String,
    /// The assembled document as JSON.
    pub report: String,
    /// The assembled document as Markdown.
    pub markdown: String,
}

impl Links {
    pub fn for_report(id: &str) -> Self {
        Self {
            this: format!("/v1/reports/{id}"),
            events: format!("/v1/reports/{id}/events"),
            report: format!("/v1/reports/{id}/report.json"),
            markdown: format!("/v1/reports/{id}/report.md"),
        }
    }
}

/// A submitted report: 202 when it was created, 200 when the idempotency key matched an
/// earlier report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub id: String,
    pub status: ReportStatus,
    /// The idempotency key matched an earlier report; nothing new was created.
    pub duplicate: bool,
    /// Jobs (provider calls) in the report.
    pub jobs: usize,
    pub links: Links,
    /// What the caller should know though the report was accepted, e.g. that no worker is
    /// alive to run it yet.
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// `GET /v1/reports`: one page of the caller's reports, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReportList {
    pub reports: Vec<fanout_aggregator::ReportSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "1764500000000.0190f5d2-6f5b-7c2e-9a51-3c2d1e0f9a8b")]
    pub next_cursor: Option<String>,
}

/// A report whose cancellation was requested (`DELETE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReportRef {
    pub id: String,
    pub status: ReportStatus,
    pub links: Links,
}

/// A template a report can be made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TemplateInfo {
    pub name: String,
    pub title: String,
    pub description: String,
    /// The lane of its reports unless the request says otherwise.
    pub lane: Lane,
    /// Its reports run through the provider's Batch API unless the request says otherwise.
    #[serde(default)]
    pub batch_api: bool,
    /// The deadline (seconds after the submit) of its batch reports unless the request sets
    /// one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_deadline_secs: Option<u64>,
    /// The inputs a request gives.
    pub inputs: Vec<InputInfo>,
    /// Its sections, in report order.
    pub sections: Vec<SectionInfo>,
}

/// One input of a template (or one field of an object input).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InputInfo {
    pub name: String,
    #[schema(schema_with = input_kind_schema)]
    pub kind: InputKind,
    pub required: bool,
    pub description: String,
    /// Lists only: the most items accepted.
    pub max_items: Option<usize>,
    /// Strings and text only: the most characters accepted.
    pub max_chars: Option<usize>,
    /// Lists only: the shape of each item.
    #[schema(no_recursion)]
    pub items: Option<ItemInfo>,
    /// Objects only: their fields.
    #[schema(no_recursion)]
    pub fields: Vec<InputInfo>,
}

/// The shape of the items of a list input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ItemInfo {
    #[schema(schema_with = input_kind_schema)]
    pub kind: InputKind,
    pub max_chars: Option<usize>,
    #[schema(no_recursion)]
    pub fields: Vec<InputInfo>,
}

/// One section of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SectionInfo {
    pub id: String,
    pub title: String,
    /// Sections whose output this one reads.
    pub depends_on: Vec<String>,
    /// The list input it runs once per item of.
    pub for_each: Option<String>,
    /// The report can complete without it.
    pub optional: bool,
}

impl From<&Template> for TemplateInfo {
    fn from(t: &Template) -> Self {
        Self {
            name: t.name.clone(),
            title: t.title.clone(),
            description: t.description.clone(),
            lane: t.default_lane(),
            batch_api: t.batch_api,
            batch_deadline_secs: t.batch_deadline_secs,
            inputs: t.inputs.iter().map(InputInfo::from).collect(),
            sections: t
                .sections
                .iter()
                .map(|s| SectionInfo {
                    id: s.id.clone(),
                    title: s.title.clone(),
                    depends_on: s.depends_on.clone(),
                    for_each: s.for_each.clone(),
                    optional: s.optional,
                })
                .collect(),
        }
    }
}

impl From<&InputSpec> for InputInfo {
    fn from(i: &InputSpec) -> Self {
        let InputSpec {
            name,
            kind,
            required,
            description,
            max_items,
            max_chars,
            items,
            fields,
        } = i;
        Self {
            name: name.clone(),
            kind: *kind,
            required: *required,
            description: description.clone(),
            max_items: *max_items,
            max_chars: *max_chars,
            items: items.as_deref().map(ItemInfo::from),
            fields: fields.iter().map(InputInfo::from).collect(),
        }
    }
}

impl From<&ItemSpec> for ItemInfo {
    fn from(i: &ItemSpec) -> Self {
        let ItemSpec {
            kind,
            max_chars,
            fields,
        } = i;
        Self {
            kind: *kind,
            max_chars: *max_chars,
            fields: fields.iter().map(InputInfo::from).collect(),
        }
    }
}

/// `GET /healthz`, `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: String,
}

// The schema of `InputKind` (fanout-core's template enum), built from its list of names.

pub(crate) const INPUT_KINDS: [InputKind; 6] = [
    InputKind::String,
    InputKind::Text,
    InputKind::List,
    InputKind::Object,
    InputKind::Number,
    InputKind::Bool,
];

/// The wire name of an input kind (exhaustive: a new kind does not compile until listed).
pub(crate) fn input_kind_name(k: InputKind) -> &'static str {
    match k {
        InputKind::String => "string",
        InputKind::Text => "text",
        InputKind::List => "list",
        InputKind::Object => "object",
        InputKind::Number => "number",
        InputKind::Bool => "bool",
    }
}

fn input_kind_schema() -> Object {
    let names = INPUT_KINDS.iter().map(|k| input_kind_name(*k).into());
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::String))
        .enum_values(Some(names.collect::<Vec<serde_json::Value>>()))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_kind_names_are_the_serde_names() {
        for k in INPUT_KINDS {
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::Value::from(input_kind_name(k))
            );
        }
    }

    #[test]
    fn submit_body_is_the_shape_of_submit_request() {
        let req = SubmitRequest {
            template: "t".into(),
            inputs: serde_json::json!({"a": 1}),
            lane: Some(Lane::Batch),
            idempotency_key: Some("k".into()),
            callback_url: None,
            batch_api: Some(crate::BatchApiChoice::On {
                deadline_secs: Some(3600),
            }),
        };
        let body: SubmitBody = serde_json::from_value(serde_json::to_value(&req).unwrap()).unwrap();
        let back = SubmitRequest::from(body.clone());
        assert_eq!(back.lane, Some(Lane::Batch));
        assert_eq!(
            back.batch_api,
            Some(crate::BatchApiChoice::On {
                deadline_secs: Some(3600)
            })
        );
        assert_eq!(body.template, "t");
        for (json, choice) in [
            (serde_json::json!(false), crate::BatchApiChoice::Off),
            (
                serde_json::json!(true),
                crate::BatchApiChoice::On {
                    deadline_secs: None,
                },
            ),
            (
                serde_json::json!({"deadline_secs": 60}),
                crate::BatchApiChoice::On {
                    deadline_secs: Some(60),
                },
            ),
        ] {
            assert_eq!(serde_json::to_value(choice).unwrap(), json);
            assert_eq!(
                serde_json::from_value::<crate::BatchApiChoice>(json).unwrap(),
                choice
            );
        }
        let e = serde_json::from_value::<crate::BatchApiChoice>(serde_json::json!("yes"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("true, false, or an object"), "{e}");
    }

    #[test]
    fn the_api_schema_states_the_same_pattern() {
        use utoipa::OpenApi as _;
        let doc = serde_json::to_value(crate::api::openapi::ApiDoc::openapi()).unwrap();
        let text = doc.to_string();
        let quoted = serde_json::to_string(crate::target::CALLBACK_URL_PATTERN).unwrap();
        assert!(
            text.contains(&quoted),
            "the schema's callback_url pattern differs"
        );
    }
}
