//! Branch-Train-Merge inference (Li et al., 2022), the baseline Branch-Train-MiX is measured
//! against: the branches stay separate dense models, and each validation window is scored by one
//! of them, the one with the lowest loss on the window's first `prefix` tokens (its prompt).
//! Losses count the positions after the prefix only; score other models on the same positions
//! with [`crate::eval::domain_evals`] and `from = prefix`.

use moe_model::MoeLm;
use serde::Serialize;

use crate::data::{Corpus, batch_from_windows, valid_windows};
use crate::eval::{DomainEval, Windows, domain_eval};
use crate::objective::token_losses;

/// One branch: its model and the domains it trained on.
pub struct BtmBranch<'a> {
    /// The model.
    pub model: &'a MoeLm,
    /// Its training domains (from its trainer state).
    pub domains: Vec<String>,
}

/// Branch-Train-Merge's validation figures.
#[derive(Debug, Clone, Serialize)]
pub struct BtmReport {
    /// Tokens of each window that choose the branch (not scored).
    pub prefix: usize,
    /// Per domain, the loss of the chosen branches over positions `prefix..`.
    pub losses: Vec<DomainEval>,
    /// Per domain, the share of its windows given to the branch trained on it (`None` when no
    /// branch was).
    pub own_branch: Vec<Option<f64>>,
}

/// Mean of `v`.
fn mean(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len().max(1) as f64
}

/// Scores every domain's validation windows `w` (`w.from` is the prefix) with the branch each
/// window's prefix picks.
pub fn btm_evaluate(branches: &[BtmBranch], corpus: &Corpus, w: Windows) -> BtmReport {
    let prefix = w.from.clamp(1, w.seq_len - 1);
    let device = branches[0].model.embed.weight.val().device();
    let mut losses = Vec::new();
    let mut own_branch = Vec::new();
    for (d, domain) in corpus.domains.iter().enumerate() {
        let own = branches
            .iter()
            .position(|b| b.domains == [domain.name.clone()]);
        let (mut window_losses, mut own_picks) = (Vec::new(), 0usize);
        for chunk in valid_windows(corpus, d, w.per_domain, w.seq_len).chunks(w.batch.max(1)) {
            let batch = batch_from_windows(corpus, chunk, w.seq_len, true, &device);
            // Per branch, every position's loss, row-major [rows * seq_len].
            let scored: Vec<Vec<f32>> = branches
                .iter()
                .map(|b| {
                    let logits = b.model.forward(batch.inputs.clone(), None).logits;
                    let t = token_losses(logits, batch.targets.clone());
                    t.into_data().try_into_vec_as::<f32>().expect("f32 losses")
                })
                .collect();
            for r in 0..chunk.len() {
                let row = |i: usize| &scored[i][r * w.seq_len..(r + 1) * w.seq_len];
                let pick = (0..branches.len())
                    .min_by(|&a, &b| mean(&row(a)[..prefix]).total_cmp(&mean(&row(b)[..prefix])))
                    .expect("at least one branch");
                own_picks += usize::from(Some(pick) == own);
                window_losses.push(mean(&row(pick)[prefix..]));
            }
        }
        own_branch.push(own.map(|_| own_picks as f64 / window_losses.len().max(1) as f64));
        losses.push(domain_eval(
            &domain.name,
            &window_losses,
            w.seq_len - prefix,
        ));
    }
    BtmReport {
        prefix,
        losses,
        own_branch,
    }
}
