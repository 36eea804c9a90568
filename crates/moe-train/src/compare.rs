//! Comparing groups of runs that differ only in their seed: per domain, each group's mean
//! validation loss with a 95% interval over its runs, and each group's difference from the
//! first, paired by seed when the groups ran the same seeds.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{DataError, Result};
use crate::interval::Interval;

/// The sub-directory of a multi-seed run holding the run of seed `seed`.
pub fn seed_dir(out: &Path, seed: u64) -> PathBuf {
    out.join(format!("seed-{seed}"))
}

/// The runs of a group directory: its `seed-N` run directories in seed order, or the directory
/// itself when it is a single run (or checkpoint). Each with its seed (`None`: unknown).
pub fn group_runs(dir: &Path) -> Result<Vec<(PathBuf, Option<u64>)>> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut seeds: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            Some((name.strip_prefix("seed-")?.parse().ok()?, p))
        })
        .collect();
    if seeds.is_empty() {
        return Ok(vec![(dir.to_path_buf(), None)]);
    }
    seeds.sort();
    Ok(seeds.into_iter().map(|(s, p)| (p, Some(s))).collect())
}

/// One group's evaluated runs.
#[derive(Debug, Clone, Serialize)]
pub struct GroupLosses {
    /// How the group is named (its directory).
    pub name: String,
    /// Each run's seed, when known.
    pub seeds: Vec<Option<u64>>,
    /// `losses[run][domain]`.
    pub losses: Vec<Vec<f64>>,
}

/// One group's summary.
#[derive(Debug, Clone, Serialize)]
pub struct GroupSummary {
    /// The group's name.
    pub name: String,
    /// Runs in the group.
    pub runs: usize,
    /// Per domain, the mean loss over runs with its 95% interval.
    pub loss: Vec<Interval>,
    /// Per domain, this group's loss minus the first group's, with its 95% interval (paired by
    /// seed when both groups ran the same seeds). Empty for the first group.
    pub vs_first: Vec<Interval>,
    /// Whether `vs_first` is paired by seed.
    pub paired: bool,
}

/// A comparison of groups of runs.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Domain names.
    pub domains: Vec<String>,
    /// The groups, the first being the reference.
    pub groups: Vec<GroupSummary>,
    /// Every run's losses, as evaluated.
    pub runs: Vec<GroupLosses>,
}

impl Comparison {
    /// Summarises groups evaluated on the same domains.
    pub fn new(domains: Vec<String>, groups: &[GroupLosses]) -> Self {
        let column = |g: &GroupLosses, d: usize| g.losses.iter().map(|l| l[d]).collect::<Vec<_>>();
        let summaries = groups
            .iter()
            .map(|g| {
                let first = &groups[0];
                let paired = g.seeds == first.seeds && g.seeds.iter().all(Option::is_some);
                let is_first = std::ptr::eq(g, first);
                GroupSummary {
                    name: g.name.clone(),
                    runs: g.losses.len(),
                    loss: (0..domains.len())
                        .map(|d| Interval::of(&column(g, d)))
                        .collect(),
                    vs_first: if is_first {
                        Vec::new()
                    } else {
                        (0..domains.len())
                            .map(|d| Interval::difference(&column(first, d), &column(g, d), paired))
                            .collect()
                    },
                    paired,
                }
            })
            .collect();
        Self {
            domains,
            groups: summaries,
            runs: groups.to_vec(),
        }
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let first = &self.groups[0].name;
        writeln!(
            f,
            "validation loss per domain (nats per token): mean ± 95% interval over runs"
        )?;
        write!(f, "{:<12}", "domain")?;
        for g in &self.groups {
            write!(f, " {:>22}", format!("{} (n={})", short(&g.name), g.runs))?;
        }
        for g in &self.groups[1..] {
            write!(
                f,
                " {:>24}",
                format!("{} - {}", short(&g.name), short(first))
            )?;
        }
        writeln!(f)?;
        for (d, name) in self.domains.iter().enumerate() {
            write!(f, "{name:<12}")?;
            for g in &self.groups {
                write!(f, " {:>22}", format!("{:.4}", g.loss[d]))?;
            }
            for g in &self.groups[1..] {
                let diff = g.vs_first[d];
                let mark = if diff.high() < 0.0 || diff.low() > 0.0 {
                    "*"
                } else {
                    " "
                };
                write!(
                    f,
                    " {:>23}{mark}",
                    format!("{:+.4}", diff).replace(" ± ", "±")
                )?;
            }
            writeln!(f)?;
        }
        if self.groups.len() > 1 {
            let paired = self.groups[1..].iter().all(|g| g.paired);
            writeln!(
                f,
                "* the difference's interval excludes 0 ({} by seed)",
                if paired { "paired" } else { "unpaired, Welch" }
            )?;
        }
        Ok(())
    }
}

/// The last path component of a group name, for column headers.
fn short(name: &str) -> &str {
    Path::new(name)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_summarised_and_paired_by_seed() {
        let a = GroupLosses {
            name: "runs/moe".into(),
            seeds: vec![Some(1), Some(2), Some(3)],
            losses: vec![vec![1.0, 2.0], vec![1.2, 2.2], vec![1.1, 2.1]],
        };
        let mut b = a.clone();
        b.name = "runs/dense".into();
        b.losses = vec![vec![1.1, 2.0], vec![1.3, 2.3], vec![1.2, 2.0]];
        let c = Comparison::new(vec!["x".into(), "y".into()], &[a, b]);
        assert!((c.groups[0].loss[0].mean - 1.1).abs() < 1e-12);
        let diff = c.groups[1].vs_first[0];
        assert!(c.groups[1].paired);
        assert!((diff.mean - 0.1).abs() < 1e-12 && diff.half_width < 1e-9);
        assert!(c.groups[0].vs_first.is_empty());
        let text = c.to_string();
        assert!(text.contains("dense - moe"), "{text}");
        assert!(text.contains("+0.1000±0.0000*"), "{text}");
    }

    #[test]
    fn a_group_is_its_seed_directories_or_itself() {
        let tmp = tempfile::tempdir().unwrap();
        for s in [44, 42, 43] {
            std::fs::create_dir(seed_dir(tmp.path(), s)).unwrap();
        }
        std::fs::create_dir(tmp.path().join("other")).unwrap();
        let runs = group_runs(tmp.path()).unwrap();
        let seeds: Vec<Option<u64>> = runs.iter().map(|r| r.1).collect();
        assert_eq!(seeds, [Some(42), Some(43), Some(44)]);
        let single = group_runs(&tmp.path().join("other")).unwrap();
        assert_eq!(single, [(tmp.path().join("other"), None)]);
        assert!(group_runs(&tmp.path().join("missing")).is_err());
    }
}
