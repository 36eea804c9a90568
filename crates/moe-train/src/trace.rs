//! Routing traces: which experts each token uses in each MoE layer, recorded over a corpus and
//! saved as JSON lines, and replayed through expert caches to compare policies and budgets.
//!
//! The file's first line describes the model (`{"kind": "moe-trace", "moe_layers": [...],
//! "experts": E, "top_k": k, "expert_bytes": B}`, B the bytes of one expert in f32); each next
//! line is one token: `{"domain": "...", "experts": [[e, ...], ...]}`, one list per MoE layer.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use burn::prelude::*;
use moe_core::cache::ExpertKey;
use moe_model::MoeLm;
use serde::{Deserialize, Serialize};

use crate::data::Corpus;
use crate::error::{DataError, Result};

/// What a trace was recorded from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceHeader {
    /// Always `"moe-trace"`.
    pub kind: String,
    /// Indices of the model's MoE layers.
    pub moe_layers: Vec<usize>,
    /// Routed experts per layer.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Bytes of one expert's weights in f32 (what a budget counts).
    pub expert_bytes: usize,
}

/// One token's experts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceToken {
    /// The corpus domain the token comes from.
    pub domain: String,
    /// The experts it used, one list per MoE layer.
    pub experts: Vec<Vec<u32>>,
}

/// A recorded trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// What it was recorded from.
    pub header: TraceHeader,
    /// Tokens in the order they were run.
    pub tokens: Vec<TraceToken>,
}

impl Trace {
    /// Records the experts of up to `tokens_per_domain` validation tokens of each domain,
    /// run in windows of `seq_len` tokens.
    pub fn record(
        model: &MoeLm,
        corpus: &Corpus,
        tokens_per_domain: usize,
        seq_len: usize,
    ) -> Self {
        let config = &model.config;
        let moe_layers: Vec<usize> = (0..config.n_layers).filter(|&i| config.is_moe(i)).collect();
        let (d, f) = (config.d_model, config.moe.d_ff);
        let header = TraceHeader {
            kind: "moe-trace".into(),
            moe_layers,
            experts: config.moe.n_experts,
            top_k: config.moe.router.top_k,
            expert_bytes: 3 * d * f * 4,
        };
        let device = model.embed.weight.val().device();
        let mut tokens = Vec::new();
        for domain in &corpus.domains {
            let take = domain.valid.len().min(tokens_per_domain);
            for window in domain.valid[..take].chunks(seq_len.max(1)) {
                let ids: Vec<i64> = window.iter().map(|&t| i64::from(t)).collect();
                let input =
                    Tensor::<1, Int>::from_ints(ids.as_slice(), &device).reshape([1, ids.len()]);
                let per_layer: Vec<Vec<i64>> = model
                    .forward(input, None)
                    .routing
                    .into_iter()
                    .filter_map(|(_, stats)| stats.choices)
                    .map(|c| c.into_data().try_into_vec_as::<i64>().expect("expert ids"))
                    .collect();
                let k = header.top_k;
                for t in 0..window.len() {
                    let experts = per_layer
                        .iter()
                        .map(|ids| ids[t * k..(t + 1) * k].iter().map(|&e| e as u32).collect())
                        .collect();
                    tokens.push(TraceToken {
                        domain: domain.name.clone(),
                        experts,
                    });
                }
            }
        }
        Self { header, tokens }
    }

    /// Writes the trace as JSON lines.
    pub fn write(&self, path: &Path) -> Result<()> {
        let file = std::fs::File::create(path).map_err(|e| DataError::io(path, e))?;
        let mut out = BufWriter::new(file);
        let json = |v: serde_json::Result<String>| v.expect("trace records serialise");
        let lines = std::iter::once(json(serde_json::to_string(&self.header)))
            .chain(self.tokens.iter().map(|t| json(serde_json::to_string(t))));
        for line in lines {
            writeln!(out, "{line}").map_err(|e| DataError::io(path, e))?;
        }
        out.flush().map_err(|e| DataError::io(path, e))
    }

    /// Reads a trace written by [`write`](Self::write).
    pub fn read(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
        let mut lines = BufReader::new(file).lines().enumerate();
        let bad =
            |n: usize, problem: String| DataError::run(path, format!("line {}: {problem}", n + 1));
        let (n, first) = lines
            .next()
            .ok_or_else(|| DataError::run(path, "is empty, not a trace"))?;
        let first = first.map_err(|e| DataError::io(path, e))?;
        let header: TraceHeader = serde_json::from_str(&first)
            .map_err(|e| bad(n, format!("not a trace header ({e})")))?;
        if header.kind != "moe-trace" {
            return Err(bad(
                n,
                format!("kind is '{}', not 'moe-trace'", header.kind),
            ));
        }
        let mut tokens = Vec::new();
        for (n, line) in lines {
            let line = line.map_err(|e| DataError::io(path, e))?;
            let token: TraceToken = serde_json::from_str(&line)
                .map_err(|e| bad(n, format!("not a trace token ({e})")))?;
            let valid = token.experts.len() == header.moe_layers.len()
                && token
                    .experts
                    .iter()
                    .all(|l| l.iter().all(|&e| (e as usize) < header.experts));
            if !valid {
                return Err(bad(
                    n,
                    "experts do not fit the header's layers and expert count".into(),
                ));
            }
            tokens.push(token);
        }
        Ok(Self { header, tokens })
    }

    /// The expert uses in execution order (token by token, layer by layer), one per step, as
    /// the expert store sees them.
    pub fn uses(&self) -> Vec<Vec<ExpertKey>> {
        self.tokens
            .iter()
            .flat_map(|t| {
                t.experts.iter().enumerate().flat_map(|(layer, experts)| {
                    experts.iter().map(move |&e| vec![(layer as u32, e)])
                })
            })
            .collect()
    }

    /// Experts a budget of `budget_bytes` holds; `None` when fewer than one token's experts of
    /// a layer.
    pub fn capacity(&self, budget_bytes: usize) -> Option<usize> {
        let capacity = budget_bytes / self.header.expert_bytes.max(1);
        (capacity >= self.header.top_k).then_some(capacity)
    }
}
