//! The OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]` attributes and the
//! DTOs' `ToSchema` derives, then refined with what only exists at run time: the request body
//! gets one alternative per loaded template, with that template's inputs as a JSON Schema
//! that says exactly what the producer's validation accepts; and without tokens the security
//! requirements are removed.

use fanout_aggregator::{ReportEvent, ReportView, SectionView, Totals};
use fanout_core::{InputKind, InputSpec, ItemSpec, Lane, ReportStatus, SectionState, Template};
use serde_json::{Map, Value, json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::dto::{self, input_kind_name};
use super::error::{ErrorBody, ErrorDetail};
use super::{routes, sse};
use crate::Templates;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Fanout API",
        description = "Submit LLM reports (a startup-idea report, a persona panel, …), follow \
            their progress live, read the assembled result. Every error is \
            `{\"error\": {\"code\", \"message\", \"field\"}}`."
    ),
    paths(
        routes::submit,
        routes::get_report,
        routes::cancel,
        sse::events,
        routes::document,
        routes::templates,
        routes::healthz,
        routes::readyz,
        routes::metrics,
        routes::openapi_json,
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        dto::SubmitBody,
        dto::Accepted,
        dto::ReportRef,
        dto::Links,
        ReportView,
        SectionView,
        Totals,
        ReportEvent,
        ReportStatus,
        SectionState,
        Lane,
        dto::TemplateInfo,
        dto::InputInfo,
        dto::ItemInfo,
        dto::SectionInfo,
        dto::Health,
        routes::DocFormat,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "reports", description = "Submit, follow, read and cancel reports"),
        (name = "templates", description = "What can be submitted"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
    )
)]
pub(crate) struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A token from FANOUT_API_TOKENS; it names the tenant"))
                    .build(),
            ),
        );
    }
}

/// The document this API serves at `/openapi.json`.
pub(crate) fn document(templates: &Templates, auth: bool) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the openapi document serializes");
    doc["info"]["version"] = Value::from(env!("CARGO_PKG_VERSION"));
    refine_submit_body(&mut doc, templates);
    describe_event_stream(&mut doc);
    non_null_parameters(&mut doc);
    if !auth {
        strip_security(&mut doc);
    }
    doc
}

/// `SubmitBody` becomes `oneOf` its derived schema specialised to each template: `template`
/// is that name, `inputs` that template's inputs.
fn refine_submit_body(doc: &mut Value, templates: &Templates) {
    let Some(base) = doc.pointer("/components/schemas/SubmitBody").cloned() else {
        return;
    };
    let variants: Vec<Value> = templates
        .iter()
        .map(|t| {
            let mut v = base.clone();
            v["title"] = Value::from(t.name.as_str());
            v["properties"]["template"] = json!({
                "type": "string",
                "const": t.name,
                "description": t.title,
            });
            v["properties"]["inputs"] = inputs_schema(t);
            v
        })
        .collect();
    let mut refined = Map::new();
    if let Some(d) = base.get("description") {
        refined.insert("description".into(), d.clone());
    }
    refined.insert("oneOf".into(), Value::Array(variants));
    doc["components"]["schemas"]["SubmitBody"] = Value::Object(refined);
}

/// The JSON Schema of a template's inputs, mirroring `Template::validate_inputs`: unknown
/// fields are rejected, required fields must be present and not null, required strings must
/// not be blank, required lists must not be empty, list items must not be null.
pub(crate) fn inputs_schema(t: &Template) -> Value {
    let mut s = fields_schema(&t.inputs, true);
    s["description"] = Value::from(format!("Inputs of the `{}` template.", t.name));
    s
}

