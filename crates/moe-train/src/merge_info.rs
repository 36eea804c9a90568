//! The record of a merged model's experts: which branch checkpoint (and domains) each expert
//! came from, saved as `merge.json` beside the model and carried through fine-tuning, so that
//! evaluation can report each domain's share of its own expert.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::eval::EvalReport;

/// Where each expert of a merged model came from, saved as `merge.json` in its checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeInfo {
    /// Expert `i` is the FFN of `experts[i]`.
    pub experts: Vec<ExpertSource>,
    /// Seed of the routers' initialisation.
    pub seed: u64,
}

/// One merged expert's origin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertSource {
    /// The branch checkpoint.
    pub checkpoint: PathBuf,
    /// The domains the branch trained on (from its trainer state; empty if it has none).
    pub domains: Vec<String>,
    /// Whether the expert is the generalist (the seed model's FFN) rather than a branch's.
    #[serde(default)]
    pub generalist: bool,
}

/// The merge description file of a merged checkpoint.
pub const MERGE_FILE: &str = "merge.json";

impl MergeInfo {
    /// Reads `merge.json` of checkpoint `dir`, or `None` for a checkpoint that is not a merge.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MERGE_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| DataError::run(&path, format!("malformed merge description: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DataError::io(path, e)),
        }
    }

    /// For each domain with an expert of its own, the mean share (over MoE layers) of its
    /// tokens' routing assignments that go to that expert (at most `1 / top_k`).
    pub fn own_expert_shares(&self, report: &EvalReport) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for (d, domain) in report.domains.iter().enumerate() {
            let Some(expert) = self.experts.iter().position(|e| e.domains.contains(domain)) else {
                continue;
            };
            let shares: Vec<f64> = report
                .tables
                .iter()
                .filter_map(|t| t.shares.get(d).and_then(|row| row.get(expert)).copied())
                .collect();
            if !shares.is_empty() {
                out.push((
                    domain.clone(),
                    shares.iter().sum::<f64>() / shares.len() as f64,
                ));
            }
        }
        out
    }
}
