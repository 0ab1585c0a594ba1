//! The job graph: what a template becomes for one request.
//!
//! One job per section; a `for_each` section becomes one job per list item (`persona[0]`,
//! `persona[1]`, … in input order). A job depending on a `for_each` section depends on all of
//! its item jobs. Each job carries a priority: the length of the longest chain still ahead of
//! it, weighted by the expected duration of each step, so that when the budget binds the work
//! that gates the end of the report goes first.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::render::DEFAULT_MAX_TOKENS;
use crate::template::{SectionSpec, Template, TemplateError};

/// The jobs of one report, in template order (items of a `for_each` section in input order).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobGraph {
    pub jobs: Vec<JobNode>,
}

/// One job: one LLM call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobNode {
    /// `profile`, or `persona[3]` for an item of a `for_each` section (see [`job_id`]).
    pub id: String,
    /// The section it renders.
    pub section: String,
    /// The item index, for `for_each` sections.
    pub index: Option<usize>,
    /// Ids of the jobs that must be terminal before this one runs.
    pub depends_on: Vec<String>,
    /// Remaining critical path from this job to the end of the report, weighted by
    /// `max_tokens` and scaled to 1..=255: the first job of the longest chain gets 255.
    pub priority: u8,
}

impl JobGraph {
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    pub fn get(&self, id: &str) -> Option<&JobNode> {
        self.jobs.iter().find(|j| j.id == id)
    }

    /// Jobs without dependencies: ready as soon as the report exists.
    pub fn roots(&self) -> impl Iterator<Item = &JobNode> {
        self.jobs.iter().filter(|j| j.depends_on.is_empty())
    }

    /// Jobs that list `id` among their dependencies.
    pub fn dependents<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a JobNode> + 'a {
        self.jobs
            .iter()
            .filter(move |j| j.depends_on.iter().any(|d| d == id))
    }

    /// The jobs of one section, in item order.
    pub fn section_jobs<'a>(&'a self, section: &'a str) -> impl Iterator<Item = &'a JobNode> + 'a {
        self.jobs.iter().filter(move |j| j.section == section)
    }
}

/// The job id of a section's job: `section`, or `section[index]` for a `for_each` item.
pub fn job_id(section: &str, index: Option<usize>) -> String {
    match index {
        None => section.to_owned(),
        Some(i) => format!("{section}[{i}]"),
    }
}

/// Splits a job id into section id and item index (the inverse of [`job_id`]).
pub fn parse_job_id(id: &str) -> Option<(&str, Option<usize>)> {
    match id.strip_suffix(']') {
        None => (!id.is_empty() && !id.contains('[')).then_some((id, None)),
        Some(head) => {
            let (section, index) = head.split_once('[')?;
            let index = index.parse().ok()?;
            (!section.is_empty()).then_some((section, Some(index)))
        }
    }
}