fn fields_schema(specs: &[InputSpec], closed: bool) -> Value {
    let mut properties = Map::new();
    let mut required = Vec::new();
    for spec in specs {
        let mut field = shape_schema(
            spec.kind,
            spec.required,
            spec.max_chars,
            spec.max_items,
            spec.items.as_deref(),
            &spec.fields,
        );
        if !spec.description.is_empty() {
            field["description"] = Value::from(spec.description.as_str());
        }
        if spec.required {
            required.push(Value::from(spec.name.as_str()));
        } else if let Some(ty) = field.get("type").cloned() {
            // An optional input may be null.
            field["type"] = json!([ty, "null"]);
        }
        properties.insert(spec.name.clone(), field);
    }
    let mut s = json!({ "type": "object", "properties": properties });
    if !required.is_empty() {
        s["required"] = Value::Array(required);
    }
    if closed {
        s["additionalProperties"] = Value::Bool(false);
    }
    s
}

fn shape_schema(
    kind: InputKind,
    required: bool,
    max_chars: Option<usize>,
    max_items: Option<usize>,
    items: Option<&ItemSpec>,
    fields: &[InputSpec],
) -> Value {
    let mut s = match kind {
        InputKind::String | InputKind::Text => {
            let mut s = json!({ "type": "string" });
            // No control or bidi characters (text keeps tab and line breaks) and, when
            // required, not blank: what validation accepts.
            s["pattern"] = Value::from(fanout_core::template::string_pattern(
                kind == InputKind::Text,
                required,
            ));
            if required {
                s["minLength"] = Value::from(1);
            }
            if let Some(max) = max_chars {
                s["maxLength"] = Value::from(max);
            }
            s
        }
        InputKind::Number => json!({ "type": "number" }),
        InputKind::Bool => json!({ "type": "boolean" }),
        InputKind::List => {
            let item = match items {
                Some(i) => shape_schema(i.kind, true, i.max_chars, None, None, &i.fields),
                None => json!({ "not": { "type": "null" } }),
            };
            let mut s = json!({ "type": "array", "items": item });
            if required {
                s["minItems"] = Value::from(1);
            }
            if let Some(max) = max_items {
                s["maxItems"] = Value::from(max);
            }
            s
        }
        InputKind::Object => {
            if fields.is_empty() {
                json!({ "type": "object" })
            } else {
                fields_schema(fields, true)
            }
        }
    };
    s["x-fanout-kind"] = Value::from(input_kind_name(kind));
    s
}

/// Each event of `GET /v1/reports/{id}/events`, as OpenAPI 3.1 describes an event stream:
/// an object of `id`, `event` and `data`, with `data` a JSON document whose schema depends on
/// the event (progress events: `ReportEvent`; `report`: the report JSON; `error`: `ErrorBody`).
fn describe_event_stream(doc: &mut Value) {
    let schemas = &doc["components"]["schemas"];
    let event_body = schemas["ReportEvent"].clone();
    let mut error_body = schemas["ErrorBody"].clone();
    // Inline ErrorDetail: the content schema is validated on its own, without the document.
    error_body["properties"]["error"] = schemas["ErrorDetail"].clone();
    let json_data = |schema: Value| {
        json!({
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": schema,
        })
    };
    let stream_id = json!({ "type": "string", "pattern": "^[0-9]{1,19}-[0-9]{1,19}$" });
    let schema = json!({
        "type": "object",
        "description": "One Server-Sent Event.",
        "required": ["event", "data"],
        "properties": {
            "id": stream_id,
            "event": { "type": "string" },
            "data": { "type": "string" },
            "retry": { "type": "integer" },
        },
        "oneOf": [
            {
                "description": "A progress event; `event` is its kind.",
                "properties": {
                    "event": { "not": { "enum": [sse::REPORT_EVENT, sse::ERROR_EVENT] } },
                    "data": json_data(event_body),
                },
            },
            {
                "description": "The last event: the final report JSON.",
                "properties": {
                    "event": { "const": sse::REPORT_EVENT },
                    "data": json_data(json!({ "type": "object" })),
                },
            },
            {
                "description": "The stream cannot go on (Redis failed); reconnect with Last-Event-ID.",
                "properties": {
                    "event": { "const": sse::ERROR_EVENT },
                    "data": json_data(error_body),
                },
            },
        ],
    });
    let pointer = "/paths/~1v1~1reports~1{id}~1events/get/responses/200/content/text~1event-stream";
    if let Some(media) = doc.pointer_mut(pointer) {
        media["schema"] = schema;
    }
}

