//! Rendering one job's prompt with minijinja.
//!
//! A prompt sees `inputs` (the request's inputs; declared but absent fields are `none`),
//! `item` and `index` in a `for_each` section, and `sections.<id>` for each of its
//! dependencies: the text of a done dependency, `none` for a failed or skipped one, or a list
//! (in input order, `none` for missing items) for a `for_each` dependency. Undefined values are
//! strict: a typo fails the render with a message naming the variable, rather than sending the
//! provider a prompt with a hole in it.

use std::collections::{BTreeMap, BTreeSet};

use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::dag::JobNode;
use crate::template::{InputKind, SectionSpec, Template, TemplateError};

/// `max_tokens` of a section that does not set it.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;

/// The output of one dependency, as the prompt sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DepOutput {
    /// A plain section: its text, or `None` if it failed or was skipped.
    Text(Option<String>),
    /// A `for_each` section: one entry per item in input order, `None` for failed items.
    List(Vec<Option<String>>),
}

/// What a worker sends to the provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenderedPrompt {
    pub system: Option<String>,
    pub user: String,
    pub model: String,
    pub max_tokens: u32,
    pub temperature: Option<f32>,
}

/// A prompt that cannot be rendered. Retrying does not help: it is a fatal job error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot render {template}/{job}: {message}")]
pub struct RenderError {
    pub template: String,
    pub job: String,
    pub message: String,
}

/// Renders the prompt of `node`. `deps` holds the outputs of the section's dependencies by
/// section id; a dependency missing from it renders as `none` (every item `none` for a
/// `for_each` dependency). Model: the section's, else the template's, else `default_model`.
pub fn render_prompt(
    t: &Template,
    node: &JobNode,
    inputs: &Value,
    deps: &BTreeMap<String, DepOutput>,
    default_model: &str,
) -> Result<RenderedPrompt, RenderError> {
    let fail = |message: String| RenderError {
        template: t.name.clone(),
        job: node.id.clone(),
        message,
    };
    let section = t
        .section(&node.section)
        .ok_or_else(|| fail(format!("the template has no section `{}`", node.section)))?;
    let ctx = context(t, section, node, inputs, deps).map_err(fail)?;
    let env = environment(t).map_err(|(name, e)| fail(format!("partial `{name}`: {e}")))?;

    let user = render_one(&env, t, section, "prompt", &section.prompt, &ctx).map_err(fail)?;
    if user.is_empty() {
        // A provider answers an empty prompt with something (and bills it); nobody wants that.
        return Err(fail(
            "prompt rendered empty: the inputs it uses are missing or blank".to_owned(),
        ));
    }
    let system = match section.system.as_ref().or(t.system.as_ref()) {
        None => None,
        Some(src) => Some(render_one(&env, t, section, "system", src, &ctx).map_err(fail)?)
            .filter(|s| !s.is_empty()),
    };
    let model = section
        .model
        .as_deref()
        .or(t.model.as_deref())
        .unwrap_or(default_model)
        .to_owned();
    Ok(RenderedPrompt {
        system,
        user,
        model,
        max_tokens: section.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        temperature: section.temperature,
    })
}

fn context(
    t: &Template,
    section: &SectionSpec,
    node: &JobNode,
    inputs: &Value,
    deps: &BTreeMap<String, DepOutput>,
) -> Result<Value, String> {
    let inputs = t.normalized_inputs(inputs);
    let mut ctx = Map::new();
    if let Some(list) = &section.for_each {
        let index = node.index.ok_or_else(|| {
            format!(
                "section `{}` runs per item but the job has no index",
                section.id
            )
        })?;
        let item = inputs
            .get(list)
            .and_then(|l| l.get(index))
            .ok_or_else(|| format!("inputs.{list} has no item {index}"))?;
        ctx.insert("item".into(), item.clone());
        ctx.insert("index".into(), index.into());
    }
    let mut sections = Map::new();
    for dep in &section.depends_on {
        let value = match deps.get(dep) {
            Some(DepOutput::Text(text)) => text.clone().map_or(Value::Null, Value::String),
            Some(DepOutput::List(items)) => {
                // One entry per item whatever the caller passed, so `sections.x[i]` in a
                // prompt indexes safely alongside `inputs.<list>[i]`.
                let len = match t.section(dep) {
                    Some(d) if d.for_each.is_some() => t.item_count(d, &inputs),
                    _ => items.len(),
                };
                Value::Array(
                    (0..len)
                        .map(|i| {
                            items
                                .get(i)
                                .cloned()
                                .flatten()
                                .map_or(Value::Null, Value::String)
                        })
                        .collect(),
                )
            }
            None => match t.section(dep) {
                Some(d) if d.for_each.is_some() => {
                    Value::Array(vec![Value::Null; t.item_count(d, &inputs)])
                }
                _ => Value::Null,
            },
        };
        sections.insert(dep.clone(), value);
    }
    ctx.insert("inputs".into(), inputs);
    ctx.insert("sections".into(), Value::Object(sections));
    Ok(Value::Object(ctx))
}