/// Load-time checks of the dependency declarations: known ids, no repeats, no cycles.
pub(crate) fn check_dependencies(
    label: &str,
    sections: &[SectionSpec],
) -> Result<(), TemplateError> {
    let index: BTreeMap<&str, usize> = sections
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    for s in sections {
        for (n, dep) in s.depends_on.iter().enumerate() {
            if !index.contains_key(dep.as_str()) {
                return Err(TemplateError::UnknownDependency {
                    template: label.to_owned(),
                    section: s.id.clone(),
                    dependency: dep.clone(),
                });
            }
            if s.depends_on[..n].contains(dep) {
                return Err(TemplateError::Invalid {
                    template: label.to_owned(),
                    location: format!("section `{}`", s.id),
                    message: format!("depends_on lists `{dep}` twice"),
                });
            }
        }
    }
    // Depth-first search in template order; a dependency found on the current path closes a
    // cycle, printed from that dependency along the path back to itself.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    fn visit(
        i: usize,
        sections: &[SectionSpec],
        index: &BTreeMap<&str, usize>,
        marks: &mut [Mark],
        path: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        marks[i] = Mark::OnPath;
        path.push(i);
        for dep in &sections[i].depends_on {
            let d = index[dep.as_str()];
            match marks[d] {
                Mark::OnPath => {
                    let start = path.iter().position(|&p| p == d).unwrap_or(0);
                    let mut cycle = path[start..].to_vec();
                    cycle.push(d);
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(cycle) = visit(d, sections, index, marks, path) {
                        return Some(cycle);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks[i] = Mark::Done;
        None
    }
    let mut marks = vec![Mark::New; sections.len()];
    for i in 0..sections.len() {
        if marks[i] == Mark::New
            && let Some(cycle) = visit(i, sections, &index, &mut marks, &mut Vec::new())
        {
            let names: Vec<&str> = cycle.iter().map(|&c| sections[c].id.as_str()).collect();
            return Err(TemplateError::Cycle {
                template: label.to_owned(),
                cycle: names.join(" -> "),
            });
        }
    }
    Ok(())
}

/// Expands a validated template for validated inputs.
pub(crate) fn build(t: &Template, inputs: &Value) -> JobGraph {
    let n = t.sections.len();
    let pos: BTreeMap<&str, usize> = t
        .sections
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    let job_ids: Vec<Vec<String>> = t
        .sections
        .iter()
        .map(|s| match s.for_each {
            None => vec![job_id(&s.id, None)],
            Some(_) => (0..t.item_count(s, inputs))
                .map(|i| job_id(&s.id, Some(i)))
                .collect(),
        })
        .collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, s) in t.sections.iter().enumerate() {
        for dep in &s.depends_on {
            dependents[pos[dep.as_str()]].push(i);
        }
    }

    // Remaining critical path per section (all items of a section share it). A section without
    // jobs (an empty for_each list) gates nothing, so it does not lengthen its dependencies'.
    fn remaining(
        i: usize,
        t: &Template,
        dependents: &[Vec<usize>],
        job_ids: &[Vec<String>],
        memo: &mut [Option<u64>],
    ) -> u64 {
        if let Some(v) = memo[i] {
            return v;
        }
        let weight = u64::from(t.sections[i].max_tokens.unwrap_or(DEFAULT_MAX_TOKENS));
        let tail = dependents[i]
            .iter()
            .filter(|&&d| !job_ids[d].is_empty())
            .map(|&d| remaining(d, t, dependents, job_ids, memo))
            .max()
            .unwrap_or(0);
        memo[i] = Some(weight + tail);
        weight + tail
    }
    let mut memo = vec![None; n];
    let cp: Vec<u64> = (0..n)
        .map(|i| remaining(i, t, &dependents, &job_ids, &mut memo))
        .collect();
    let longest = (0..n)
        .filter(|&i| !job_ids[i].is_empty())
        .map(|i| cp[i])
        .max()
        .unwrap_or(1)
        .max(1);

    let mut jobs = Vec::new();
    for (i, s) in t.sections.iter().enumerate() {
        let depends_on: Vec<String> = s
            .depends_on
            .iter()
            .flat_map(|d| job_ids[pos[d.as_str()]].iter().cloned())
            .collect();
        // Rounded up so that no job falls to 0 and only the longest chain's head reaches 255.
        let priority = (cp[i] * 255).div_ceil(longest).clamp(1, 255) as u8;
        for (item, id) in job_ids[i].iter().enumerate() {
            jobs.push(JobNode {
                id: id.clone(),
                section: s.id.clone(),
                index: s.for_each.as_ref().map(|_| item),
                depends_on: depends_on.clone(),
                priority,
            });
        }
    }
    JobGraph { jobs }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(sections: &str) -> Template {
        let text = format!(
            "name = \"t\"\ntitle = \"T\"\n[[inputs]]\nname = \"xs\"\nkind = \"list\"\n{sections}"
        );
        Template::from_toml("t.toml", &text).unwrap()
    }

    fn section(id: &str, max_tokens: u32, deps: &[&str], for_each: bool) -> String {
        format!(
            "[[sections]]\nid = \"{id}\"\ntitle = \"{id}\"\nprompt = \"x\"\nmax_tokens = {max_tokens}\ndepends_on = {deps:?}\n{}",
            if for_each { "for_each = \"xs\"\n" } else { "" }
        )
    }

    #[test]
    fn job_ids_round_trip() {
        assert_eq!(job_id("profile", None), "profile");
        assert_eq!(job_id("persona", Some(3)), "persona[3]");
        assert_eq!(parse_job_id("profile"), Some(("profile", None)));
        assert_eq!(parse_job_id("persona[12]"), Some(("persona", Some(12))));
        assert_eq!(parse_job_id("persona[x]"), None);
        assert_eq!(parse_job_id("[1]"), None);
        assert_eq!(parse_job_id(""), None);
    }

    #[test]
    fn for_each_expands_in_input_order_and_dependents_wait_for_every_item() {
        let t = template(
            &[
                section("each", 100, &[], true),
                section("sum", 100, &["each"], false),
            ]
            .concat(),
        );
        let g = t.job_graph(&json!({"xs": ["a", "b", "c"]})).unwrap();
        let ids: Vec<&str> = g.jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["each[0]", "each[1]", "each[2]", "sum"]);
        assert_eq!(g.jobs[1].index, Some(1));
        assert_eq!(g.jobs[3].index, None);
        assert_eq!(g.jobs[3].depends_on, ["each[0]", "each[1]", "each[2]"]);
        assert_eq!(g.roots().count(), 3);
        assert_eq!(
            g.dependents("each[2]")
                .map(|j| j.id.as_str())
                .collect::<Vec<_>>(),
            ["sum"]
        );
        assert_eq!(g.section_jobs("each").count(), 3);
        assert_eq!(g.jobs[0].priority, 255);
        assert_eq!(g.jobs[3].priority, 128); // 100 / 200 of 255, rounded up

        // An empty or absent list yields no item jobs; the dependent becomes a root.
        let g = t.job_graph(&json!({})).unwrap();
        assert_eq!(g.jobs.len(), 1);
        assert!(g.jobs[0].depends_on.is_empty());
        assert_eq!(g.jobs[0].priority, 255);
    }

    #[test]
    fn priority_is_the_weighted_remaining_critical_path() {
        // a(100) -> b(300) -> d(50); c(500) alone; e(10) after c and a.
        let t = template(
            &[
                section("a", 100, &[], false),
                section("b", 300, &["a"], false),
                section("c", 500, &[], false),
                section("d", 50, &["b"], false),
                section("e", 10, &["c", "a"], false),
            ]
            .concat(),
        );
        let g = t.job_graph(&json!({})).unwrap();
        let p: BTreeMap<&str, u8> = g.jobs.iter().map(|j| (j.id.as_str(), j.priority)).collect();
        // remaining: a 450, b 350, c 510, d 50, e 10; longest 510
        assert_eq!(p["c"], 255);
        assert_eq!(p["a"], (450u64 * 255).div_ceil(510) as u8);
        assert_eq!(p["b"], (350u64 * 255).div_ceil(510) as u8);
        assert_eq!(p["d"], 25);
        assert_eq!(p["e"], 5);
        assert!(p.values().all(|&v| v >= 1));
        assert_eq!(g.get("e").unwrap().depends_on, ["c", "a"]);
        // Deterministic.
        assert_eq!(t.job_graph(&json!({})).unwrap(), g);
    }

    #[test]
    fn tiny_weights_never_reach_zero() {
        let t = template(
            &[
                section("big", 100_000, &[], false),
                section("tiny", 1, &[], false),
            ]
            .concat(),
        );
        let g = t.job_graph(&json!({})).unwrap();
        assert_eq!(g.get("tiny").unwrap().priority, 1);
    }

    #[test]
    fn default_weight_is_the_default_max_tokens() {
        let text = "name = \"t\"\ntitle = \"T\"\n\
            [[sections]]\nid = \"a\"\ntitle = \"a\"\nprompt = \"x\"\n\
            [[sections]]\nid = \"b\"\ntitle = \"b\"\nprompt = \"x\"\nmax_tokens = 1024\n\
            [[sections]]\nid = \"c\"\ntitle = \"c\"\nprompt = \"x\"\nmax_tokens = 2048\n";
        let g = Template::from_toml("t.toml", text)
            .unwrap()
            .job_graph(&json!({}))
            .unwrap();
        assert_eq!(g.get("a").unwrap().priority, g.get("b").unwrap().priority);
        assert_eq!(g.get("a").unwrap().priority, 128);
    }

    #[test]
    fn invalid_inputs_produce_no_graph() {
        let t = template(&section("each", 100, &[], true));
        let e = t.job_graph(&json!({"xs": "nope"})).unwrap_err();
        assert_eq!(e.field, "inputs.xs");
    }
}

/// Graph shape and priorities of the shipped templates.
#[cfg(test)]
mod shipped_tests {
    use crate::template::shipped::{example, template};

    #[test]
    fn startup_report_runs_core_as_a_chain_and_ranks_it_first() {
        let t = template("startup-report");
        let g = t.job_graph(&example("startup-report")).unwrap();
        let ids: Vec<&str> = g.jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "profile",
                "research",
                "recommendations",
                "financial",
                "risk",
                "competitive",
                "market",
                "metrics",
                "validation",
                "risk_priority"
            ]
        );
        let node = |id: &str| g.get(id).unwrap();
        assert_eq!(node("research").depends_on, ["profile"]);
        assert_eq!(node("recommendations").depends_on, ["profile", "research"]);
        assert_eq!(node("risk_priority").depends_on, ["risk"]);
        let roots: Vec<&str> = g.roots().map(|j| j.id.as_str()).collect();
        assert_eq!(
            roots,
            [
                "profile",
                "financial",
                "risk",
                "competitive",
                "market",
                "metrics",
                "validation"
            ]
        );

        let p = |id: &str| node(id).priority;
        assert_eq!(p("profile"), 255);
        let enhancements = [
            "financial",
            "risk",
            "competitive",
            "market",
            "metrics",
            "validation",
            "risk_priority",
        ];
        for e in enhancements {
            assert!(p("profile") > p(e) && p("research") > p(e), "{e}: {}", p(e));
        }
        // risk_priority follows risk, so risk's remaining chain is longer than financial's.
        assert!(p("risk") > p("financial"));
        assert!(p("risk") > p("risk_priority"));
        // The remaining chain shrinks along the core.
        assert!(p("profile") > p("research") && p("research") > p("recommendations"));
        // By remaining path alone, competitive (~1700 tokens) outranks the last core stage
        // (~1100): when recommendations becomes ready, competitive gates the end more.
        assert!(p("competitive") > p("recommendations"));
    }

    #[test]
    fn persona_panel_fans_out_in_input_order_and_summary_waits_for_all() {
        let t = template("persona-panel");
        let inputs = example("persona-panel");
        let g = t.job_graph(&inputs).unwrap();
        assert_eq!(g.len(), 21);
        let personas: Vec<&str> = inputs["personas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        for (i, job) in g.jobs[..20].iter().enumerate() {
            assert_eq!(job.id, format!("persona[{i}]"));
            assert_eq!((job.section.as_str(), job.index), ("persona", Some(i)));
            assert!(job.depends_on.is_empty());
            assert_eq!(job.priority, 255);
            assert!(!personas[i].is_empty());
        }
        let summary = g.get("summary").unwrap();
        let expected: Vec<String> = (0..20).map(|i| format!("persona[{i}]")).collect();
        assert_eq!(summary.depends_on, expected);
        assert!(summary.priority < 255 && summary.priority > 1);
    }
}
