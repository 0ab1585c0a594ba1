//! The templates a producer knows: the built-in ones, then `reports.templates_dir`, then a path.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use fanout_core::template::{Template, TemplateError};

/// Built-in templates, so `fanout demo` and a bare install work without files.
const BUILTIN: &[(&str, &str)] = &[
    (
        "startup-report",
        include_str!("../../../config/templates/startup-report.toml"),
    ),
    (
        "persona-panel",
        include_str!("../../../config/templates/persona-panel.toml"),
    ),
];

/// Templates by name, loaded and validated at start.
#[derive(Debug, Clone, Default)]
pub struct Templates {
    by_name: BTreeMap<String, Arc<Template>>,
}

impl Templates {
    /// The built-in templates.
    pub fn builtin() -> Self {
        let mut t = Self::default();
        for (name, text) in BUILTIN {
            let template = Template::from_toml(name, text).expect("built-in templates are valid");
            t.by_name.insert((*name).to_owned(), Arc::new(template));
        }
        t
    }

    /// The built-ins, overlaid by every `*.toml` in `dir` (a missing dir is fine; a broken
    /// template in it is an error naming the file).
    pub fn load(dir: &Path) -> Result<Self, TemplateError> {
        let mut t = Self::builtin();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(t);
        };
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        for path in paths {
            let template = Template::load(&path)?;
            t.by_name.insert(template.name.clone(), Arc::new(template));
        }
        Ok(t)
    }

    /// A template by name, or by path when `name_or_path` ends in `.toml` or contains a `/`.
    pub fn resolve(&self, name_or_path: &str) -> Result<Arc<Template>, ResolveError> {
        if let Some(t) = self.by_name.get(name_or_path) {
            return Ok(t.clone());
        }
        if name_or_path.ends_with(".toml") || name_or_path.contains('/') {
            return Template::load(Path::new(name_or_path))
                .map(Arc::new)
                .map_err(ResolveError::Invalid);
        }
        Err(ResolveError::Unknown {
            name: name_or_path.to_owned(),
            known: self.names().join(", "),
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Template>> {
        self.by_name.values()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("unknown template `{name}`; known: {known} (or give a path to a .toml file)")]
    Unknown { name: String, known: String },
    #[error(transparent)]
    Invalid(TemplateError),
}
