//! Small domain enums shared by the aggregator, the workers and the API: the state of one
//! section, the status of a whole report and the lane a report runs in.
//!
//! Each has a stable lowercase wire name (`as_str`, `Display`, `FromStr`, serde) because the
//! aggregator stores them as strings in Redis and the API returns them as JSON; their OpenAPI
//! schema (`utoipa::ToSchema`) is a string enum of those names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A name that is not one of an enum's wire names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{value}`, expected one of: {expected}")]
pub struct ParseEnumError {
    pub what: &'static str,
    pub value: String,
    pub expected: &'static str,
}

macro_rules! wire_enum {
    ($ty:ident, $what:literal, $($variant:ident => $name:literal),+ $(,)?) => {
        impl $ty {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The wire name (what serde, `Display` and Redis use).
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }

            /// Parses a wire name (exact, lowercase).
            pub fn parse(name: &str) -> Option<Self> {
                match name {
                    $($name => Some($ty::$variant),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = ParseEnumError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s).ok_or_else(|| ParseEnumError {
                    what: $what,
                    value: s.to_owned(),
                    expected: concat!($($name, ", "),+).trim_end_matches(", "),
                })
            }
        }
    };
}

/// Where one section (one job of the graph) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SectionState {
    /// Waiting for dependencies.
    Pending,
    /// Every dependency is terminal; the job is on the queue.
    Ready,
    /// A worker is calling the provider.
    Running,
    Done,
    Failed,
    /// Not run because a dependency failed (`on_dependency_failure = "skip"`).
    Skipped,
    Cancelled,
}

wire_enum!(SectionState, "section state",
    Pending => "pending",
    Ready => "ready",
    Running => "running",
    Done => "done",
    Failed => "failed",
    Skipped => "skipped",
    Cancelled => "cancelled",
);

impl SectionState {
    /// No further transition happens from this state.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Done | Self::Failed | Self::Skipped | Self::Cancelled
        )
    }
}

/// The status of a whole report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReportStatus {
    Running,
    /// Every section is done, except `optional` ones that failed or were skipped.
    Completed,
    /// Every section is terminal, some are done, and at least one section that is not
    /// `optional` failed or was skipped.
    CompletedWithFailures,
    /// Every section is terminal and none is done.
    Failed,
    Cancelled,
}

wire_enum!(ReportStatus, "report status",
    Running => "running",
    Completed => "completed",
    CompletedWithFailures => "completed_with_failures",
    Failed => "failed",
    Cancelled => "cancelled",
);

impl ReportStatus {
    /// The report will not change any more.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Running)
    }
}

/// The queue lane a report's jobs go to: interactive reports (a user is waiting) are claimed
/// before batch ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    #[default]
    Interactive,
    Batch,
}

wire_enum!(Lane, "lane",
    Interactive => "interactive",
    Batch => "batch",
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip_through_serde_display_and_parse() {
        for s in SectionState::ALL {
            let json = serde_json::to_string(s).unwrap();
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(s.to_string().parse::<SectionState>().unwrap(), *s);
        }
        for s in ReportStatus::ALL {
            let json = serde_json::to_string(s).unwrap();
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(s.to_string().parse::<ReportStatus>().unwrap(), *s);
        }
        for l in Lane::ALL {
            assert_eq!(l.to_string().parse::<Lane>().unwrap(), *l);
        }
        assert_eq!(
            ReportStatus::CompletedWithFailures.as_str(),
            "completed_with_failures"
        );
        assert_eq!(Lane::default(), Lane::Interactive);
    }

    /// The type's OpenAPI schema is a string enum of exactly these names, in this order.
    fn assert_schema_names<T: utoipa::PartialSchema>(wire: impl Iterator<Item = &'static str>) {
        let schema = serde_json::to_value(T::schema()).unwrap();
        assert_eq!(schema["type"], "string", "{schema}");
        let wire: Vec<&str> = wire.collect();
        assert_eq!(schema["enum"], serde_json::json!(wire), "{schema}");
    }

    #[test]
    fn openapi_schemas_are_string_enums_of_the_wire_names() {
        assert_schema_names::<SectionState>(SectionState::ALL.iter().map(|s| s.as_str()));
        assert_schema_names::<ReportStatus>(ReportStatus::ALL.iter().map(|s| s.as_str()));
        assert_schema_names::<Lane>(Lane::ALL.iter().map(|l| l.as_str()));
    }

    #[test]
    fn unknown_names_are_rejected_with_the_choices() {
        let e = "fast".parse::<Lane>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown lane `fast`, expected one of: interactive, batch"
        );
        assert!("Done".parse::<SectionState>().is_err());
    }

    #[test]
    fn terminal_states() {
        let terminal: Vec<_> = SectionState::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [
                &SectionState::Done,
                &SectionState::Failed,
                &SectionState::Skipped,
                &SectionState::Cancelled
            ]
        );
        assert!(!ReportStatus::Running.is_terminal());
        assert!(ReportStatus::CompletedWithFailures.is_terminal());
        assert!(ReportStatus::Cancelled.is_terminal());
    }
}