/// The environment prompts render in: strict undefined, no HTML escaping, block tags that do
/// not leave blank lines, and the template's partials for `{% include %}`.
fn environment(t: &Template) -> Result<Environment<'_>, (&str, minijinja::Error)> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    for (name, source) in &t.partials {
        env.add_template(name, source)
            .map_err(|e| (name.as_str(), e))?;
    }
    Ok(env)
}

fn render_one(
    env: &Environment<'_>,
    t: &Template,
    section: &SectionSpec,
    field: &str,
    source: &str,
    ctx: &Value,
) -> Result<String, String> {
    let name = format!("{}/{}.{field}", t.name, section.id);
    let tmpl = env
        .template_from_named_str(&name, source)
        .map_err(|e| format!("{field} does not compile: {e}"))?;
    match tmpl.render(ctx) {
        Ok(text) => Ok(tidy(&text)),
        Err(e) if e.kind() == ErrorKind::UndefinedError => {
            // minijinja does not say which variable was undefined; find it from the names the
            // prompt (and the partials) use.
            let mut used: BTreeSet<String> = tmpl.undeclared_variables(true).into_iter().collect();
            for partial in t.partials.keys() {
                if let Ok(p) = env.get_template(partial) {
                    used.extend(p.undeclared_variables(true));
                }
            }
            match used.iter().find_map(|path| unresolved(ctx, path)) {
                Some(path) => Err(format!(
                    "{field} uses `{path}`, which is undefined (at {}:{})",
                    e.name().unwrap_or(&name),
                    e.line().unwrap_or(0)
                )),
                None => Err(format!("{field}: {e}")),
            }
        }
        Err(e) => Err(format!("{field}: {e}")),
    }
}

/// The shortest prefix of the dotted `path` that does not exist in `ctx`, if any. Builtin
/// functions (`range`, …) are not in `ctx` and are never reported.
fn unresolved(ctx: &Value, path: &str) -> Option<String> {
    let mut segments = path.split('.');
    let root = segments.next()?;
    let mut cur = match ctx.get(root) {
        Some(v) => v,
        None => return (!BUILTIN_GLOBALS.contains(&root)).then(|| root.to_owned()),
    };
    let mut prefix = root.to_owned();
    for seg in segments {
        prefix.push('.');
        prefix.push_str(seg);
        match cur {
            Value::Object(map) => match map.get(seg) {
                Some(v) => cur = v,
                None => return Some(prefix),
            },
            // Methods of strings and lists, `x.y` on none: not a missing name.
            _ => return None,
        }
    }
    None
}

const BUILTIN_GLOBALS: &[&str] = &[
    "range",
    "dict",
    "namespace",
    "debug",
    "lipsum",
    "cycler",
    "joiner",
    "loop",
    "self",
];