/// Parameters are strings in a URL or a header: an absent one is left out, never `null`.
fn non_null_parameters(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for item in paths.values_mut() {
        let Some(ops) = item.as_object_mut() else {
            continue;
        };
        for op in ops.values_mut() {
            let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) else {
                continue;
            };
            for p in params {
                if let Some(Value::Array(types)) = p.pointer_mut("/schema/type") {
                    types.retain(|t| t != "null");
                    if types.len() == 1 {
                        let t = types[0].clone();
                        p["schema"]["type"] = t;
                    }
                }
            }
        }
    }
}

fn strip_security(doc: &mut Value) {
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for item in paths.values_mut() {
            if let Some(ops) = item.as_object_mut() {
                for op in ops.values_mut() {
                    if let Some(op) = op.as_object_mut() {
                        op.remove("security");
                    }
                }
            }
        }
    }
    if let Some(c) = doc.get_mut("components").and_then(Value::as_object_mut) {
        c.remove("securitySchemes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_names_every_route_and_refines_the_body_per_template() {
        let templates = Templates::builtin();
        let doc = document(&templates, true);
        for path in [
            "/v1/reports",
            "/v1/reports/{id}",
            "/v1/reports/{id}/events",
            "/v1/reports/{id}/report",
            "/v1/templates",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} missing");
        }
        let body = &doc["components"]["schemas"]["SubmitBody"];
        let variants = body["oneOf"].as_array().unwrap();
        assert_eq!(variants.len(), templates.names().len());
        let panel = variants
            .iter()
            .find(|v| v["properties"]["template"]["const"] == "persona-panel")
            .unwrap();
        assert_eq!(panel["additionalProperties"], false);
        let inputs = &panel["properties"]["inputs"];
        assert_eq!(inputs["additionalProperties"], false);
        assert!(
            inputs["required"]
                .as_array()
                .unwrap()
                .contains(&json!("personas"))
        );
        let name = &inputs["properties"]["personas"]["items"]["properties"]["name"];
        assert_eq!(name["maxLength"], 120);
        assert_eq!(
            name["pattern"],
            fanout_core::template::string_pattern(false, true)
        );
        assert!(doc["components"]["securitySchemes"].get("bearer").is_some());
        assert!(
            doc["paths"]["/v1/reports"]["post"]
                .get("security")
                .is_some()
        );

        let events = &doc["paths"]["/v1/reports/{id}/events"]["get"];
        let stream = &events["responses"]["200"]["content"]["text/event-stream"]["schema"];
        assert_eq!(stream["oneOf"].as_array().unwrap().len(), 3);
        let progress = &stream["oneOf"][0]["properties"]["data"]["contentSchema"];
        assert_eq!(
            progress["properties"]["kind"]["type"], "string",
            "{progress}"
        );

        // The report is the aggregator's view, its enums fanout-core's wire names.
        let schemas = &doc["components"]["schemas"];
        let report = &schemas["ReportView"]["properties"];
        assert_eq!(
            report["status"]["$ref"],
            "#/components/schemas/ReportStatus"
        );
        assert_eq!(
            report["sections"]["items"]["$ref"],
            "#/components/schemas/SectionView"
        );
        assert!(
            schemas["ReportStatus"]["enum"]
                .as_array()
                .unwrap()
                .contains(&json!("completed_with_failures"))
        );
        assert_eq!(
            doc["paths"]["/v1/reports/{id}"]["get"]["responses"]["200"]["content"]["application/json"]
                ["schema"]["$ref"],
            "#/components/schemas/ReportView"
        );
        for p in events["parameters"].as_array().unwrap() {
            assert!(!p["schema"]["type"].to_string().contains("null"), "{p}");
        }

        let open = document(&templates, false);
        assert!(
            open["paths"]["/v1/reports"]["post"]
                .get("security")
                .is_none()
        );
    }
}
