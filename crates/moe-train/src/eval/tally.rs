//! Routing tallies of an evaluation, per MoE layer: the assignments of each domain to each
//! expert, the same split by the current token, and by document.

use std::collections::BTreeMap;

use super::mutual_info::{conditional_mutual_information, mutual_information};

/// One MoE layer's counts of assignments.
pub(super) struct LayerTally {
    /// Layer index.
    pub layer: usize,
    n_domains: usize,
    /// `joint[d][e]`: assignments of domain d's tokens to expert e.
    pub joint: Vec<Vec<f64>>,
    /// Per current token, its `[domain][expert]` table (in token order, so that the sums over
    /// tokens, and the figures, are the same in every run).
    by_token: BTreeMap<u32, Vec<Vec<f64>>>,
    /// Per (domain, document), assignments per expert.
    by_document: BTreeMap<(usize, usize), Vec<f64>>,
    /// Whether per-token choices were seen (token choice); expert choice gives loads only.
    per_token: bool,
}

impl LayerTally {
    /// An empty tally of layer `layer` for `n_domains` domains and `n_experts` experts.
    pub fn new(layer: usize, n_domains: usize, n_experts: usize) -> Self {
        Self {
            layer,
            n_domains,
            joint: vec![vec![0.0; n_experts]; n_domains],
            by_token: BTreeMap::new(),
            by_document: BTreeMap::new(),
            per_token: false,
        }
    }

    /// Adds the experts `choices` (`k` per token, row-major) picked for `tokens` of domain
    /// `domain`, token t being in document `docs[t]`.
    pub fn add_choices(
        &mut self,
        domain: usize,
        tokens: &[u32],
        docs: &[usize],
        choices: &[i64],
        k: usize,
    ) {
        self.per_token = true;
        let n_experts = self.joint[0].len();
        for (t, (&token, &doc)) in tokens.iter().zip(docs).enumerate() {
            let table = self
                .by_token
                .entry(token)
                .or_insert_with(|| vec![vec![0.0; n_experts]; self.n_domains]);
            let hist = self
                .by_document
                .entry((domain, doc))
                .or_insert_with(|| vec![0.0; n_experts]);
            for &e in &choices[t * k..(t + 1) * k] {
                let e = e as usize;
                self.joint[domain][e] += 1.0;
                table[domain][e] += 1.0;
                hist[e] += 1.0;
            }
        }
    }

    /// Adds processed loads per expert of domain `domain` (routers without per-token choices).
    pub fn add_load(&mut self, domain: usize, load: &[f64]) {
        for (acc, l) in self.joint[domain].iter_mut().zip(load) {
            *acc += l;
        }
    }

    /// `I(D;E | current token)` (nats), when per-token choices were seen.
    pub fn conditional_mi(&self) -> Option<f64> {
        self.per_token
            .then(|| conditional_mutual_information(self.by_token.values().map(Vec::as_slice)))
    }

    /// `I(document; E | D)` (nats): how much documents of one domain differ in their experts.
    pub fn document_mi(&self) -> Option<f64> {
        if !self.per_token {
            return None;
        }
        let per_domain: Vec<Vec<Vec<f64>>> = (0..self.n_domains)
            .map(|d| {
                self.by_document
                    .range((d, 0)..(d + 1, 0))
                    .map(|(_, h)| h.clone())
                    .collect()
            })
            .collect();
        Some(conditional_mutual_information(
            per_domain.iter().map(Vec::as_slice),
        ))
    }

    /// Each document's share of assignments per expert, keyed by (domain, document).
    pub fn documents(&self) -> impl Iterator<Item = (&(usize, usize), Vec<f64>)> {
        self.by_document.iter().map(|(key, h)| {
            let n: f64 = h.iter().sum();
            (key, h.iter().map(|c| c / n.max(1.0)).collect())
        })
    }

    /// `I(D;E)` (nats).
    pub fn mi(&self) -> f64 {
        mutual_information(&self.joint)
    }
}
