//! Report templates: a TOML file declaring a report's inputs and its sections (one LLM call
//! each, or one per list item with `for_each`), their prompts and their dependencies.
//!
//! A template is validated once, when it is loaded; a request's inputs are validated against
//! it before anything is enqueued; [`Template::job_graph`] turns template + inputs into the
//! jobs to run; [`render_prompt`] renders one job's prompt once its dependencies are done.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::dag::{JobGraph, JobNode};
pub use crate::render::{
    DEFAULT_MAX_TOKENS, DepOutput, RenderError, RenderedPrompt, render_prompt,
};
pub use crate::report::{Lane, ReportStatus, SectionState};

/// A report template, as written in `config/templates/<name>.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// Stable name (`[a-z0-9_-]`), what requests ask for.
    pub name: String,
    pub title: String,
    #[serde(default)]
    pub description: String,
    /// Opt in to the response cache for every section of this template.
    #[serde(default)]
    pub cache: bool,
    /// Default lane of its reports (`interactive` or `batch`); a request may override it.
    #[serde(default)]
    pub lane: Option<String>,
    /// Run its reports' sections through the provider's Batch API (half the price, answers
    /// within 24 h) unless a request says otherwise.
    #[serde(default)]
    pub batch_api: bool,
    /// With `batch_api`: a report must be finished this many seconds after it was submitted;
    /// sections that a batch would not answer in time run as live calls. A request may set
    /// its own.
    #[serde(default)]
    pub batch_deadline_secs: Option<u64>,
    /// Model of sections that do not name one (before the caller's default).
    #[serde(default)]
    pub model: Option<String>,
    /// System prompt of sections that do not have their own (a minijinja template too).
    #[serde(default)]
    pub system: Option<String>,
    /// Named minijinja snippets that prompts can `{% include "name" %}`.
    #[serde(default)]
    pub partials: BTreeMap<String, String>,
    #[serde(default)]
    pub inputs: Vec<InputSpec>,
    pub sections: Vec<SectionSpec>,
}

/// One input field of a request (or one field of an object input).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub name: String,
    pub kind: InputKind,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub description: String,
    /// Lists only: the most items accepted.
    #[serde(default)]
    pub max_items: Option<usize>,
    /// Strings and text only: the most characters (Unicode scalar values) accepted.
    #[serde(default)]
    pub max_chars: Option<usize>,
    /// Lists only: the shape of each item (any JSON value when absent).
    #[serde(default)]
    pub items: Option<Box<ItemSpec>>,
    /// Objects only: their fields; unknown fields are rejected. Any object when empty.
    #[serde(default)]
    pub fields: Vec<InputSpec>,
}

/// The shape of the items of a list input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemSpec {
    pub kind: InputKind,
    #[serde(default)]
    pub max_chars: Option<usize>,
    #[serde(default)]
    pub fields: Vec<InputSpec>,
}

/// The JSON kind an input must have. `string` and `text` are both JSON strings; `text` is
/// meant for multi-line prose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    String,
    Text,
    List,
    Object,
    Number,
    Bool,
}

impl InputKind {
    fn expected(self) -> &'static str {
        match self {
            Self::String | Self::Text => "a string",
            Self::List => "a list",
            Self::Object => "an object",
            Self::Number => "a number",
            Self::Bool => "true or false",
        }
    }
}

impl fmt::Display for InputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::String => "string",
            Self::Text => "text",
            Self::List => "list",
            Self::Object => "object",
            Self::Number => "number",
            Self::Bool => "bool",
        })
    }
}

/// One section of the report: one LLM call, or one per item of a list input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SectionSpec {
    /// Stable id (`[A-Za-z_][A-Za-z0-9_]*`): job ids, `sections.<id>` in prompts.
    pub id: String,
    pub title: String,
    /// The user prompt, a minijinja template.
    pub prompt: String,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    /// Output budget of the call (default [`DEFAULT_MAX_TOKENS`]); also the section's weight
    /// when the job graph ranks critical paths.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Name of a list input: the section runs once per item.
    #[serde(default)]
    pub for_each: Option<String>,
    #[serde(default)]
    pub on_dependency_failure: DependencyFailure,
    /// The report counts as completed even if this section fails.
    #[serde(default)]
    pub optional: bool,
}

/// What a section does when one of its dependencies failed or was skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DependencyFailure {
    /// Do not run; the section is skipped (and so are its own `skip` dependents).
    #[default]
    Skip,
    /// Run anyway; the failed dependency renders as `none` in the prompt.
    Continue,
}

/// A template that cannot be loaded, naming the template (file) and what is wrong where.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read template {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("template {template} is not a valid template file: {message}")]
    Parse { template: String, message: String },
    #[error("template {template}: section `{section}` is defined more than once")]
    DuplicateSection { template: String, section: String },
    #[error(
        "template {template}: section `{section}` depends on `{dependency}`, which is not a section of this template"
    )]
    UnknownDependency {
        template: String,
        section: String,
        dependency: String,
    },
    #[error("template {template}: dependency cycle: {cycle}")]
    Cycle { template: String, cycle: String },
    #[error("template {template}: section `{section}`: for_each = \"{input}\": {problem}")]
    ForEach {
        template: String,
        section: String,
        input: String,
        problem: String,
    },
    #[error("template {template}: {location} does not compile: {message}")]
    Prompt {
        template: String,
        /// e.g. "section `profile` prompt", "partial `brief`"
        location: String,
        message: String,
    },
    #[error(
        "template {template}: section `{section}`: {field} uses `sections.{dependency}` but `{dependency}` is not in its depends_on"
    )]
    UndeclaredDependency {
        template: String,
        section: String,
        field: &'static str,
        dependency: String,
    },
    #[error("template {template}: {location}: {message}")]
    Invalid {
        template: String,
        location: String,
        message: String,
    },
    #[error("templates {first} and {second} are both named `{name}`")]
    DuplicateName {
        name: String,
        first: String,
        second: String,
    },
}

