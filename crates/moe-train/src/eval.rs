//! Evaluation: per-domain validation loss and perplexity, and per MoE layer the domain x expert
//! routing table with the normalised mutual information between domain and chosen expert.

use std::fmt;

use moe_core::RoutingStats;
use moe_model::MoeLm;
use serde::Serialize;

use crate::data::{Corpus, batch_from_windows, valid_windows};
use crate::objective::lm_loss;
use crate::routing::merge_routing;

/// One domain's validation figures.
#[derive(Debug, Clone, Serialize)]
pub struct DomainEval {
    /// Domain name.
    pub domain: String,
    /// Mean next-token cross-entropy (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Tokens evaluated.
    pub tokens: usize,
}

/// Which experts each domain's tokens went to, in one MoE layer.
#[derive(Debug, Clone, Serialize)]
pub struct RoutingTable {
    /// Layer index.
    pub layer: usize,
    /// `shares[d][e]`: share of domain d's assignments processed by expert e (rows sum to 1).
    pub shares: Vec<Vec<f64>>,
    /// Normalised mutual information between domain and expert, `2 I(D;E) / (H(D) + H(E))`, in
    /// [0, 1]: 0 when routing ignores the domain, 1 when each domain has experts of its own.
    pub nmi: f64,
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
    /// Random-router controls to read `mean_nmi` against (filled by
    /// [`random_router_controls`]; empty from [`evaluate`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub controls: Vec<NmiControl>,
}

/// The routing NMI of a random-router control, over several random draws.
#[derive(Debug, Clone, Serialize)]
pub struct NmiControl {
    /// What was randomised.
    pub name: String,
    /// Mean over the draws of the mean NMI over MoE layers.
    pub mean_nmi: f64,
    /// The lowest draw.
    pub min_nmi: f64,
    /// The highest draw.
    pub max_nmi: f64,
    /// Per MoE layer, the mean over the draws.
    pub layers: Vec<f64>,
}

/// Normalised mutual information of a joint count table `counts[d][e]`.
pub fn normalized_mutual_information(counts: &[Vec<f64>]) -> f64 {
    let total: f64 = counts.iter().flatten().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let pd: Vec<f64> = counts
        .iter()
        .map(|r| r.iter().sum::<f64>() / total)
        .collect();
    let n_e = counts.first().map_or(0, Vec::len);
    let pe: Vec<f64> = (0..n_e)
        .map(|e| counts.iter().map(|r| r[e]).sum::<f64>() / total)
        .collect();
    let entropy = |p: &[f64]| {
        -p.iter()
            .filter(|&&x| x > 0.0)
            .map(|x| x * x.ln())
            .sum::<f64>()
    };
    let mut mi = 0.0;
    for (d, row) in counts.iter().enumerate() {
        for (e, &c) in row.iter().enumerate() {
            if c > 0.0 {
                let p = c / total;
                mi += p * (p / (pd[d] * pe[e])).ln();
            }
        }
    }
    let h = entropy(&pd) + entropy(&pe);
    if h <= 0.0 {
        0.0
    } else {
        (2.0 * mi / h).clamp(0.0, 1.0)
    }
}

/// Runs one domain's validation windows; returns (mean loss, tokens, routing per MoE layer).
fn domain_pass(
    model: &MoeLm,
    corpus: &Corpus,
    domain: usize,
    windows: usize,
    seq_len: usize,
    batch: usize,
) -> (f64, usize, Vec<(usize, RoutingStats)>) {
    let device = model.embed.weight.val().device();
    let all = valid_windows(corpus, domain, windows, seq_len);
    let (mut loss_sum, mut tokens) = (0.0, 0);
    let mut routing: Vec<(usize, RoutingStats)> = Vec::new();
    for chunk in all.chunks(batch.max(1)) {
        let b = batch_from_windows(corpus, chunk, seq_len, true, &device);
        let out = model.forward(b.inputs, None);
        let n = chunk.len() * seq_len;
        loss_sum += f64::from(lm_loss(out.logits, b.targets).into_scalar::<f32>()) * n as f64;
        tokens += n;
        routing = merge_routing(routing, out.routing);
    }
    (loss_sum / tokens.max(1) as f64, tokens, routing)
}

/// Mean validation loss of each domain.
pub fn domain_losses(
    model: &MoeLm,
    corpus: &Corpus,
    windows: usize,
    seq_len: usize,
    batch: usize,
) -> Vec<f64> {
    (0..corpus.domains.len())
        .map(|d| domain_pass(model, corpus, d, windows, seq_len, batch).0)
        .collect()
}

