//! Random-router controls: the specialisation measures of routers that learned nothing, to
//! read a trained model's figures against.

use moe_model::MoeLm;
use serde::Serialize;

use super::{EvalReport, RoutingTable, evaluate};
use crate::interval::Interval;

/// The specialisation measures of a random-router control over several random draws, each a
/// mean over MoE layers, with 95% intervals over the draws.
#[derive(Debug, Clone, Serialize)]
pub struct NmiControl {
    /// What was randomised.
    pub name: String,
    /// NMI(domain; expert).
    pub nmi: Interval,
    /// NMI as a share of its reachable maximum.
    pub nmi_of_max: Interval,
    /// `I(D;E | current token)` (nats), for token-choice routers.
    pub conditional_mi: Option<Interval>,
    /// Per MoE layer, the mean NMI over the draws.
    pub layers: Vec<f64>,
    /// Per MoE layer, the mean `I(D;E | current token)` over the draws (nats), for token-choice
    /// routers: what a trained model's layer is read against.
    pub layers_conditional_mi: Option<Vec<f64>>,
}

impl NmiControl {
    /// The control named `name` from the reports of its draws.
    fn from_draws(name: &str, reports: &[EvalReport]) -> Self {
        let of = |f: &dyn Fn(&EvalReport) -> f64| {
            Interval::of(&reports.iter().map(f).collect::<Vec<_>>())
        };
        let conditional: Option<Vec<f64>> = reports.iter().map(|r| r.mean_conditional_mi).collect();
        let n = reports.len().max(1) as f64;
        let layers = reports.first().map_or(0, |r| r.tables.len());
        let layer_mean = |f: &dyn Fn(&RoutingTable) -> Option<f64>| -> Option<Vec<f64>> {
            (0..layers)
                .map(|i| {
                    let values: Option<Vec<f64>> =
                        reports.iter().map(|r| f(&r.tables[i])).collect();
                    values.map(|v| v.iter().sum::<f64>() / n)
                })
                .collect()
        };
        Self {
            name: name.to_string(),
            nmi: of(&|r| r.mean_nmi),
            nmi_of_max: of(&|r| r.mean_nmi_of_max),
            conditional_mi: conditional.map(|c| Interval::of(&c)),
            layers: layer_mean(&|t| Some(t.nmi)).unwrap_or_default(),
            layers_conditional_mi: layer_mean(&|t| t.conditional_mi),
        }
    }
}

/// Random-router controls of a model's routing, each over `draws` draws from `seed`:
/// - the model with freshly drawn routers: random gates over the model's own (trained)
///   features, so a trained model above it is what its routers learned;
/// - the same architecture untrained: random gates over random embeddings, whose hidden states
///   are mostly a code of the current token, so its figures are what token identity alone
///   gives.
///
/// A router that ignores its input scores 0 (up to finite-sample bias).
pub fn random_router_controls(
    model: &MoeLm,
    corpus: &crate::data::Corpus,
    windows: usize,
    seq_len: usize,
    batch: usize,
    seed: u64,
    draws: u64,
) -> crate::Result<Vec<NmiControl>> {
    let device = model.embed.weight.val().device();
    let control = |name: &str, make: &dyn Fn(u64) -> moe_model::Result<MoeLm>| {
        let reports = (0..draws)
            .map(|draw| {
                let control = make(seed.wrapping_add(draw + 1))?;
                Ok(evaluate(&control, corpus, windows, seq_len, batch))
            })
            .collect::<crate::Result<Vec<_>>>()?;
        Ok::<_, crate::DataError>(NmiControl::from_draws(name, &reports))
    };
    Ok(vec![
        control("trained model, random routers", &|s| {
            model.clone().with_fresh_routers(s)
        })?,
        control("untrained model", &|s| model.config.init_seeded(&device, s))?,
    ])
}