/// A request's inputs do not fit the template: `field` is the path (`inputs.personas[2].name`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InputError {
    pub field: String,
    pub message: String,
}

impl InputError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The longest deadline a batch report may ask for (30 days).
pub const MAX_BATCH_DEADLINE_SECS: u64 = 30 * 86_400;

/// Whether `secs` is a deadline a batch report may ask for: 1 s to 30 days.
pub fn check_batch_deadline(secs: u64) -> Result<(), String> {
    if (1..=MAX_BATCH_DEADLINE_SECS).contains(&secs) {
        Ok(())
    } else {
        Err(format!(
            "`{secs}` is not allowed; allowed: 1 to {MAX_BATCH_DEADLINE_SECS} seconds (30 days)"
        ))
    }
}

impl Template {
    /// Parses and validates a template. `name` labels the source in errors (a file name).
    pub fn from_toml(name: &str, text: &str) -> Result<Self, TemplateError> {
        let template: Template = toml::from_str(text).map_err(|e| TemplateError::Parse {
            template: name.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        template.validate(name)?;
        Ok(template)
    }

    /// Reads, parses and validates a template file.
    pub fn load(path: &Path) -> Result<Self, TemplateError> {
        let text = std::fs::read_to_string(path).map_err(|source| TemplateError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&path.display().to_string(), &text)
    }

    /// Loads every `*.toml` in `dir`, by template name. Two files with one name are an error.
    pub fn load_dir(dir: &Path) -> Result<BTreeMap<String, Template>, TemplateError> {
        let read_err = |source| TemplateError::Read {
            path: dir.to_owned(),
            source,
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_err)? {
            let path = entry.map_err(read_err)?.path();
            if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
                paths.push(path);
            }
        }
        paths.sort();
        let mut out: BTreeMap<String, (PathBuf, Template)> = BTreeMap::new();
        for path in paths {
            let t = Self::load(&path)?;
            if let Some((first, _)) = out.get(&t.name) {
                return Err(TemplateError::DuplicateName {
                    name: t.name,
                    first: first.display().to_string(),
                    second: path.display().to_string(),
                });
            }
            out.insert(t.name.clone(), (path, t));
        }
        Ok(out.into_iter().map(|(k, (_, t))| (k, t)).collect())
    }

    pub fn section(&self, id: &str) -> Option<&SectionSpec> {
        self.sections.iter().find(|s| s.id == id)
    }

    pub fn input(&self, name: &str) -> Option<&InputSpec> {
        self.inputs.iter().find(|i| i.name == name)
    }

    /// The lane of the template, `interactive` unless it says otherwise.
    pub fn default_lane(&self) -> Lane {
        self.lane
            .as_deref()
            .and_then(Lane::parse)
            .unwrap_or_default()
    }

    /// Checks a request's inputs: a JSON object whose fields are the template's inputs, with
    /// required ones present, kinds matching and limits respected. Unknown fields are rejected.
    pub fn validate_inputs(&self, inputs: &Value) -> Result<(), InputError> {
        let Value::Object(map) = inputs else {
            return Err(InputError::new(
                "inputs",
                format!("expected an object, got {}", json_kind(inputs)),
            ));
        };
        check_fields(
            "inputs",
            &self.inputs,
            map,
            "is not an input of this template",
        )
    }

    /// Validates the inputs and expands the template into its jobs (see [`JobGraph`]).
    pub fn job_graph(&self, inputs: &Value) -> Result<JobGraph, InputError> {
        self.validate_inputs(inputs)?;
        Ok(crate::dag::build(self, inputs))
    }

    /// The inputs with every declared but absent field (also inside objects and list items)
    /// set to `null`, so prompts can test optional inputs under strict undefined rules.
    pub(crate) fn normalized_inputs(&self, inputs: &Value) -> Value {
        let mut v = inputs.clone();
        if let Value::Object(map) = &mut v {
            fill_nulls(&self.inputs, map);
        }
        v
    }

    /// How many jobs `section` expands into for these inputs (1 unless it has `for_each`).
    pub(crate) fn item_count(&self, section: &SectionSpec, inputs: &Value) -> usize {
        match &section.for_each {
            None => 1,
            Some(list) => inputs
                .get(list)
                .and_then(Value::as_array)
                .map_or(0, Vec::len),
        }
    }

    fn validate(&self, label: &str) -> Result<(), TemplateError> {
        let invalid = |location: &str, message: String| TemplateError::Invalid {
            template: label.to_owned(),
            location: location.to_owned(),
            message,
        };
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        {
            return Err(invalid(
                "name",
                format!(
                    "`{}` is not a valid template name (lowercase letters, digits, `-` and `_`)",
                    self.name
                ),
            ));
        }
        if self.title.trim().is_empty() {
            return Err(invalid("title", "must not be empty".into()));
        }
        if let Some(lane) = &self.lane {
            lane.parse::<Lane>()
                .map_err(|e| invalid("lane", e.to_string()))?;
        }
        if let Some(secs) = self.batch_deadline_secs {
            if !self.batch_api {
                return Err(invalid(
                    "batch_deadline_secs",
                    "applies to batch_api templates only: set `batch_api = true` or remove it"
                        .into(),
                ));
            }
            check_batch_deadline(secs).map_err(|e| invalid("batch_deadline_secs", e))?;
        }
        check_specs(label, "inputs", &self.inputs)?;
        if self.sections.is_empty() {
            return Err(invalid(
                "sections",
                "a template needs at least one section".into(),
            ));
        }
        let mut seen = BTreeSet::new();
        for s in &self.sections {
            let at = format!("section `{}`", s.id);
            if !is_identifier(&s.id) {
                return Err(invalid(
                    &at,
                    "a section id must start with a letter or `_` and contain only letters, digits and `_`".into(),
                ));
            }
            if !seen.insert(s.id.as_str()) {
                return Err(TemplateError::DuplicateSection {
                    template: label.to_owned(),
                    section: s.id.clone(),
                });
            }
            if s.title.trim().is_empty() {
                return Err(invalid(&at, "title must not be empty".into()));
            }
            if s.prompt.trim().is_empty() {
                return Err(invalid(&at, "prompt must not be empty".into()));
            }
            if s.max_tokens == Some(0) {
                return Err(invalid(&at, "max_tokens must be at least 1".into()));
            }
            if let Some(t) = s.temperature
                && !(0.0..=2.0).contains(&t)
            {
                return Err(invalid(
                    &at,
                    format!("temperature {t} is outside 0.0..=2.0"),
                ));
            }
            if s.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
                return Err(invalid(&at, "model must not be empty".into()));
            }
            if let Some(list) = &s.for_each {
                let problem = match self.input(list) {
                    None => Some("the template has no such input".to_owned()),
                    Some(i) if i.kind != InputKind::List => {
                        Some(format!("the input is {}, not a list", i.kind))
                    }
                    Some(_) => None,
                };
                if let Some(problem) = problem {
                    return Err(TemplateError::ForEach {
                        template: label.to_owned(),
                        section: s.id.clone(),
                        input: list.clone(),
                        problem,
                    });
                }
            }
        }
        if self.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
            return Err(invalid("model", "must not be empty".into()));
        }
        crate::dag::check_dependencies(label, &self.sections)?;
        crate::render::check_prompts(label, self)
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`: usable as `sections.<id>` / `inputs.<name>` in a prompt.
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 64
}

/// Checks the declarations of inputs (or of an object's fields) at `path`.
fn check_specs(label: &str, path: &str, specs: &[InputSpec]) -> Result<(), TemplateError> {
    let mut seen = BTreeSet::new();
    for spec in specs {
        let at = format!("{path}.{}", spec.name);
        let invalid = |message: &str| TemplateError::Invalid {
            template: label.to_owned(),
            location: format!("input `{at}`"),
            message: message.to_owned(),
        };
        if !is_identifier(&spec.name) {
            return Err(invalid(
                "an input name must start with a letter or `_` and contain only letters, digits and `_`",
            ));
        }
        if !seen.insert(spec.name.as_str()) {
            return Err(invalid("is declared more than once"));
        }
        check_shape(
            label,
            &at,
            spec.kind,
            spec.max_chars,
            spec.max_items,
            spec.items.is_some(),
            &spec.fields,
        )?;
        if let Some(items) = &spec.items {
            check_shape(
                label,
                &format!("{at}[]"),
                items.kind,
                items.max_chars,
                None,
                false,
                &items.fields,
            )?;
        }
    }
    Ok(())
}

fn check_shape(
    label: &str,
    at: &str,
    kind: InputKind,
    max_chars: Option<usize>,
    max_items: Option<usize>,
    has_items: bool,
    fields: &[InputSpec],
) -> Result<(), TemplateError> {
    let invalid = |message: String| TemplateError::Invalid {
        template: label.to_owned(),
        location: format!("input `{at}`"),
        message,
    };
    let textual = matches!(kind, InputKind::String | InputKind::Text);
    if max_chars.is_some() && !textual {
        return Err(invalid(format!(
            "max_chars applies to string and text inputs, not {kind}"
        )));
    }
    if (max_items.is_some() || has_items) && kind != InputKind::List {
        return Err(invalid(format!(
            "max_items and items apply to list inputs, not {kind}"
        )));
    }
    if !fields.is_empty() && kind != InputKind::Object {
        return Err(invalid(format!(
            "fields apply to object inputs, not {kind}"
        )));
    }
    check_specs(label, at, fields)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "true/false",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn check_fields(
    path: &str,
    specs: &[InputSpec],
    map: &Map<String, Value>,
    unknown: &str,
) -> Result<(), InputError> {
    for key in map.keys() {
        if !specs.iter().any(|s| &s.name == key) {
            let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            return Err(InputError::new(
                format!("{path}.{key}"),
                format!("{unknown} (expected one of: {})", names.join(", ")),
            ));
        }
    }
    for spec in specs {
        let field = format!("{path}.{}", spec.name);
        match map.get(&spec.name) {
            None | Some(Value::Null) => {
                if spec.required {
                    return Err(InputError::new(field, "is required"));
                }
            }
            Some(v) => check_value(
                &field,
                Shape {
                    kind: spec.kind,
                    required: spec.required,
                    max_chars: spec.max_chars,
                    max_items: spec.max_items,
                    items: spec.items.as_deref(),
                    fields: &spec.fields,
                },
                v,
            )?,
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Shape<'a> {
    kind: InputKind,
    required: bool,
    max_chars: Option<usize>,
    max_items: Option<usize>,
    items: Option<&'a ItemSpec>,
    fields: &'a [InputSpec],
}

/// The characters a blank input consists of: Unicode's White_Space (what `str::trim` removes)
/// and U+FEFF, which JSON Schema's regex dialect (ECMA-262) counts as `\s` too.
const BLANK: [char; 26] = [
    '\t', '\n', '\u{0b}', '\u{0c}', '\r', ' ', '\u{85}', '\u{a0}', '\u{1680}', '\u{2000}',
    '\u{2001}', '\u{2002}', '\u{2003}', '\u{2004}', '\u{2005}', '\u{2006}', '\u{2007}', '\u{2008}',
    '\u{2009}', '\u{200a}', '\u{2028}', '\u{2029}', '\u{202f}', '\u{205f}', '\u{3000}', '\u{feff}',
];

/// Characters that show nothing but are not White_Space: a name made only of them is blank too.
const INVISIBLE: [char; 6] = [
    '\u{ad}', '\u{180e}', '\u{200b}', '\u{200c}', '\u{200d}', '\u{2060}',
];

/// A JSON Schema `pattern` that a string matches exactly when it is not blank (see
/// [`is_blank`]). It names the characters instead of using `\S`, whose meaning differs between
/// regex dialects (ECMA-262 leaves out U+0085, Rust and Python do not).
pub const NOT_BLANK_PATTERN: &str = "[^\\t\\n\\u000b\\f\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff\\u00ad\\u180e\\u200b-\\u200d\\u2060]";

/// Whether a required string input counts as missing: empty, or only blank characters
/// (Unicode's White_Space, the BOM, and invisible ones such as a zero-width space).
pub fn is_blank(s: &str) -> bool {
    s.chars()
        .all(|c| BLANK.contains(&c) || INVISIBLE.contains(&c))
}

/// Whether no input text may carry `c`: C0 and C1 control characters (tab, newline and carriage
/// return are allowed in `text` inputs, which are `multiline`), DEL, and the bidirectional
/// embeddings, overrides and isolates (U+202A–U+202E, U+2066–U+2069), which make text read
/// differently from what it is.
pub fn is_forbidden_char(c: char, multiline: bool) -> bool {
    match c {
        '\t' | '\n' | '\r' => !multiline,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' => true,
        '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => true,
        _ => false,
    }
}

/// The characters of [`is_forbidden_char`], as the inside of a regex class (ECMA-262, Python and
/// Rust read `\uXXXX` alike).
fn forbidden_class(multiline: bool) -> &'static str {
    if multiline {
        "\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069"
    } else {
        "\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069"
    }
}

/// The JSON Schema `pattern` of a string input: no forbidden character, and when `required`
/// at least one that is not blank. Exactly what [`Template::validate_inputs`] accepts.
pub fn string_pattern(multiline: bool, required: bool) -> String {
    let forbidden = forbidden_class(multiline);
    if required {
        let blank = &NOT_BLANK_PATTERN[2..NOT_BLANK_PATTERN.len() - 1];
        format!("^[^{forbidden}]*[^{forbidden}{blank}][^{forbidden}]*$")
    } else {
        format!("^[^{forbidden}]*$")
    }
}

fn check_value(path: &str, shape: Shape<'_>, v: &Value) -> Result<(), InputError> {
    let mismatch = || {
        InputError::new(
            path,
            format!("expected {}, got {}", shape.kind.expected(), json_kind(v)),
        )
    };
    match shape.kind {
        InputKind::String | InputKind::Text => {
            let s = v.as_str().ok_or_else(mismatch)?;
            let multiline = shape.kind == InputKind::Text;
            if let Some((at, c)) = s
                .chars()
                .enumerate()
                .find(|(_, c)| is_forbidden_char(*c, multiline))
            {
                let what = if ('\u{202a}'..='\u{2069}').contains(&c) {
                    "a bidirectional text control"
                } else {
                    "a control character"
                };
                let allowed = if multiline {
                    "text inputs allow tab and line breaks"
                } else {
                    "string inputs are one line: no tab or line break either"
                };
                return Err(InputError::new(
                    path,
                    format!(
                        "contains {what} (U+{:04X}) at character {}; {allowed}",
                        c as u32,
                        at + 1
                    ),
                ));
            }
            if shape.required && is_blank(s) {
                return Err(InputError::new(path, "must not be empty"));
            }
            if let Some(max) = shape.max_chars {
                let n = s.chars().count();
                if n > max {
                    return Err(InputError::new(
                        path,
                        format!("is {n} characters long, the limit is {max}"),
                    ));
                }
            }
        }
        InputKind::Number => {
            v.as_number().ok_or_else(mismatch)?;
        }
        InputKind::Bool => {
            v.as_bool().ok_or_else(mismatch)?;
        }
        InputKind::List => {
            let list = v.as_array().ok_or_else(mismatch)?;
            if shape.required && list.is_empty() {
                return Err(InputError::new(path, "must have at least one item"));
            }
            if let Some(max) = shape.max_items
                && list.len() > max
            {
                return Err(InputError::new(
                    path,
                    format!("has {} items, the limit is {max}", list.len()),
                ));
            }
            for (i, item) in list.iter().enumerate() {
                let at = format!("{path}[{i}]");
                if item.is_null() {
                    return Err(InputError::new(at, "must not be null"));
                }
                if let Some(spec) = shape.items {
                    let item_shape = Shape {
                        kind: spec.kind,
                        required: true,
                        max_chars: spec.max_chars,
                        max_items: None,
                        items: None,
                        fields: &spec.fields,
                    };
                    check_value(&at, item_shape, item)?;
                }
            }
        }
        InputKind::Object => {
            let map = v.as_object().ok_or_else(mismatch)?;
            if !shape.fields.is_empty() {
                check_fields(path, shape.fields, map, "is not a known field")?;
            }
        }
    }
    Ok(())
}

fn fill_nulls(specs: &[InputSpec], map: &mut Map<String, Value>) {
    for spec in specs {
        let v = map.entry(spec.name.clone()).or_insert(Value::Null);
        match v {
            Value::Object(inner) if !spec.fields.is_empty() => fill_nulls(&spec.fields, inner),
            Value::Array(items) => {
                if let Some(item_spec) = spec.items.as_deref().filter(|i| !i.fields.is_empty()) {
                    for item in items {
                        if let Value::Object(inner) = item {
                            fill_nulls(&item_spec.fields, inner);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BASE: &str = r#"
name = "t"
title = "T"

[[inputs]]
name = "idea"
kind = "text"
required = true
max_chars = 20

[[inputs]]
name = "stage"
kind = "string"

[[inputs]]
name = "personas"
kind = "list"
max_items = 3
[inputs.items]
kind = "object"
[[inputs.items.fields]]
name = "name"
kind = "string"
required = true
[[inputs.items.fields]]
name = "description"
kind = "text"
max_chars = 10

[[sections]]
id = "a"
title = "A"
prompt = "{{ inputs.idea }}"
"#;

    fn with_sections(extra: &str) -> String {
        format!("{BASE}\n{extra}")
    }

    fn err(text: &str) -> String {
        Template::from_toml("t.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn base_template_loads() {
        let t = Template::from_toml("t.toml", BASE).unwrap();
        assert_eq!(t.sections.len(), 1);
        assert_eq!(t.inputs[2].items.as_ref().unwrap().fields.len(), 2);
        assert_eq!(t.default_lane(), Lane::Interactive);
    }

    #[test]
    fn toml_errors_name_the_file_and_unknown_keys() {
        let e = err(&with_sections(
            "[[sections]]\nid = \"b\"\ntitle = \"B\"\nprompt = \"x\"\ndepnds_on = [\"a\"]\n",
        ));
        assert!(
            e.starts_with("template t.toml is not a valid template file"),
            "{e}"
        );
        assert!(e.contains("depnds_on"), "{e}");
    }

    #[test]
    fn duplicate_section_ids_are_rejected() {
        let e = err(&with_sections(
            "[[sections]]\nid = \"a\"\ntitle = \"A2\"\nprompt = \"x\"\n",
        ));
        assert_eq!(e, "template t.toml: section `a` is defined more than once");
    }

    #[test]
    fn unknown_dependencies_are_rejected() {
        let e = err(&with_sections(
            "[[sections]]\nid = \"b\"\ntitle = \"B\"\nprompt = \"x\"\ndepends_on = [\"nope\"]\n",
        ));
        assert_eq!(
            e,
            "template t.toml: section `b` depends on `nope`, which is not a section of this template"
        );
    }

    #[test]
    fn cycles_are_printed() {
        let e = err(&with_sections(
            "[[sections]]\nid = \"b\"\ntitle = \"B\"\nprompt = \"x\"\ndepends_on = [\"c\"]\n\
             [[sections]]\nid = \"c\"\ntitle = \"C\"\nprompt = \"x\"\ndepends_on = [\"d\"]\n\
             [[sections]]\nid = \"d\"\ntitle = \"D\"\nprompt = \"x\"\ndepends_on = [\"a\", \"b\"]\n",
        ));
        assert_eq!(e, "template t.toml: dependency cycle: b -> c -> d -> b");
        let e = err(&with_sections(
            "[[sections]]\nid = \"b\"\ntitle = \"B\"\nprompt = \"x\"\ndepends_on = [\"b\"]\n",
        ));
        assert_eq!(e, "template t.toml: dependency cycle: b -> b");
    }

    #[test]
    fn for_each_must_name_a_list_input() {
        let e = err(&with_sections(
            "[[sections]]\nid = \"b\"\ntitle = \"B\"\nprompt = \"x\"\nfor_each = \"stage\"\n",
        ));
        assert_eq!(
            e,
            "template t.toml: section `b`: for_each = \"stage\": the input is string, not a list"
        );
        let e = err(&with_sections(
            "[[sections]]\nid = \"b\"\ntitle = \"B\"\nprompt = \"x\"\nfor_each = \"people\"\n",
        ));
        assert!(
            e.contains("section `b`: for_each = \"people\": the template has no such input"),
            "{e}"
        );
    }

    #[test]
    fn prompts_that_do_not_compile_name_the_section_and_the_error() {
        let e = err(&with_sections(
            "[[sections]]\nid = \"b\"\ntitle = \"B\"\nprompt = \"{% if inputs.idea %}open\"\n",
        ));
        assert!(
            e.starts_with("template t.toml: section `b` prompt does not compile: "),
            "{e}"
        );
        assert!(e.contains("syntax error"), "{e}");
        let e = err(&with_sections(
            "[[sections]]\nid = \"b\"\ntitle = \"B\"\nprompt = \"x\"\nsystem = \"{{ unclosed \"\n",
        ));
        assert!(e.contains("section `b` system does not compile"), "{e}");
    }

    #[test]
    fn prompts_may_only_use_declared_dependencies_inputs_and_item() {
        let e = err(&with_sections(
            "[[sections]]\nid = \"b\"\ntitle = \"B\"\nprompt = \"{{ sections.a }}\"\n",
        ));
        assert_eq!(
            e,
            "template t.toml: section `b`: prompt uses `sections.a` but `a` is not in its depends_on"
        );
        let e = err(&with_sections(
            "[[sections]]\nid = \"b\"\ntitle = \"B\"\nprompt = \"{{ inputs.idae }}\"\n",
        ));
        assert_eq!(
            e,
            "template t.toml: section `b`: prompt uses `inputs.idae` but the template has no input `idae`"
        );
        let e = err(&with_sections(
            "[[sections]]\nid = \"b\"\ntitle = \"B\"\nprompt = \"{{ item.name }}\"\n",
        ));
        assert!(
            e.contains("section `b`: prompt uses `item` but the section has no for_each"),
            "{e}"
        );
        let e = err(&with_sections(
            "[[sections]]\nid = \"b\"\ntitle = \"B\"\nprompt = \"{{ item.nmae }}\"\nfor_each = \"personas\"\n",
        ));
        assert!(
            e.contains("uses `item.nmae` but items of `personas` have no field `nmae`"),
            "{e}"
        );
        let e = err(&with_sections(
            "[[sections]]\nid = \"b\"\ntitle = \"B\"\nprompt = \"{{ idea }}\"\n",
        ));
        assert!(
            e.contains("prompt uses `idea`, which prompts cannot see"),
            "{e}"
        );
        // Loop variables, `set` and builtin functions are fine.
        Template::from_toml(
            "t.toml",
            &with_sections(
                "[[sections]]\nid = \"b\"\ntitle = \"B\"\ndepends_on = [\"a\"]\n\
                 prompt = \"{% set n = 2 %}{% for i in range(n) %}{{ loop.index }}{{ i }}{% endfor %}{{ sections.a }}\"\n",
            ),
        )
        .unwrap();
    }

    #[test]
    fn other_declaration_mistakes_are_named() {
        let bad_lane = BASE.replace("title = \"T\"", "title = \"T\"\nlane = \"fast\"");
        assert!(err(&bad_lane).contains("lane: unknown lane `fast`"));
        let bad_id = with_sections("[[sections]]\nid = \"b-c\"\ntitle = \"B\"\nprompt = \"x\"\n");
        assert!(err(&bad_id).contains("section `b-c`: a section id must start"));
        let bad_temp = with_sections(
            "[[sections]]\nid = \"b\"\ntitle = \"B\"\nprompt = \"x\"\ntemperature = 3.0\n",
        );
        assert!(err(&bad_temp).contains("section `b`: temperature 3 is outside"));
        let bad_max = BASE.replace(
            "name = \"stage\"\nkind = \"string\"",
            "name = \"stage\"\nkind = \"number\"\nmax_chars = 3",
        );
        assert!(err(&bad_max).contains(
            "input `inputs.stage`: max_chars applies to string and text inputs, not number"
        ));
        let dup = BASE.replace("name = \"stage\"", "name = \"idea\"");
        assert!(err(&dup).contains("input `inputs.idea`: is declared more than once"));
    }

    #[test]
    fn input_errors_name_the_field_path() {
        let t = Template::from_toml("t.toml", BASE).unwrap();
        let check = |v: Value| t.validate_inputs(&v).unwrap_err();

        assert_eq!(check(json!([])).field, "inputs");
        let e = check(json!({}));
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("inputs.idea", "is required")
        );
        assert_eq!(check(json!({"idea": null})).field, "inputs.idea");
        assert_eq!(check(json!({"idea": "  "})).message, "must not be empty");
        assert_eq!(
            check(json!({"idea": "\u{a0}\u{feff}\u{200b}"})).message,
            "must not be empty"
        );
        let e = check(json!({"idea": 5}));
        assert_eq!(
            e.to_string(),
            "inputs.idea: expected a string, got a number"
        );
        let e = check(json!({"idea": "x".repeat(21)}));
        assert_eq!(
            e.to_string(),
            "inputs.idea: is 21 characters long, the limit is 20"
        );
        // max_chars counts characters, not bytes
        t.validate_inputs(&json!({"idea": "é".repeat(20)})).unwrap();

        let e = check(json!({"idea": "x", "extra": 1}));
        assert_eq!(e.field, "inputs.extra");
        assert!(e.message.starts_with(
            "is not an input of this template (expected one of: idea, stage, personas)"
        ));

        let p = |n: usize| json!({"name": format!("p{n}")});
        let e = check(json!({"idea": "x", "personas": [p(0), p(1), p(2), p(3)]}));
        assert_eq!(
            e.to_string(),
            "inputs.personas: has 4 items, the limit is 3"
        );
        let e = check(json!({"idea": "x", "personas": [p(0), p(1), {"description": "d"}]}));
        assert_eq!(e.to_string(), "inputs.personas[2].name: is required");
        let e = check(json!({"idea": "x", "personas": [p(0), {"name": "n", "age": 3}]}));
        assert_eq!(e.field, "inputs.personas[1].age");
        assert!(e.message.starts_with("is not a known field"));
        let e = check(json!({"idea": "x", "personas": [p(0), "bob"]}));
        assert_eq!(
            e.to_string(),
            "inputs.personas[1]: expected an object, got a string"
        );
        let e =
            check(json!({"idea": "x", "personas": [{"name": "n", "description": "0123456789ab"}]}));
        assert_eq!(e.field, "inputs.personas[0].description");
        let e = check(json!({"idea": "x", "personas": "bob"}));
        assert_eq!(
            e.to_string(),
            "inputs.personas: expected a list, got a string"
        );

        t.validate_inputs(&json!({"idea": "x", "stage": null, "personas": [p(0)]}))
            .unwrap();
        t.validate_inputs(&json!({"idea": "x"})).unwrap();
    }

    #[test]
    fn normalized_inputs_fill_declared_fields_with_null() {
        let t = Template::from_toml("t.toml", BASE).unwrap();
        let n = t.normalized_inputs(&json!({"idea": "x", "personas": [{"name": "a"}]}));
        assert_eq!(
            n,
            json!({"idea": "x", "stage": null, "personas": [{"name": "a", "description": null}]})
        );
    }

    #[test]
    fn templates_round_trip_through_json() {
        // The aggregator stores the template with the report.
        let t = Template::from_toml("t.toml", BASE).unwrap();
        let back: Template = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn load_dir_keys_by_name_and_rejects_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("one.toml"), BASE).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let all = Template::load_dir(dir.path()).unwrap();
        assert_eq!(all.keys().collect::<Vec<_>>(), ["t"]);
        std::fs::write(dir.path().join("two.toml"), BASE).unwrap();
        let e = Template::load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("one.toml") && e.contains("two.toml") && e.contains("`t`"),
            "{e}"
        );
        let e = Template::load(&dir.path().join("missing.toml")).unwrap_err();
        assert!(e.to_string().starts_with("cannot read template"), "{e}");
    }
}

/// The templates and examples shipped in `config/`: every template loads, every example is
/// valid for its template, and every job of every example renders.
#[cfg(test)]
pub(crate) mod shipped {
    use super::*;

    pub(crate) fn config_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config")
    }

    pub(crate) fn template(name: &str) -> Template {
        Template::load(&config_dir().join("templates").join(format!("{name}.toml"))).unwrap()
    }

    pub(crate) fn example(name: &str) -> Value {
        let path = config_dir().join("examples").join(format!("{name}.json"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn every_template_loads_and_every_example_validates_and_renders() {
        let templates = Template::load_dir(&config_dir().join("templates")).unwrap();
        assert!(templates.contains_key("startup-report"));
        assert!(templates.contains_key("persona-panel"));
        for name in templates.keys() {
            let file = config_dir().join("templates").join(format!("{name}.toml"));
            assert!(
                file.is_file(),
                "template `{name}` must live in {}",
                file.display()
            );
        }

        let mut examples = 0;
        for entry in std::fs::read_dir(config_dir().join("examples")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            examples += 1;
            let stem = path.file_stem().unwrap().to_str().unwrap();
            let t = templates
                .get(stem)
                .unwrap_or_else(|| panic!("{} has no template named `{stem}`", path.display()));
            let inputs: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let graph = t
                .job_graph(&inputs)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));

            // Every job renders, both with its dependencies done and with them all failed.
            for node in &graph.jobs {
                let section = t.section(&node.section).unwrap();
                let done: BTreeMap<String, DepOutput> = section
                    .depends_on
                    .iter()
                    .map(|d| {
                        let dep = t.section(d).unwrap();
                        let out = match dep.for_each {
                            None => DepOutput::Text(Some(format!("<<{d} output>>"))),
                            Some(_) => DepOutput::List(
                                (0..t.item_count(dep, &inputs))
                                    .map(|i| Some(format!("<<{d}[{i}] output>>")))
                                    .collect(),
                            ),
                        };
                        (d.clone(), out)
                    })
                    .collect();
                let p = render_prompt(t, node, &inputs, &done, "default-model")
                    .unwrap_or_else(|e| panic!("{e}"));
                for d in &section.depends_on {
                    assert!(
                        p.user.contains(&format!("<<{d}")),
                        "{}: prompt of {} lacks its dependency {d}",
                        t.name,
                        node.id
                    );
                }
                assert!(
                    !p.user.contains("\n\n\n"),
                    "{}: {} has blank runs",
                    t.name,
                    node.id
                );
                assert!(
                    p.system.is_some(),
                    "{}: {} has no system prompt",
                    t.name,
                    node.id
                );
                render_prompt(t, node, &inputs, &BTreeMap::new(), "default-model")
                    .unwrap_or_else(|e| panic!("with failed dependencies: {e}"));
            }
        }
        assert!(
            examples >= 2,
            "config/examples holds an example per shipped template"
        );
    }

    #[test]
    fn startup_report_prompts_carry_the_brief_and_the_chain() {
        let t = template("startup-report");
        let inputs = example("startup-report");
        let g = t.job_graph(&inputs).unwrap();
        let deps = BTreeMap::from([
            (
                "profile".to_owned(),
                DepOutput::Text(Some("FIT: 8/10 SENTINEL".into())),
            ),
            ("research".to_owned(), DepOutput::Text(None)),
        ]);
        let p = render_prompt(&t, g.get("recommendations").unwrap(), &inputs, &deps, "x").unwrap();
        assert!(p.user.contains("FIT: 8/10 SENTINEL"));
        assert!(p.user.contains("(Unavailable: base the recommendations"));
        assert!(p.user.contains("**Budget and runway:** EUR 60,000"));
        assert_eq!((p.model.as_str(), p.max_tokens), ("gpt-4o-mini", 1100));

        // Only the required input: optional parts of the brief disappear, nothing breaks.
        let minimal = serde_json::json!({"idea": "A marketplace for used lab equipment."});
        let g = t.job_graph(&minimal).unwrap();
        let p = render_prompt(
            &t,
            g.get("profile").unwrap(),
            &minimal,
            &BTreeMap::new(),
            "x",
        )
        .unwrap();
        assert!(
            p.user
                .starts_with("## The founder's brief\n\n**Idea:**\nA marketplace"),
            "{}",
            p.user
        );
        assert!(!p.user.contains("**Stage:**"));
        assert!(p.user.contains("The brief has no founder profile"));
    }

    #[test]
    fn persona_panel_renders_each_persona_and_a_summary_that_notes_missing_ones() {
        let t = template("persona-panel");
        let inputs = example("persona-panel");
        let g = t.job_graph(&inputs).unwrap();
        let p = render_prompt(
            &t,
            g.get("persona[3]").unwrap(),
            &inputs,
            &BTreeMap::new(),
            "x",
        )
        .unwrap();
        assert!(
            p.user
                .starts_with("You are Javier Morales.\n49, finance director"),
            "{}",
            p.user
        );
        assert!(p.user.contains("Background: Has a procurement system"));
        assert!(p.user.contains("one of 20 people"));
        assert!(p.user.contains("--- BEGIN LANDING PAGE ---\n# Kitchenly"));
        assert!(p.user.contains("Score: N/10"));
        assert_eq!(p.temperature, Some(0.8));

        let mut critiques: Vec<Option<String>> = (0..20)
            .map(|i| Some(format!("critique number {i}")))
            .collect();
        critiques[7] = None;
        let deps = BTreeMap::from([("persona".to_owned(), DepOutput::List(critiques))]);
        let s = render_prompt(&t, g.get("summary").unwrap(), &inputs, &deps, "x").unwrap();
        assert!(
            s.user.contains("19 of 20 critiques are available"),
            "{}",
            s.user
        );
        assert!(
            s.user
                .contains("### 8. Daniel Costa\n*Who they are:* 38, runs two")
        );
        assert!(
            s.user
                .contains("(Missing: this critique could not be collected.")
        );
        assert!(s.user.contains("critique number 19"));
        assert!(
            s.user
                .contains("name the personas whose critiques are missing")
        );
        assert!(
            s.system
                .unwrap()
                .starts_with("You are a senior user researcher")
        );

        let all = BTreeMap::from([(
            "persona".to_owned(),
            DepOutput::List((0..20).map(|i| Some(format!("c{i}"))).collect()),
        )]);
        let s = render_prompt(&t, g.get("summary").unwrap(), &inputs, &all, "x").unwrap();
        assert!(s.user.contains("20 of 20 critiques are available."));
        assert!(
            s.user
                .contains("State that all 20 critiques were available.")
        );
    }

    #[test]
    fn inputs_carry_no_control_or_bidi_characters_and_names_are_not_blank() {
        let t = template("persona-panel");
        let with = |name: &str, description: &str| {
            let mut inputs = example("persona-panel");
            inputs["personas"][1]["name"] = serde_json::json!(name);
            inputs["personas"][1]["description"] = serde_json::json!(description);
            inputs
        };
        for (name, description, field, words) in [
            ("Ada\u{0}", "d", "inputs.personas[1].name", "U+0000"),
            (
                "\u{1b}[31mAda",
                "d",
                "inputs.personas[1].name",
                "control character (U+001B) at character 1",
            ),
            ("Ada\u{7}", "d", "inputs.personas[1].name", "U+0007"),
            ("Ada\u{85}", "d", "inputs.personas[1].name", "U+0085"),
            ("Ada\nLovelace", "d", "inputs.personas[1].name", "one line"),
            ("Ada\tLovelace", "d", "inputs.personas[1].name", "one line"),
            (
                "\u{202e}ecalevoL",
                "d",
                "inputs.personas[1].name",
                "bidirectional",
            ),
            (
                "Ada",
                "a\u{2066}b",
                "inputs.personas[1].description",
                "U+2066",
            ),
            (
                "Ada",
                "a\u{1b}b",
                "inputs.personas[1].description",
                "U+001B",
            ),
            (
                "\u{200b}",
                "d",
                "inputs.personas[1].name",
                "must not be empty",
            ),
            (
                " \u{feff}\u{2060} ",
                "d",
                "inputs.personas[1].name",
                "must not be empty",
            ),
        ] {
            let e = t.validate_inputs(&with(name, description)).unwrap_err();
            assert_eq!(e.field, field, "{name:?}");
            assert!(e.message.contains(words), "{name:?}: {}", e.message);
        }
        // Text keeps its lines and tabs; names keep any script, and marks like U+200E.
        t.validate_inputs(&with(
            "Zoë \u{5e9}\u{5dc}\u{5d5}\u{5dd}\u{200e}",
            "a\n\tb\r\nc",
        ))
        .unwrap();
        // `<script>` is text like any other: refused nowhere, escaped where it is rendered.
        t.validate_inputs(&with("<script>alert(1)</script>", "*x*"))
            .unwrap();
    }

    #[test]
    fn the_schema_patterns_accept_exactly_what_validation_accepts() {
        let samples = [
            "",
            " ",
            "a",
            "Ada Lovelace",
            "a\nb",
            "a\tb",
            "a\r\nb",
            "\u{0}",
            "a\u{1b}",
            "\u{7f}",
            "\u{85}",
            "\u{9f}x",
            "\u{a0}",
            "x\u{202a}",
            "\u{202e}",
            "\u{2066}y",
            "\u{2069}",
            "\u{200b}",
            "\u{200e}a",
            "\u{feff}",
            "日本",
            "<b>",
            "\u{3000}z",
        ];
        for multiline in [false, true] {
            for required in [false, true] {
                let re = regex::Regex::new(&string_pattern(multiline, required)).unwrap();
                for s in samples {
                    let forbidden = s.chars().any(|c| is_forbidden_char(c, multiline));
                    let valid = !(forbidden || required && is_blank(s));
                    assert_eq!(
                        re.is_match(s),
                        valid,
                        "{s:?} multiline={multiline} required={required}"
                    );
                }
            }
        }
    }

    #[test]
    fn blank_is_unicode_white_space_and_the_bom_and_the_pattern_names_the_same() {
        let expected: Vec<char> = (0..=0x10FFFF_u32)
            .filter_map(char::from_u32)
            .filter(|c| c.is_whitespace() || *c == '\u{feff}')
            .collect();
        let mut blank = BLANK.to_vec();
        blank.sort_unstable();
        assert_eq!(blank, expected);
        let mut expected = expected;
        expected.extend(INVISIBLE);
        expected.sort_unstable();
        assert!(is_blank("") && is_blank(" \t\u{85}\u{3000}") && is_blank("\u{200b}"));
        assert!(!is_blank("\u{1c}") && !is_blank(" a "));
        // The pattern's class, read back: every escape names a BLANK char, ranges included.
        let class = NOT_BLANK_PATTERN
            .strip_prefix("[^")
            .and_then(|p| p.strip_suffix(']'))
            .unwrap();
        let mut named = Vec::new();
        let mut rest = class;
        while !rest.is_empty() {
            let (c, tail) = match rest.strip_prefix('\\') {
                Some(esc) if esc.starts_with('u') => (
                    char::from_u32(u32::from_str_radix(&esc[1..5], 16).unwrap()).unwrap(),
                    &esc[5..],
                ),
                Some(esc) => (
                    match &esc[..1] {
                        "t" => '\t',
                        "n" => '\n',
                        "f" => '\u{0c}',
                        "r" => '\r',
                        other => panic!("escape {other}"),
                    },
                    &esc[1..],
                ),
                None => (rest.chars().next().unwrap(), &rest[1..]),
            };
            if let Some(after) = tail.strip_prefix('-') {
                let end = u32::from_str_radix(&after[2..6], 16).unwrap();
                named.extend((c as u32..=end).filter_map(char::from_u32));
                rest = &after[6..];
            } else {
                named.push(c);
                rest = tail;
            }
        }
        named.sort_unstable();
        assert_eq!(named, expected);
    }
}
