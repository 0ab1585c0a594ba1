//! The OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]` attributes and the
//! DTOs' `ToSchema` derives, then refined with what only exists at run time: the request body
//! gets one alternative per loaded template, with that template's inputs as a JSON Schema
//! that says exactly what the producer's validation accepts; and without tokens the security
//! requirements are removed.
//!
//! Generated clients (openapi-python-client, openapi-typescript; `scripts/generated-clients.sh`)
//! need every object they should name to be a component: inline alternatives and inline
//! objects get names invented by each generator, which collide. So each template's body,
//! its inputs and their nested objects are named components, and each response has one
//! content type.

use fanout_aggregator::{
    DocumentSection, ForEachSection, JobSection, ReportDocument, ReportEvent, ReportView,
    SectionView, Totals,
};
use fanout_core::{InputKind, InputSpec, ItemSpec, Lane, ReportStatus, SectionState, Template};
use serde_json::{Map, Value, json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::dto::{self, input_kind_name};
use super::error::{ErrorBody, ErrorDetail};
use super::{admin, routes, sse};
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
        routes::list_reports,
        routes::get_report,
        routes::cancel,
        sse::events,
        routes::document_json,
        routes::document_md,
        routes::templates,
        admin::status,
        admin::dead_letters,
        admin::replay,
        admin::drop_dead_letters,
        admin::drop_dead_letter,
        admin::dead_webhooks,
        admin::redeliver_webhooks,
        admin::drop_webhooks,
        routes::healthz,
        routes::readyz,
        routes::metrics,
        routes::openapi_json,
    ),
    components(schemas(
        ErrorBody,
        crate::ops::SystemStatus,
        crate::ops::LaneStatus,
        crate::ops::BudgetStatus,
        crate::ops::WebhookOutbox,
        crate::ops::BatchApiStatus,
        fanout_queue::WorkerInfo,
        crate::ops::DeadLetterInfo,
        crate::ops::DeadLetterSelection,
        crate::ops::DeadWebhookInfo,
        crate::ops::Resolution,
        crate::ops::ResolutionOutcome,
        admin::DeadLetterList,
        admin::DeadWebhookList,
        admin::Resolutions,
        admin::WebhookSelection,
        ErrorDetail,
        dto::SubmitBody,
        dto::Accepted,
        dto::ReportRef,
        dto::Links,
        dto::ReportList,
        fanout_aggregator::ReportSummary,
        ReportView,
        SectionView,
        Totals,
        ReportDocument,
        DocumentSection,
        JobSection,
        ForEachSection,
        ReportEvent,
        ReportStatus,
        SectionState,
        Lane,
        dto::TemplateInfo,
        dto::InputInfo,
        dto::ItemInfo,
        dto::SectionInfo,
        dto::Health,
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
    pin_document_sections(&mut doc);
    non_null_parameters(&mut doc);
    if !auth {
        strip_security(&mut doc);
    }
    doc
}

/// `SubmitBody` becomes `oneOf` its derived schema specialised to each template, told apart
/// by `template`: each alternative is a component (`SubmitPersonaPanel`, …) whose `template`
/// is that name and whose `inputs` are that template's inputs, a component too
/// (`PersonaPanelInputs`, with its nested objects named after their paths).
fn refine_submit_body(doc: &mut Value, templates: &Templates) {
    let Some(base) = doc.pointer("/components/schemas/SubmitBody").cloned() else {
        return;
    };
    // The derived schemas' names, which a template's may not take.
    let mut components: Map<String, Value> = doc["components"]["schemas"]
        .as_object()
        .map(|m| m.keys().map(|k| (k.clone(), Value::Null)).collect())
        .unwrap_or_default();
    let mut variants = Vec::new();
    let mut mapping = Map::new();
    for t in templates.iter() {
        let stem = pascal_case(&t.name);
        let name = unique(&format!("Submit{stem}"), &components);
        components.insert(name.clone(), Value::Null);
        let inputs_name = unique(&format!("{stem}Inputs"), &components);
        components.insert(inputs_name.clone(), Value::Null);
        let mut inputs = inputs_schema(t);
        name_objects(&mut inputs, &inputs_name, &mut components);
        components.insert(inputs_name.clone(), inputs);

        let mut v = base.clone();
        v["title"] = Value::from(name.as_str());
        v["description"] = Value::from(format!("A `{}` report: {}", t.name, t.title));
        v["properties"]["template"] = json!({
            "type": "string",
            "const": t.name,
            "description": t.title,
        });
        v["properties"]["inputs"] = schema_ref(&inputs_name);
        components.insert(name.clone(), v);
        mapping.insert(t.name.clone(), Value::from(ref_path(&name)));
        variants.push(schema_ref(&name));
    }
    let mut refined = Map::new();
    if let Some(d) = base.get("description") {
        refined.insert("description".into(), d.clone());
    }
    refined.insert("oneOf".into(), Value::Array(variants));
    refined.insert(
        "discriminator".into(),
        json!({ "propertyName": "template", "mapping": mapping }),
    );
    let schemas = &mut doc["components"]["schemas"];
    schemas["SubmitBody"] = Value::Object(refined);
    for (name, schema) in components {
        if !schema.is_null() {
            schemas[name.as_str()] = schema;
        }
    }
}

/// `name`, or `name2`, `name3`, … when `taken` has it (two templates whose names differ only
/// in punctuation, or a template named like a derived schema).
fn unique(name: &str, taken: &Map<String, Value>) -> String {
    std::iter::once(name.to_owned())
        .chain((2..).map(|n| format!("{name}{n}")))
        .find(|n| !taken.contains_key(n))
        .expect("an unused name")
}

fn ref_path(name: &str) -> String {
    format!("#/components/schemas/{name}")
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": ref_path(name) })
}

/// `persona-panel` → `PersonaPanel`, `founder_profile` → `FounderProfile`.
fn pascal_case(s: &str) -> String {
    s.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut cs = w.chars();
            cs.next()
                .map(|c| c.to_ascii_uppercase().to_string() + cs.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn is_named_object(s: &Value) -> bool {
    s.get("properties").is_some()
}

/// Move the objects nested in `schema` (object inputs, object items of lists) into
/// `components`, named `{name}{Field}` and `{name}{Field}Item`, leaving `$ref`s; an optional
/// one becomes `anyOf` the reference and `null`.
fn name_objects(schema: &mut Value, name: &str, components: &mut Map<String, Value>) {
    let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
        return;
    };
    for (field, prop) in props.iter_mut() {
        let stem = unique(&format!("{name}{}", pascal_case(field)), components);
        if is_named_object(prop) {
            let description = prop.as_object_mut().and_then(|o| o.remove("description"));
            let nullable = prop["type"].is_array();
            let mut object = prop.take();
            object["type"] = Value::from("object");
            components.insert(stem.clone(), Value::Null);
            name_objects(&mut object, &stem, components);
            components.insert(stem.clone(), object);
            let mut r = if nullable {
                json!({ "anyOf": [schema_ref(&stem), { "type": "null" }] })
            } else {
                schema_ref(&stem)
            };
            if let Some(d) = description {
                r["description"] = d;
            }
            *prop = r;
        } else if let Some(items) = prop.get_mut("items")
            && is_named_object(items)
        {
            let item_name = unique(&format!("{stem}Item"), components);
            let mut object = items.take();
            components.insert(item_name.clone(), Value::Null);
            name_objects(&mut object, &item_name, components);
            components.insert(item_name.clone(), object);
            *items = schema_ref(&item_name);
        }
    }
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

/// `GET /v1/reports/{id}/events` is a `text/event-stream`: to a generated client a string
/// (OpenAPI 3.1 has no schema for a stream of events, and a client generator that sees an
/// object parses the stream as JSON). The events and the schema of each one's `data` are in
/// the description, and as a JSON Schema of one event in `x-fanout-event-schema` (the form
/// schemathesis validates each event against, `scripts/schemathesis.sh`): an object of `id`,
/// `event` and `data`, with `data` a JSON document whose schema depends on the event.
fn describe_event_stream(doc: &mut Value) {
    // Inlined: a content schema is validated on its own, without the document.
    let inline = |name: &str| inline_refs(&doc["components"]["schemas"][name], doc);
    let json_data = |schema: Value| {
        json!({
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": schema,
        })
    };
    let stream_id = json!({ "type": "string", "pattern": "^[0-9]{1,19}-[0-9]{1,19}$" });
    let event_schema = json!({
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
                    "data": json_data(inline("ReportEvent")),
                },
            },
            {
                "description": "The last event: the final report document.",
                "properties": {
                    "event": { "const": sse::REPORT_EVENT },
                    "data": json_data(inline("ReportDocument")),
                },
            },
            {
                "description": "The stream cannot go on (Redis failed); reconnect with Last-Event-ID.",
                "properties": {
                    "event": { "const": sse::ERROR_EVENT },
                    "data": json_data(inline("ErrorBody")),
                },
            },
        ],
    });
    let pointer = "/paths/~1v1~1reports~1{id}~1events/get/responses/200/content/text~1event-stream";
    let Some(media) = doc.pointer_mut(pointer) else {
        return;
    };
    media["schema"] = json!({
        "type": "string",
        "description": "Server-Sent Events. Each event has `event:` (its kind) and `data:` \
            (one JSON document). Progress events (`id:` is the stream id, to resume with \
            `Last-Event-ID`): `report.created`, `section.started`, `section.completed`, \
            `section.failed`, `section.skipped`, `section.cancelled`, `report.finished`, …, \
            each with a `ReportEvent`. After `report.finished`: one `report` event whose data \
            is the final `ReportDocument`, and the stream ends. `error`: an `ErrorBody`, the \
            stream cannot go on (Redis failed); reconnect with `Last-Event-ID`.",
    });
    media["x-fanout-event-schema"] = event_schema;
}