/// Trims the rendered text and collapses runs of blank lines that conditionals leave behind.
fn tidy(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank = 0;
    for line in text.trim().lines() {
        let line = line.trim_end();
        if line.is_empty() {
            blank += 1;
            if blank > 1 {
                continue;
            }
        } else {
            blank = 0;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.truncate(out.trim_end().len());
    out
}

/// Load-time checks of every prompt: it compiles, and the variables it uses exist — inputs
/// the template declares, `sections.<id>` only for dependencies, `item`/`index` only in
/// `for_each` sections (and `item.<field>` only for declared item fields).
pub(crate) fn check_prompts(label: &str, t: &Template) -> Result<(), TemplateError> {
    let env = environment(t).map_err(|(name, e)| TemplateError::Prompt {
        template: label.to_owned(),
        location: format!("partial `{name}`"),
        message: e.to_string(),
    })?;
    let globals: BTreeSet<String> = env
        .globals()
        .map(|(name, _)| name.to_owned())
        .chain(BUILTIN_GLOBALS.iter().map(|s| (*s).to_owned()))
        .collect();
    for name in t.partials.keys() {
        let Ok(p) = env.get_template(name) else {
            continue;
        };
        for path in sorted(p.undeclared_variables(true)) {
            // A partial is rendered inside sections whose dependencies vary; only `inputs.x`
            // can be checked here. The render check catches the rest.
            if let Some(message) = check_input_path(t, &path) {
                return Err(TemplateError::Invalid {
                    template: label.to_owned(),
                    location: format!("partial `{name}`"),
                    message,
                });
            }
        }
    }
    for s in &t.sections {
        let sources = [
            ("prompt", Some(&s.prompt)),
            ("system", s.system.as_ref().or(t.system.as_ref())),
        ];
        for (field, source) in sources {
            let Some(source) = source else { continue };
            let name = format!("{}/{}.{field}", t.name, s.id);
            let tmpl =
                env.template_from_named_str(&name, source)
                    .map_err(|e| TemplateError::Prompt {
                        template: label.to_owned(),
                        location: format!("section `{}` {field}", s.id),
                        message: e.to_string(),
                    })?;
            for path in sorted(tmpl.undeclared_variables(true)) {
                check_path(label, t, s, field, &path, &globals)?;
            }
        }
    }
    dry_run(label, t, &env)
}

/// Renders every section with made-up inputs, once with every input and dependency present
/// and once with only the required ones, to catch what compiling does not: unknown filters,
/// tests and functions, a missing partial, wrong argument counts. Other render errors depend
/// on real values and are left to render time.
fn dry_run(label: &str, t: &Template, env: &Environment<'_>) -> Result<(), TemplateError> {
    for full in [true, false] {
        let mut inputs = Map::new();
        for spec in &t.inputs {
            let for_each = t
                .sections
                .iter()
                .any(|s| s.for_each.as_ref() == Some(&spec.name));
            if full || spec.required || for_each {
                inputs.insert(
                    spec.name.clone(),
                    sample(spec.kind, spec.items.as_deref(), &spec.fields, full),
                );
            }
        }
        let inputs = Value::Object(inputs);
        for s in &t.sections {
            let node = JobNode {
                id: s.id.clone(),
                section: s.id.clone(),
                index: s.for_each.as_ref().map(|_| 0),
                depends_on: Vec::new(),
                priority: 1,
            };
            let text = full.then(|| "sample".to_owned());
            let deps: BTreeMap<String, DepOutput> = s
                .depends_on
                .iter()
                .map(|d| {
                    let out = match t.section(d).and_then(|d| d.for_each.as_ref()) {
                        Some(_) => DepOutput::List(vec![text.clone()]),
                        None => DepOutput::Text(text.clone()),
                    };
                    (d.clone(), out)
                })
                .collect();
            let Ok(ctx) = context(t, s, &node, &inputs, &deps) else {
                continue;
            };
            let sources = [
                ("prompt", Some(&s.prompt)),
                ("system", s.system.as_ref().or(t.system.as_ref())),
            ];
            for (field, source) in sources {
                let Some(source) = source else { continue };
                let name = format!("{}/{}.{field}", t.name, s.id);
                let Ok(tmpl) = env.template_from_named_str(&name, source) else {
                    continue;
                };
                if let Err(e) = tmpl.render(&ctx)
                    && matches!(
                        e.kind(),
                        ErrorKind::UnknownFilter
                            | ErrorKind::UnknownTest
                            | ErrorKind::UnknownFunction
                            | ErrorKind::TemplateNotFound
                            | ErrorKind::TooManyArguments
                            | ErrorKind::MissingArgument
                    )
                {
                    return Err(TemplateError::Prompt {
                        template: label.to_owned(),
                        location: format!("section `{}` {field}", s.id),
                        message: e.to_string(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// A made-up value of an input's kind; `full` fills optional object fields too.
fn sample(
    kind: InputKind,
    items: Option<&crate::template::ItemSpec>,
    fields: &[crate::template::InputSpec],
    full: bool,
) -> Value {
    match kind {
        InputKind::String | InputKind::Text => Value::String("sample".into()),
        InputKind::Number => 1.into(),
        InputKind::Bool => true.into(),
        InputKind::List => Value::Array(vec![match items {
            Some(i) => sample(i.kind, None, &i.fields, full),
            None => Value::String("sample".into()),
        }]),
        InputKind::Object => Value::Object(
            fields
                .iter()
                .filter(|f| full || f.required)
                .map(|f| {
                    (
                        f.name.clone(),
                        sample(f.kind, f.items.as_deref(), &f.fields, full),
                    )
                })
                .collect(),
        ),
    }
}

fn sorted(set: std::collections::HashSet<String>) -> Vec<String> {
    let mut v: Vec<String> = set.into_iter().collect();
    v.sort();
    v
}

fn check_input_path(t: &Template, path: &str) -> Option<String> {
    let mut segs = path.split('.');
    if segs.next() != Some("inputs") {
        return None;
    }
    let name = segs.next()?;
    t.input(name)
        .is_none()
        .then(|| format!("prompt uses `inputs.{name}` but the template has no input `{name}`"))
}

fn check_path(
    label: &str,
    t: &Template,
    s: &SectionSpec,
    field: &'static str,
    path: &str,
    globals: &BTreeSet<String>,
) -> Result<(), TemplateError> {
    let invalid = |message: String| TemplateError::Invalid {
        template: label.to_owned(),
        location: format!("section `{}`", s.id),
        message: message.replacen("prompt", field, 1),
    };
    let mut segs = path.split('.');
    let root = segs.next().unwrap_or_default();
    let second = segs.next();
    match root {
        "inputs" => match check_input_path(t, path) {
            Some(message) => Err(invalid(message)),
            None => Ok(()),
        },
        "sections" => match second {
            Some(dep) if !s.depends_on.iter().any(|d| d == dep) => {
                Err(TemplateError::UndeclaredDependency {
                    template: label.to_owned(),
                    section: s.id.clone(),
                    field,
                    dependency: dep.to_owned(),
                })
            }
            _ => Ok(()),
        },
        "item" | "index" => {
            let Some(list) = &s.for_each else {
                return Err(invalid(format!(
                    "prompt uses `{root}` but the section has no for_each"
                )));
            };
            if root == "item"
                && let Some(field_name) = second
                && let Some(items) = t.input(list).and_then(|i| i.items.as_deref())
                && !items.fields.is_empty()
                && !items.fields.iter().any(|f| f.name == field_name)
            {
                return Err(invalid(format!(
                    "prompt uses `item.{field_name}` but items of `{list}` have no field `{field_name}`"
                )));
            }
            Ok(())
        }
        _ if globals.contains(root) => Ok(()),
        _ => Err(invalid(format!(
            "prompt uses `{root}`, which prompts cannot see (they see inputs, sections, item and index)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TEMPLATE: &str = r#"
name = "t"
title = "T"
model = "tmpl-model"
system = "You write about {{ inputs.topic }}."

[partials]
brief = "Topic: {{ inputs.topic }}{% if inputs.angle %} (angle: {{ inputs.angle }}){% endif %}"

[[inputs]]
name = "topic"
kind = "string"
required = true

[[inputs]]
name = "angle"
kind = "string"

[[inputs]]
name = "people"
kind = "list"
[inputs.items]
kind = "object"
[[inputs.items.fields]]
name = "name"
kind = "string"
required = true
[[inputs.items.fields]]
name = "background"
kind = "text"

[[sections]]
id = "intro"
title = "Intro"
prompt = """
{% include "brief" %}


Write an intro.
"""

[[sections]]
id = "view"
title = "View"
for_each = "people"
depends_on = ["intro"]
model = "section-model"
max_tokens = 300
temperature = 0.7
system = ""
prompt = """
You are {{ item.name }} (#{{ index + 1 }}).
{% if item.background %}
Background: {{ item.background }}
{% endif %}
Intro: {{ sections.intro or "(missing)" }}
"""

[[sections]]
id = "summary"
title = "Summary"
depends_on = ["view", "intro"]
on_dependency_failure = "continue"
prompt = """
{% for v in sections.view %}
{{ loop.index }}. {{ inputs.people[loop.index0].name }}: {{ v if v else "(no critique)" }}
{% endfor %}
"""
"#;

    fn setup() -> (Template, Value, crate::JobGraph) {
        let t = Template::from_toml("t.toml", TEMPLATE).unwrap();
        let inputs = json!({
            "topic": "tea",
            "people": [{"name": "Ann", "background": "grower"}, {"name": "Bo"}],
        });
        let g = t.job_graph(&inputs).unwrap();
        (t, inputs, g)
    }

    #[test]
    fn renders_inputs_partials_and_defaults() {
        let (t, inputs, g) = setup();
        let p = render_prompt(
            &t,
            g.get("intro").unwrap(),
            &inputs,
            &BTreeMap::new(),
            "dflt",
        )
        .unwrap();
        assert_eq!(p.user, "Topic: tea\n\nWrite an intro.");
        assert_eq!(p.system.as_deref(), Some("You write about tea."));
        assert_eq!(p.model, "tmpl-model");
        assert_eq!(p.max_tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(p.temperature, None);

        let mut no_model = t.clone();
        no_model.model = None;
        let p = render_prompt(
            &no_model,
            g.get("intro").unwrap(),
            &inputs,
            &BTreeMap::new(),
            "dflt",
        )
        .unwrap();
        assert_eq!(p.model, "dflt");
    }

    #[test]
    fn for_each_items_see_their_item_and_their_dependencies_text() {
        let (t, inputs, g) = setup();
        let deps = BTreeMap::from([(
            "intro".to_owned(),
            DepOutput::Text(Some("TEA IS OLD".into())),
        )]);
        let p = render_prompt(&t, g.get("view[0]").unwrap(), &inputs, &deps, "dflt").unwrap();
        assert_eq!(
            p.user,
            "You are Ann (#1).\nBackground: grower\nIntro: TEA IS OLD"
        );
        assert_eq!(p.system, None); // an empty system prompt overrides the template's
        assert_eq!(
            (p.model.as_str(), p.max_tokens, p.temperature),
            ("section-model", 300, Some(0.7))
        );
        // Bo has no background: the optional field is none, not undefined.
        let p = render_prompt(&t, g.get("view[1]").unwrap(), &inputs, &deps, "dflt").unwrap();
        assert_eq!(p.user, "You are Bo (#2).\nIntro: TEA IS OLD");
        // A failed dependency is none.
        let failed = BTreeMap::from([("intro".to_owned(), DepOutput::Text(None))]);
        let p = render_prompt(&t, g.get("view[1]").unwrap(), &inputs, &failed, "dflt").unwrap();
        assert!(p.user.ends_with("Intro: (missing)"), "{}", p.user);
    }

    #[test]
    fn list_dependencies_keep_input_order_and_mark_missing_items() {
        let (t, inputs, g) = setup();
        let deps = BTreeMap::from([
            (
                "view".to_owned(),
                DepOutput::List(vec![None, Some("lovely".into())]),
            ),
            ("intro".to_owned(), DepOutput::Text(Some("i".into()))),
        ]);
        let p = render_prompt(&t, g.get("summary").unwrap(), &inputs, &deps, "dflt").unwrap();
        assert_eq!(p.user, "1. Ann: (no critique)\n2. Bo: lovely");
        // Dependencies the caller does not pass render as none, one per item for a list.
        let p = render_prompt(
            &t,
            g.get("summary").unwrap(),
            &inputs,
            &BTreeMap::new(),
            "dflt",
        )
        .unwrap();
        assert_eq!(p.user, "1. Ann: (no critique)\n2. Bo: (no critique)");
        // A short list is padded with none to one entry per item.
        let short = BTreeMap::from([("view".to_owned(), DepOutput::List(vec![Some("ok".into())]))]);
        let p = render_prompt(&t, g.get("summary").unwrap(), &inputs, &short, "dflt").unwrap();
        assert_eq!(p.user, "1. Ann: ok\n2. Bo: (no critique)");
    }

    #[test]
    fn undefined_values_fail_with_the_name() {
        let (t, inputs, g) = setup();
        // An input typo is caught at load time; a lookup the static check cannot see (an item
        // of a list, a free-form object) fails at render time, naming the variable.
        let mut typo = t.clone();
        typo.sections[0].prompt = "{{ inputs.people[0].nmae }}".into();
        let e = render_prompt(
            &typo,
            g.get("intro").unwrap(),
            &inputs,
            &BTreeMap::new(),
            "m",
        )
        .unwrap_err();
        assert_eq!((e.template.as_str(), e.job.as_str()), ("t", "intro"));
        assert!(e.message.contains("undefined"), "{e}");

        typo.sections[0].prompt = "Hello {{ inputs.topik }}".into();
        let e = render_prompt(
            &typo,
            g.get("intro").unwrap(),
            &inputs,
            &BTreeMap::new(),
            "m",
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with(
                "cannot render t/intro: prompt uses `inputs.topik`, which is undefined"
            ),
            "{e}"
        );
        assert!(e.message.ends_with("(at t/intro.prompt:1)"), "{e}");
    }

    #[test]
    fn a_prompt_that_renders_empty_is_an_error_not_a_call() {
        let (mut t, inputs, g) = setup();
        t.sections[0].prompt = "{% if inputs.nothing_here is defined %}x{% endif %}\n  \n".into();
        let e =
            render_prompt(&t, g.get("intro").unwrap(), &inputs, &BTreeMap::new(), "m").unwrap_err();
        assert!(e.message.starts_with("prompt rendered empty"), "{e}");
    }

    #[test]
    fn a_job_that_does_not_fit_the_template_is_an_error() {
        let (t, inputs, g) = setup();
        let mut node = g.get("view[1]").unwrap().clone();
        node.index = Some(5);
        let e = render_prompt(&t, &node, &inputs, &BTreeMap::new(), "m").unwrap_err();
        assert!(e.message.contains("inputs.people has no item 5"), "{e}");
        node.section = "nope".into();
        assert!(render_prompt(&t, &node, &inputs, &BTreeMap::new(), "m").is_err());
    }

    #[test]
    fn unknown_filters_tests_functions_and_partials_fail_at_load() {
        let with = |prompt: &str| {
            let text = TEMPLATE.replacen(
                "prompt = \"\"\"\n{% include \"brief\" %}",
                &format!("prompt = \"\"\"\n{prompt}"),
                1,
            );
            assert_ne!(text, TEMPLATE);
            Template::from_toml("t.toml", &text)
        };
        with("{{ inputs.topic | upper }}").unwrap();
        for (prompt, expected) in [
            ("{{ inputs.topic | shout }}", "unknown filter"),
            ("{% if inputs.topic is loud %}x{% endif %}", "unknown test"),
            ("{{ frobnicate(inputs.topic) }}", "prompts cannot see"),
            ("{% include \"nope\" %}", "not found"),
            // Only reached when the optional input is present.
            (
                "{% if inputs.angle %}{{ inputs.angle | shout }}{% endif %}",
                "unknown filter",
            ),
        ] {
            let e = with(prompt).unwrap_err().to_string();
            assert!(e.starts_with("template t.toml: section `intro`"), "{e}");
            assert!(e.contains(expected), "{prompt}: {e}");
        }
    }

    #[test]
    fn tidy_collapses_blank_runs() {
        assert_eq!(tidy("\n\n a  \n\n\n\nb\n\n"), "a\n\nb");
    }
}
