//! Evaluation: per-domain validation loss with its standard error over windows, and per MoE
//! layer the domain x expert routing table with measures of specialisation:
//! - the normalised mutual information (NMI) between domain and expert, and the same as a share
//!   of the most a router with k experts per token can reach;
//! - the mutual information of domain and expert given the current token, which routing by
//!   token identity alone (shared whitespace, a domain's own characters) does not raise;
//! - per-document routing histograms, and how much documents of one domain differ.
//!
//! [`random_router_controls`] measures the same for random routers, with intervals.

mod controls;
mod display;
mod mutual_info;
mod tally;

use moe_model::MoeLm;
use serde::Serialize;

pub use self::controls::{NmiControl, random_router_controls};
pub use self::mutual_info::{
    conditional_mutual_information, entropy, mutual_information, normalized_mutual_information,
    reachable_nmi,
};
use self::tally::LayerTally;
use crate::data::{Corpus, batch_from_windows, valid_windows};
use crate::objective::row_losses;

/// One domain's validation figures.
#[derive(Debug, Clone, Serialize)]
pub struct DomainEval {
    /// Domain name.
    pub domain: String,
    /// Mean next-token cross-entropy (nats).
    pub loss: f64,
    /// Standard error of `loss` over the windows (their losses taken as independent draws).
    pub stderr: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Windows evaluated.
    pub windows: usize,
    /// Tokens evaluated.
    pub tokens: usize,
}

/// Which experts each domain's tokens went to, in one MoE layer.
#[derive(Debug, Clone, Serialize)]
pub struct RoutingTable {
    /// Layer index.
    pub layer: usize,
    /// `shares[d][e]`: share of domain d's assignments given to expert e (rows sum to 1).
    pub shares: Vec<Vec<f64>>,
    /// Normalised mutual information between domain and expert, `2 I(D;E) / (H(D) + H(E))`:
    /// 0 when routing ignores the domain.
    pub nmi: f64,
    /// `nmi` over the most a router with the model's k can reach ([`reachable_nmi`]): 1 when
    /// each domain has k experts of its own.
    pub nmi_of_max: f64,
    /// `I(D;E)` in nats.
    pub mi: f64,
    /// `I(D;E | current token)` in nats; `None` for routers without per-token choices.
    pub conditional_mi: Option<f64>,
    /// `I(document; E | D)` in nats: how much documents of one domain differ in their experts.
    pub document_mi: Option<f64>,
}

/// One validation document's routing.
#[derive(Debug, Clone, Serialize)]
pub struct DocumentRouting {
    /// Its domain.
    pub domain: String,
    /// Its index among the domain's validation documents.
    pub document: usize,
    /// Per MoE layer, the share of its evaluated assignments given to each expert.
    pub shares: Vec<Vec<f64>>,
}

/// The evaluation report.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Domain names, in label order.
    pub domains: Vec<String>,
    /// Per-domain loss and perplexity.
    pub losses: Vec<DomainEval>,
    /// Per MoE layer routing tables.
    pub tables: Vec<RoutingTable>,
    /// Mean NMI over MoE layers.
    pub mean_nmi: f64,
    /// Mean over MoE layers of the NMI as a share of its reachable maximum.
    pub mean_nmi_of_max: f64,
    /// Mean over MoE layers of `I(D;E | current token)` (nats).
    pub mean_conditional_mi: Option<f64>,
    /// Random-router controls to read the figures against (filled by
    /// [`random_router_controls`]; empty from [`evaluate`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub controls: Vec<NmiControl>,
    /// Per-document routing histograms.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub documents: Vec<DocumentRouting>,
}

/// Which validation windows an evaluation reads and how.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    /// Windows per domain, at most (`usize::MAX`: all), spread evenly over the text.
    pub per_domain: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Windows per forward pass.
    pub batch: usize,
    /// Positions scored: `from..seq_len` (0: all); the earlier ones are context only.
    pub from: usize,
}

impl Windows {
    /// Up to `per_domain` windows of `seq_len` tokens, every position scored.
    pub fn scoring_all(per_domain: usize, seq_len: usize, batch: usize) -> Self {
        Self {
            per_domain,
            seq_len,
            batch,
            from: 0,
        }
    }
}

/// Runs domain `d`'s validation windows, adding its routing to `tallies` (one per MoE layer,
/// created on first use) when given. Returns each window's mean loss.
fn domain_pass(
    model: &MoeLm,
    corpus: &Corpus,
    d: usize,
    w: Windows,
    mut tallies: Option<&mut Vec<LayerTally>>,
) -> Vec<f64> {
    let Windows {
        per_domain: windows,
        seq_len,
        batch,
        from,
    } = w;
    let device = model.embed.weight.val().device();
    let domain = &corpus.domains[d];
    let all = valid_windows(corpus, d, windows, seq_len);
    let mut window_losses = Vec::with_capacity(all.len());
    for chunk in all.chunks(batch.max(1)) {
        let b = batch_from_windows(corpus, chunk, seq_len, true, &device);
        let out = model.forward(b.inputs, None);
        let losses = row_losses(out.logits, b.targets, from).into_data();
        window_losses.extend(losses.iter::<f32>().map(f64::from));
        let Some(tallies) = tallies.as_deref_mut() else {
            continue;
        };
        let positions: Vec<usize> = chunk.iter().flat_map(|&(_, s)| s..s + seq_len).collect();
        let tokens: Vec<u32> = positions.iter().map(|&p| domain.valid[p]).collect();
        let docs: Vec<usize> = positions.iter().map(|&p| domain.valid_doc(p)).collect();
        for (i, (layer, stats)) in out.routing.into_iter().enumerate() {
            if tallies.len() <= i {
                let experts = stats.load.dims()[0];
                tallies.push(LayerTally::new(layer, corpus.domains.len(), experts));
            }
            match stats.choices {
                Some(choices) => {
                    let ids = choices.into_data().try_into_vec_as::<i64>().expect("ids");
                    let k = ids.len() / tokens.len();
                    tallies[i].add_choices(d, &tokens, &docs, &ids, k);
                }
                None => tallies[i].add_load(d, &stats.summary().load),
            }
        }
    }
    window_losses
}