/// `schema` with every `$ref` into `doc` replaced by what it names (the schemas here are not
/// recursive).
fn inline_refs(schema: &Value, doc: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            if let Some(target) = map
                .get("$ref")
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix('#'))
                .and_then(|p| doc.pointer(p))
            {
                let mut resolved = inline_refs(target, doc);
                for (k, v) in map.iter().filter(|(k, _)| *k != "$ref") {
                    resolved[k.as_str()] = inline_refs(v, doc);
                }
                return resolved;
            }
            Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), inline_refs(v, doc)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| inline_refs(v, doc)).collect()),
        other => other.clone(),
    }
}

/// The `for_each` flag tells the two shapes of a document section apart.
fn pin_document_sections(doc: &mut Value) {
    let schemas = &mut doc["components"]["schemas"];
    for (name, value) in [("ForEachSection", true), ("JobSection", false)] {
        let flag = match schemas.pointer_mut(&format!("/{name}/properties/for_each")) {
            Some(f) => Some(f),
            // A flattened struct derives as `allOf` [the flattened one, its own fields].
            None => schemas[name]["allOf"].as_array_mut().and_then(|parts| {
                parts
                    .iter_mut()
                    .find_map(|p| p.pointer_mut("/properties/for_each"))
            }),
        };
        if let Some(flag) = flag {
            flag["const"] = Value::Bool(value);
        }
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

    fn resolve<'a>(doc: &'a Value, r: &Value) -> &'a Value {
        let path = r.as_str().unwrap().trim_start_matches('#');
        doc.pointer(path).unwrap()
    }

    fn assert_no_inline_objects(schema: &Value, at: &str) {
        for (field, prop) in schema["properties"].as_object().unwrap() {
            let items = &prop["items"];
            assert!(
                prop.get("properties").is_none() && items.get("properties").is_none(),
                "{at}.{field} is an inline object"
            );
        }
    }

    #[test]
    fn component_names_are_pascal_case_and_unique() {
        assert_eq!(pascal_case("persona-panel"), "PersonaPanel");
        assert_eq!(pascal_case("founder_profile"), "FounderProfile");
        assert_eq!(pascal_case("v2.report"), "V2Report");
        let taken: Map<String, Value> = [("SubmitBody", Value::Null), ("SubmitBody2", Value::Null)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(unique("SubmitBody", &taken), "SubmitBody3");
        assert_eq!(unique("SubmitPanel", &taken), "SubmitPanel");
    }

    #[test]
    fn the_document_names_every_route_and_refines_the_body_per_template() {
        let templates = Templates::builtin();
        let doc = document(&templates, true);
        for path in [
            "/v1/reports",
            "/v1/reports/{id}",
            "/v1/reports/{id}/events",
            "/v1/reports/{id}/report.json",
            "/v1/reports/{id}/report.md",
            "/v1/templates",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} missing");
        }
        let schemas = &doc["components"]["schemas"];
        let body = &schemas["SubmitBody"];
        let variants = body["oneOf"].as_array().unwrap();
        assert_eq!(variants.len(), templates.names().len());
        assert_eq!(body["discriminator"]["propertyName"], "template");
        let panel = resolve(&doc, &body["discriminator"]["mapping"]["persona-panel"]);
        assert!(variants.contains(&json!({ "$ref": "#/components/schemas/SubmitPersonaPanel" })));
        assert_eq!(panel["properties"]["template"]["const"], "persona-panel");
        assert_eq!(panel["additionalProperties"], false);
        assert_eq!(
            panel["properties"]["inputs"]["$ref"],
            "#/components/schemas/PersonaPanelInputs"
        );
        let inputs = &schemas["PersonaPanelInputs"];
        assert_eq!(inputs["additionalProperties"], false);
        assert!(
            inputs["required"]
                .as_array()
                .unwrap()
                .contains(&json!("personas"))
        );
        assert_eq!(
            inputs["properties"]["personas"]["items"]["$ref"],
            "#/components/schemas/PersonaPanelInputsPersonasItem"
        );
        let name = &schemas["PersonaPanelInputsPersonasItem"]["properties"]["name"];
        assert_eq!(name["maxLength"], 120);
        assert_eq!(
            name["pattern"],
            fanout_core::template::string_pattern(false, true)
        );
        assert_eq!(
            schemas["SubmitStartupReport"]["properties"]["inputs"]["$ref"],
            "#/components/schemas/StartupReportInputs"
        );
        // Every object a generator should name is a component: no inline object anywhere in
        // a request body.
        assert_no_inline_objects(&schemas["SubmitPersonaPanel"], "SubmitPersonaPanel");
        for name in ["PersonaPanelInputs", "StartupReportInputs"] {
            assert_no_inline_objects(&schemas[name], name);
        }

        // One content type per response.
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for (status, resp) in op["responses"].as_object().unwrap() {
                    if let Some(content) = resp.get("content") {
                        assert_eq!(
                            content.as_object().unwrap().len(),
                            1,
                            "{method} {path} {status}: {content}"
                        );
                    }
                }
            }
        }
        let content = |path: &str, ty: &str| {
            doc["paths"][path]["get"]["responses"]["200"]["content"][ty]["schema"].clone()
        };
        assert_eq!(
            content("/v1/reports/{id}/report.json", "application/json")["$ref"],
            "#/components/schemas/ReportDocument"
        );
        assert_eq!(
            content("/v1/reports/{id}/report.md", "text/markdown")["type"],
            "string"
        );
        assert_eq!(
            content("/v1/reports/{id}/events", "text/event-stream")["type"],
            "string"
        );
        assert!(doc["paths"].get("/v1/reports/{id}/report").is_none());
        let media = &doc["paths"]["/v1/reports/{id}/events"]["get"]["responses"]["200"]["content"]
            ["text/event-stream"];
        let event = &media["x-fanout-event-schema"];
        assert_eq!(event["oneOf"].as_array().unwrap().len(), 3);
        let progress = &event["oneOf"][0]["properties"]["data"]["contentSchema"];
        assert_eq!(
            progress["properties"]["kind"]["type"], "string",
            "{progress}"
        );
        let report = &event["oneOf"][1]["properties"]["data"]["contentSchema"];
        assert!(!report.to_string().contains("$ref"), "{report}");
        assert_eq!(report["properties"]["created_at"]["type"], "integer");

        // The document has the view's names and formats.
        let report_doc = &schemas["ReportDocument"]["properties"];
        let view = &schemas["ReportView"]["properties"];
        for field in [
            "id",
            "status",
            "lane",
            "created_at",
            "finished_at",
            "totals",
        ] {
            assert_eq!(report_doc[field], view[field], "{field}");
        }
        assert_eq!(
            report_doc["sections"]["items"]["$ref"],
            "#/components/schemas/DocumentSection"
        );
        let items = &schemas["ForEachSection"]["properties"];
        assert_eq!(
            items["items"]["items"]["$ref"],
            "#/components/schemas/SectionView"
        );
        assert_eq!(items["for_each"]["const"], true);
        assert!(
            schemas["JobSection"]
                .to_string()
                .contains("#/components/schemas/SectionView")
        );
        assert!(
            schemas["JobSection"]
                .to_string()
                .contains(r#""const":false"#)
        );
        assert!(doc["components"]["securitySchemes"].get("bearer").is_some());
        assert!(
            doc["paths"]["/v1/reports"]["post"]
                .get("security")
                .is_some()
        );

        let events = &doc["paths"]["/v1/reports/{id}/events"]["get"];

        // The report is the aggregator's view, its enums fanout-core's wire names.
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
