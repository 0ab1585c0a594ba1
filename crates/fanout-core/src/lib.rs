#![doc = include_str!("../README.md")]

pub mod config;
pub mod dag;
pub mod job;
pub mod redis;
pub mod render;
pub mod report;
pub mod template;

pub use config::{ApiToken, Config, ConfigError, Role, Secret};
pub use dag::{JobGraph, JobNode};
pub use render::{DEFAULT_MAX_TOKENS, DepOutput, RenderError, RenderedPrompt, render_prompt};
pub use report::{Lane, ParseEnumError, ReportStatus, SectionState};
pub use template::{
    DependencyFailure, InputError, InputKind, InputSpec, ItemSpec, SectionSpec, Template,
    TemplateError,
};