/// A domain's loss figures from its window losses, each over `scored` tokens.
pub(crate) fn domain_eval(name: &str, window_losses: &[f64], scored: usize) -> DomainEval {
    let n = window_losses.len().max(1) as f64;
    let loss = window_losses.iter().sum::<f64>() / n;
    let var = window_losses
        .iter()
        .map(|l| (l - loss).powi(2))
        .sum::<f64>()
        / (n - 1.0).max(1.0);
    DomainEval {
        domain: name.to_string(),
        loss,
        stderr: (var / n).sqrt(),
        perplexity: loss.exp(),
        windows: window_losses.len(),
        tokens: window_losses.len() * scored,
    }
}

/// Mean validation loss of each domain over up to `windows` windows (no routing tallies).
pub fn domain_losses(
    model: &MoeLm,
    corpus: &Corpus,
    windows: usize,
    seq_len: usize,
    batch: usize,
) -> Vec<f64> {
    domain_evals(model, corpus, Windows::scoring_all(windows, seq_len, batch))
        .into_iter()
        .map(|e| e.loss)
        .collect()
}

/// Each domain's validation loss figures over the windows `w` (no routing tallies).
pub fn domain_evals(model: &MoeLm, corpus: &Corpus, w: Windows) -> Vec<DomainEval> {
    corpus
        .domains
        .iter()
        .enumerate()
        .map(|(d, domain)| {
            let losses = domain_pass(model, corpus, d, w, None);
            domain_eval(&domain.name, &losses, w.seq_len - w.from)
        })
        .collect()
}

/// A routing table from a layer's tally, for a router with `k` experts per token.
fn routing_table(tally: &LayerTally, k: f64) -> RoutingTable {
    let domain_sizes: Vec<f64> = tally.joint.iter().map(|r| r.iter().sum()).collect();
    let nmi = normalized_mutual_information(&tally.joint);
    let max = reachable_nmi(&domain_sizes, tally.joint[0].len(), k);
    RoutingTable {
        layer: tally.layer,
        nmi,
        nmi_of_max: if max > 0.0 { nmi / max } else { 0.0 },
        mi: tally.mi(),
        conditional_mi: tally.conditional_mi(),
        document_mi: tally.document_mi(),
        shares: tally
            .joint
            .iter()
            .map(|row| {
                let s: f64 = row.iter().sum();
                row.iter()
                    .map(|c| if s > 0.0 { c / s } else { 0.0 })
                    .collect()
            })
            .collect(),
    }
}

/// The per-document histograms of every layer.
fn documents(corpus: &Corpus, tallies: &[LayerTally]) -> Vec<DocumentRouting> {
    let Some(first) = tallies.first() else {
        return Vec::new();
    };
    let mut docs: Vec<DocumentRouting> = first
        .documents()
        .map(|(&(d, doc), _)| DocumentRouting {
            domain: corpus.domains[d].name.clone(),
            document: doc,
            shares: Vec::new(),
        })
        .collect();
    for tally in tallies {
        for (entry, (_, shares)) in docs.iter_mut().zip(tally.documents()) {
            entry.shares.push(shares);
        }
    }
    docs
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// Full evaluation over up to `windows` validation windows per domain (`usize::MAX`: all):
/// losses, routing tables, specialisation measures and document histograms.
pub fn evaluate(
    model: &MoeLm,
    corpus: &Corpus,
    windows: usize,
    seq_len: usize,
    batch: usize,
) -> EvalReport {
    let mut tallies = Vec::new();
    let losses = corpus
        .domains
        .iter()
        .enumerate()
        .map(|(d, domain)| {
            let w = Windows::scoring_all(windows, seq_len, batch);
            let losses = domain_pass(model, corpus, d, w, Some(&mut tallies));
            domain_eval(&domain.name, &losses, seq_len)
        })
        .collect();
    let k = model.config.moe.router.top_k as f64;
    let tables: Vec<RoutingTable> = tallies.iter().map(|t| routing_table(t, k)).collect();
    let conditional: Option<Vec<f64>> = tables.iter().map(|t| t.conditional_mi).collect();
    EvalReport {
        domains: corpus.names(),
        losses,
        mean_nmi: mean(tables.iter().map(|t| t.nmi)),
        mean_nmi_of_max: mean(tables.iter().map(|t| t.nmi_of_max)),
        mean_conditional_mi: conditional
            .filter(|c| !c.is_empty())
            .map(|c| mean(c.into_iter())),
        documents: documents(corpus, &tallies),
        tables,
        controls: Vec::new(),
    }
}