/// Full evaluation: losses, routing tables and NMI.
pub fn evaluate(
    model: &MoeLm,
    corpus: &Corpus,
    windows: usize,
    seq_len: usize,
    batch: usize,
) -> EvalReport {
    let mut losses = Vec::new();
    let mut per_layer: Vec<(usize, Vec<Vec<f64>>)> = Vec::new();
    for (d, domain) in corpus.domains.iter().enumerate() {
        let (loss, tokens, routing) = domain_pass(model, corpus, d, windows, seq_len, batch);
        losses.push(DomainEval {
            domain: domain.name.clone(),
            loss,
            perplexity: loss.exp(),
            tokens,
        });
        for (i, (layer, stats)) in routing.iter().enumerate() {
            if per_layer.len() <= i {
                per_layer.push((*layer, Vec::new()));
            }
            per_layer[i].1.push(stats.summary().load);
        }
    }
    let tables: Vec<RoutingTable> = per_layer
        .into_iter()
        .map(|(layer, counts)| RoutingTable {
            layer,
            nmi: normalized_mutual_information(&counts),
            shares: counts
                .iter()
                .map(|row| {
                    let s: f64 = row.iter().sum();
                    row.iter()
                        .map(|c| if s > 0.0 { c / s } else { 0.0 })
                        .collect()
                })
                .collect(),
        })
        .collect();
    let mean_nmi = if tables.is_empty() {
        0.0
    } else {
        tables.iter().map(|t| t.nmi).sum::<f64>() / tables.len() as f64
    };
    EvalReport {
        domains: corpus.names(),
        losses,
        tables,
        mean_nmi,
        controls: Vec::new(),
    }
}

/// Random-router controls of a model's routing NMI, each over `draws` draws from `seed`:
/// - the model with freshly drawn routers: random gates over the model's own (trained)
///   features, so a trained model's NMI above it is what its routers learned;
/// - the same architecture untrained: random gates over random embeddings, whose hidden states
///   are mostly a code of the current token, so its NMI is what token identity alone gives.
///
/// A router that ignores its input scores 0 (up to finite-sample bias).
pub fn random_router_controls(
    model: &MoeLm,
    corpus: &Corpus,
    windows: usize,
    seq_len: usize,
    batch: usize,
    seed: u64,
    draws: u64,
) -> crate::Result<Vec<NmiControl>> {
    let device = model.embed.weight.val().device();
    let control = |name: &str, make: &dyn Fn(u64) -> moe_model::Result<MoeLm>| {
        let mut reports = Vec::new();
        for draw in 0..draws {
            let control = make(seed.wrapping_add(draw + 1))?;
            reports.push(evaluate(&control, corpus, windows, seq_len, batch));
        }
        let nmis: Vec<f64> = reports.iter().map(|r| r.mean_nmi).collect();
        let n = draws.max(1) as f64;
        let layers = (0..reports.first().map_or(0, |r| r.tables.len()))
            .map(|i| reports.iter().map(|r| r.tables[i].nmi).sum::<f64>() / n)
            .collect();
        Ok::<_, crate::DataError>(NmiControl {
            name: name.to_string(),
            mean_nmi: nmis.iter().sum::<f64>() / n,
            min_nmi: nmis.iter().copied().fold(f64::INFINITY, f64::min),
            max_nmi: nmis.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            layers,
        })
    };
    Ok(vec![
        control("trained model, random routers", &|s| {
            model.clone().with_fresh_routers(s)
        })?,
        control("untrained model", &|s| model.config.init_seeded(&device, s))?,
    ])
}

/// NMIs as a comma-separated list.
fn nmi_list(nmis: impl Iterator<Item = f64>) -> String {
    nmis.map(|v| format!("{v:.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<14} {:>8} {:>10}", "domain", "loss", "perplexity")?;
        for l in &self.losses {
            writeln!(f, "{:<14} {:>8.4} {:>10.3}", l.domain, l.loss, l.perplexity)?;
        }
        for t in &self.tables {
            writeln!(
                f,
                "\nlayer {} routing (share of each domain's tokens per expert), NMI {:.3}",
                t.layer, t.nmi
            )?;
            let experts = t.shares.first().map_or(0, Vec::len);
            write!(f, "{:<14}", "")?;
            for e in 0..experts {
                write!(f, " {:>5}", format!("e{e}"))?;
            }
            writeln!(f)?;
            for (d, row) in self.domains.iter().zip(&t.shares) {
                write!(f, "{d:<14}")?;
                for s in row {
                    write!(f, " {:>5.2}", s)?;
                }
                writeln!(f)?;
            }
        }
        if !self.tables.is_empty() {
            writeln!(
                f,
                "\nmean NMI(domain; expert) over MoE layers: {:.3} (layers {})",
                self.mean_nmi,
                nmi_list(self.tables.iter().map(|t| t.nmi))
            )?;
        }
        for c in &self.controls {
            writeln!(
                f,
                "random-router control, {}: mean NMI {:.3} (draws {:.3}-{:.3}; layers {})",
                c.name,
                c.mean_nmi,
                c.min_nmi,
                c.max_nmi,
                nmi_list(c.layers.iter().copied())
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nmi_is_zero_for_independence_and_one_for_a_bijection() {
        let independent = vec![vec![10.0, 20.0], vec![5.0, 10.0]];
        assert!(normalized_mutual_information(&independent).abs() < 1e-12);
        let bijection = vec![
            vec![7.0, 0.0, 0.0],
            vec![0.0, 3.0, 0.0],
            vec![0.0, 0.0, 5.0],
        ];
        assert!((normalized_mutual_information(&bijection) - 1.0).abs() < 1e-12);
        // Hand-computed: p = [[.4, .1], [.1, .4]] -> I = 0.8 ln 1.6 + 0.2 ln 0.4 = 0.19274,
        // H(D) = H(E) = ln 2 -> NMI = 0.19274 / ln 2 = 0.27807.
        let partial = vec![vec![4.0, 1.0], vec![1.0, 4.0]];
        assert!((normalized_mutual_information(&partial) - 0.278072).abs() < 1e-5);
    }
}
