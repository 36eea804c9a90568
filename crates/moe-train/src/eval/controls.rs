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
        Self {
            name: name.to_string(),
            nmi: of(&|r| r.mean_nmi),
            nmi_of_max: of(&|r| r.mean_nmi_of_max),
            conditional_mi: conditional.map(|c| Interval::of(&c)),
            layers: per_layer_mean(reports, |t| Some(t.nmi)).unwrap_or_default(),
            layers_conditional_mi: per_layer_mean(reports, |t| t.conditional_mi),
        }
    }
}

/// Per MoE layer, the mean of `f` over the draws' tables; `None` when there are no layers, when
/// the draws differ in their layer count, or when `f` gives `None` for any table.
fn per_layer_mean(
    reports: &[EvalReport],
    f: impl Fn(&RoutingTable) -> Option<f64>,
) -> Option<Vec<f64>> {
    let layers = reports.first()?.tables.len();
    if layers == 0 || reports.iter().any(|r| r.tables.len() != layers) {
        return None;
    }
    (0..layers)
        .map(|i| {
            let values = reports.iter().map(|r| f(&r.tables[i]));
            let sum = values.sum::<Option<f64>>()?;
            Some(sum / reports.len() as f64)
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A draw whose layers have these (NMI, conditional MI) figures.
    fn draw(layers: &[(f64, Option<f64>)]) -> EvalReport {
        let tables: Vec<RoutingTable> = layers
            .iter()
            .enumerate()
            .map(|(layer, &(nmi, conditional_mi))| RoutingTable {
                layer,
                shares: Vec::new(),
                nmi,
                nmi_of_max: nmi,
                mi: nmi,
                conditional_mi,
                document_mi: None,
            })
            .collect();
        let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
        let conditional: Option<Vec<f64>> = layers.iter().map(|l| l.1).collect();
        EvalReport {
            domains: Vec::new(),
            losses: Vec::new(),
            mean_nmi: mean(layers.iter().map(|l| l.0).collect()),
            mean_nmi_of_max: mean(layers.iter().map(|l| l.0).collect()),
            mean_conditional_mi: conditional.map(mean),
            tables,
            controls: Vec::new(),
            documents: Vec::new(),
        }
    }

    #[test]
    fn per_layer_figures_are_means_over_draws_in_layer_order() {
        let draws = [
            draw(&[(0.1, Some(0.2)), (0.3, Some(0.6)), (0.5, Some(1.0))]),
            draw(&[(0.3, Some(0.4)), (0.5, Some(0.8)), (0.9, Some(1.6))]),
        ];
        let c = NmiControl::from_draws("control", &draws);
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-12);
        assert!(close(&c.layers, &[0.2, 0.4, 0.7]), "{c:?}");
        let cmi = c.layers_conditional_mi.as_deref().unwrap();
        assert!(close(cmi, &[0.3, 0.7, 1.3]), "{c:?}");
        assert_eq!(c.conditional_mi.unwrap().n, 2);
    }

    #[test]
    fn a_layer_without_conditional_mi_or_unequal_draws_give_none() {
        let partial = [
            draw(&[(0.1, Some(0.2)), (0.3, Some(0.6))]),
            draw(&[(0.3, Some(0.4)), (0.5, None)]),
        ];
        let c = NmiControl::from_draws("control", &partial);
        assert_eq!(c.layers_conditional_mi, None);
        assert_eq!(c.layers.len(), 2);
        let unequal = [
            draw(&[(0.1, Some(0.2))]),
            draw(&[(0.3, Some(0.4)), (0.5, None)]),
        ];
        assert_eq!(per_layer_mean(&unequal, |t| Some(t.nmi)), None);
        assert_eq!(per_layer_mean(&[draw(&[])], |t| Some(t.nmi)), None);
    }
}
