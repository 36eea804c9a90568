//! Routers (gate networks): which experts see which tokens, and with what weight.
//!
//! - [`RouterKind::Softmax`]: softmax over all experts, then top-k, optionally renormalised
//!   (Mixtral with k = 2; Switch with k = 1 and no renormalisation).
//! - [`RouterKind::Sigmoid`]: independent sigmoid affinities, top-k, normalised (DeepSeek-V3).
//! - [`RouterKind::ExpertChoice`]: each expert picks its top-C tokens (Zhou et al., 2022).
//!
//! Any token-choice router can add a *selection bias* (auxiliary-loss-free balancing, Wang et al.
//! 2024; DeepSeek-V3): a per-expert offset added to the scores when picking experts but never to
//! the gate weights, and updated outside the gradient by [`crate::MoeLayer::update_selection_bias`].

use burn::module::Param;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::{sigmoid, softmax};

use crate::error::ConfigError;

/// How scores become expert choices.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum RouterKind {
    /// Softmax over experts, top-k per token.
    Softmax,
    /// Sigmoid per expert, top-k per token, weights normalised over the chosen experts.
    Sigmoid,
    /// Each expert picks its top-C tokens; a token may get any number of experts, or none.
    ExpertChoice,
}

/// Routing policy of an MoE layer.
#[derive(Config, Debug, PartialEq)]
pub struct RouterConfig {
    /// Score function and who chooses. Default: [`RouterKind::Softmax`].
    #[config(default = "RouterKind::Softmax")]
    pub kind: RouterKind,
    /// Experts per token (token choice), or the average experts per token that sets each
    /// expert's capacity (expert choice). Default: 2.
    #[config(default = 2)]
    pub top_k: usize,
    /// Rescale the k selected weights to sum to 1 (Mixtral, DeepSeek-V3). Default: true.
    /// Switch (k = 1) keeps the raw probability so the router still gets a gradient.
    #[config(default = true)]
    pub renormalize: bool,
    /// Keep a per-expert selection bias for auxiliary-loss-free balancing. Default: false.
    #[config(default = false)]
    pub selection_bias: bool,
    /// Multiplicative jitter on the router input while training: x * U(1 - eps, 1 + eps).
    /// Default: 0 (off). Switch uses 0.01.
    #[config(default = 0.0)]
    pub jitter: f64,
    /// Factor on the gate weights after normalisation (DeepSeek-V3's routed scaling). Default: 1.
    #[config(default = 1.0)]
    pub route_scale: f64,
    /// Standard deviation of the gate weights at initialisation; 0 starts them at zero.
    /// Default: 0.02 (as in Switch and DeepSeek). Small gates start with near-uniform routing
    /// probabilities, so the balancing loss and the language-model loss shape the routing,
    /// rather than the random projection of a default (Kaiming) initialisation.
    #[config(default = 0.02)]
    pub init_std: f64,
}

impl RouterConfig {
    /// Mixtral: softmax, top-2, renormalised.
    pub fn mixtral() -> Self {
        Self::new()
    }

    /// Switch Transformer: softmax, top-1, the raw probability as gate weight, input jitter 0.01.
    pub fn switch() -> Self {
        Self::new()
            .with_top_k(1)
            .with_renormalize(false)
            .with_jitter(0.01)
    }

    /// DeepSeek-V3: sigmoid affinities, top-k, normalised, with a selection bias for
    /// auxiliary-loss-free balancing.
    pub fn deepseek_v3(top_k: usize) -> Self {
        Self::new()
            .with_kind(RouterKind::Sigmoid)
            .with_top_k(top_k)
            .with_selection_bias(true)
    }

    /// Expert choice with an average of `top_k` experts per token.
    pub fn expert_choice(top_k: usize) -> Self {
        Self::new()
            .with_kind(RouterKind::ExpertChoice)
            .with_top_k(top_k)
    }

    /// Checks the policy against the number of experts.
    pub fn validate(&self, n_experts: usize) -> Result<(), ConfigError> {
        if self.top_k == 0 || self.top_k > n_experts {
            return Err(ConfigError::TopK {
                top_k: self.top_k,
                n_experts,
            });
        }
        if self.selection_bias && self.kind == RouterKind::ExpertChoice {
            return Err(ConfigError::OutOfRange {
                name: "selection_bias",
                expected: "off for expert choice (it balances by construction)",
                value: 1.0,
            });
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(ConfigError::OutOfRange {
                name: "jitter",
                expected: "in [0, 1)",
                value: self.jitter,
            });
        }
        if !(self.init_std >= 0.0 && self.init_std.is_finite()) {
            return Err(ConfigError::OutOfRange {
                name: "init_std",
                expected: ">= 0 and finite",
                value: self.init_std,
            });
        }
        if !(self.route_scale > 0.0 && self.route_scale.is_finite()) {
            return Err(ConfigError::OutOfRange {
                name: "route_scale",
                expected: "positive and finite",
                value: self.route_scale,
            });
        }
        Ok(())
    }

    /// Builds the router for `n_experts` experts of width `d_model`.
    pub fn init(&self, d_model: usize, n_experts: usize, device: &Device) -> Router {
        let bias = self.selection_bias.then(|| {
            Param::from_tensor(Tensor::zeros([n_experts], device)).set_require_grad(false)
        });
        Router {
            gate: LinearConfig::new(d_model, n_experts)
                .with_bias(false)
                .with_initializer(if self.init_std > 0.0 {
                    Initializer::Normal {
                        mean: 0.0,
                        std: self.init_std,
                    }
                } else {
                    Initializer::Zeros
                })
                .init(device),
            bias,
            config: self.clone(),
        }
    }
}

/// The gate network: a bias-free linear map from token to expert logits.
#[derive(Module, Debug)]
pub struct Router {
    /// Gate weights `[d_model, E]`.
    pub gate: Linear,
    /// Selection bias `[E]` (auxiliary-loss-free balancing); not trained by gradient.
    pub bias: Option<Param<Tensor<1>>>,
    /// The routing policy.
    #[module(skip)]
    pub config: RouterConfig,
}

/// Who processes which token.
#[derive(Debug, Clone)]
pub enum Assignment {
    /// Each token picked `k` experts.
    TokenChoice {
        /// Chosen experts `[T, k]`, distinct per row.
        experts: Tensor<2, Int>,
        /// Gate weight of each choice `[T, k]`.
        weights: Tensor<2>,
    },
    /// Each expert picked `C` tokens.
    ExpertChoice {
        /// Chosen tokens `[E, C]`, distinct per row.
        tokens: Tensor<2, Int>,
        /// Gate weight of each choice `[E, C]`.
        weights: Tensor<2>,
    },
}

/// What the router decided for a batch of tokens.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Raw gate logits `[T, E]` (for the z-loss).
    pub logits: Tensor<2>,
    /// Affinities normalised to sum to 1 per token `[T, E]` (for the balancing loss and entropy).
    pub probs: Tensor<2>,
    /// The decision.
    pub assignment: Assignment,
}

impl Router {
    /// Number of experts routed over.
    pub fn n_experts(&self) -> usize {
        self.gate.weight.shape().dims::<2>()[1]
    }

    /// Routes tokens by token choice: each token picks `top_k` experts.
    ///
    /// x: `[T, d_model]`
    ///
    /// # Panics
    /// For an expert-choice router, which needs a capacity: use [`Self::forward_expert_choice`].
    pub fn forward(&self, x: Tensor<2>) -> Routing {
        assert!(
            self.config.kind != RouterKind::ExpertChoice,
            "an expert-choice router picks tokens under a capacity: call forward_expert_choice"
        );
        let (logits, probs, scores) = self.scores(x);
        let picker = match &self.bias {
            Some(b) => scores.clone().detach() + b.val().unsqueeze_dim(0),
            None => scores.clone(),
        };
        let experts = top_k_indices(picker, self.config.top_k); // [T, k]
        let mut weights = scores.gather(1, experts.clone()); // [T, k]
        if self.config.renormalize {
            weights = weights.clone() / weights.sum_dim(1).add_scalar(RENORM_EPS);
        }
        if self.config.route_scale != 1.0 {
            weights = weights.mul_scalar(self.config.route_scale);
        }
        Routing {
            logits,
            probs,
            assignment: Assignment::TokenChoice { experts, weights },
        }
    }

    /// Routes tokens by expert choice: each expert picks its `capacity` best tokens.
    ///
    /// x: `[T, d_model]`; `valid`: `[T]` true for real tokens (padding wins a slot only when
    /// real tokens run out); capacity: at most T.
    pub fn forward_expert_choice(
        &self,
        x: Tensor<2>,
        valid: Option<Tensor<1, Bool>>,
        capacity: usize,
    ) -> Routing {
        let (logits, probs, scores) = self.scores(x);
        // Padding must never win a slot: push its scores below every real score.
        let picker = match valid {
            Some(v) => scores.clone().mask_fill(
                v.bool_not().unsqueeze_dim::<2>(1).expand(scores.dims()),
                -1.0,
            ),
            None => scores.clone(),
        };
        let tokens = top_k_indices(picker.transpose(), capacity); // [E, C]
        let weights = scores.transpose().gather(1, tokens.clone());
        Routing {
            logits,
            probs,
            assignment: Assignment::ExpertChoice { tokens, weights },
        }
    }

    /// Gate logits, affinities normalised per token, and the scores experts are picked by.
    ///
    /// x: `[T, d_model]` -> three `[T, E]` tensors
    fn scores(&self, x: Tensor<2>) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
        let logits = self.gate.forward(self.jitter(x)); // [T, E]
        match self.config.kind {
            RouterKind::Softmax | RouterKind::ExpertChoice => {
                let p = softmax(logits.clone(), 1);
                (logits, p.clone(), p)
            }
            RouterKind::Sigmoid => {
                let s = sigmoid(logits.clone()); // [T, E]
                let sum = s.clone().sum_dim(1).add_scalar(RENORM_EPS);
                (logits, s.clone() / sum, s)
            }
        }
    }

    /// Multiplicative input jitter, only while training (on an autodiff device).
    fn jitter(&self, x: Tensor<2>) -> Tensor<2> {
        let eps = self.config.jitter;
        if eps == 0.0 || !x.device().is_autodiff() {
            return x;
        }
        let noise = x.random_like(Distribution::Uniform(1.0 - eps, 1.0 + eps));
        x * noise
    }
}

/// Added to every normalising sum of gate scores: sigmoid scores can all underflow to 0, and
/// 0 / 0 would make the weights NaN (DeepSeek-V3 adds the same 1e-20).
const RENORM_EPS: f64 = 1e-20;

/// Up to this k, top-k is k rounds of arg-max (each masking its pick) instead of a sort.
const ARGMAX_TOP_K: usize = 4;

/// Indices of the k largest entries of each row, largest first. x: `[R, N]` -> `[R, k]`,
/// k <= N.
///
/// Small k (token choice) takes k arg-max passes, which costs O(k N) per row against the sort
/// behind Burn's top-k on the CPU backends (measured in docs/benchmarks.md). Large k (expert
/// choice capacities) sorts each row and keeps the first k: in burn 0.22.1 wgpu's
/// `topk_with_indices` returns index -1 past the first few picks for k = 128 of 512 columns
/// (seen on lavapipe), where the sort is right.
fn top_k_indices(x: Tensor<2>, k: usize) -> Tensor<2, Int> {
    let [r, n] = x.dims();
    if k > ARGMAX_TOP_K || k >= n {
        return x.sort_descending_with_indices(1).1.slice([0..r, 0..k]);
    }
    let columns = Tensor::<1, Int>::arange(0..n as i64, &x.device()).reshape([1, n]);
    let mut rest = x;
    let mut picks = Vec::with_capacity(k);
    for round in 0..k {
        let pick = rest.clone().argmax(1); // [R, 1]
        if round + 1 < k {
            let taken = columns.clone().equal(pick.clone()); // [R, N]
            rest = rest.mask_fill(taken, f32::NEG_INFINITY);
        }
        picks.push(pick);
    }
    Tensor::cat(picks, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ints, test_device, values};
    use rstest::rstest;

    /// Sigmoid scores that all underflow to 0 used to give 0 / 0 = NaN weights and affinities.
    #[rstest]
    fn sigmoid_scores_that_underflow_give_finite_weights(
        #[values("flex", "ndarray", "wgpu")] backend: &str,
    ) {
        let Some(device) = test_device(backend) else {
            return;
        };
        let mut router = RouterConfig::deepseek_v3(2).init(4, 4, &device);
        router.gate.weight = Param::from_tensor(Tensor::full([4, 4], -500.0, &device));
        let routing = router.forward(Tensor::ones([3, 4], &device));
        let Assignment::TokenChoice { weights, .. } = routing.assignment else {
            panic!("token choice expected");
        };
        assert!(values(weights).iter().all(|w| w.is_finite()));
        assert!(values(routing.probs).iter().all(|p| p.is_finite()));
    }

    #[rstest]
    fn gates_start_small_or_at_zero(#[values("flex", "ndarray", "wgpu")] backend: &str) {
        let Some(device) = test_device(backend) else {
            return;
        };
        let w = values(RouterConfig::new().init(256, 64, &device).gate.weight.val());
        let std = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
        assert!((0.018..0.022).contains(&std), "std {std}");
        let zero = RouterConfig::new().with_init_std(0.0).init(8, 4, &device);
        assert!(values(zero.gate.weight.val()).iter().all(|&v| v == 0.0));
        assert!(RouterConfig::new().with_init_std(-1.0).validate(4).is_err());
    }

    #[test]
    fn switch_preset_has_the_jitter_its_doc_gives() {
        assert_eq!(RouterConfig::switch().jitter, 0.01);
    }

    #[test]
    #[should_panic(expected = "forward_expert_choice")]
    fn token_choice_forward_refuses_an_expert_choice_router() {
        let device = Device::flex();
        let router = RouterConfig::expert_choice(2).init(4, 4, &device);
        router.forward(Tensor::ones([3, 4], &device));
    }

    /// Every (k, columns) path of `top_k_indices`, including the expert-choice size that
    /// Burn's wgpu top-k gets wrong, on a contiguous and on a transposed (strided) input, as
    /// expert choice passes it.
    #[rstest]
    fn top_k_indices_match_a_host_sort(
        #[values("flex", "ndarray", "wgpu")] backend: &str,
        #[values((2, 8), (4, 64), (128, 512), (512, 512))] k_n: (usize, usize),
    ) {
        let Some(device) = test_device(backend) else {
            return;
        };
        let ((k, n), rows) = (k_n, 3);
        // Distinct values per row (37 is coprime with every n here), no ties to break.
        let value = |r: usize, j: usize| ((j * 37 + r * 11) % n) as f32;
        let data: Vec<f32> = (0..rows)
            .flat_map(|r| (0..n).map(move |j| value(r, j)))
            .collect();
        let x = Tensor::<1>::from_floats(data.as_slice(), &device).reshape([rows, n]);
        let strided = x.clone().transpose().into_data();
        let strided = Tensor::<2>::from_data(strided, &device).transpose();
        let expected: Vec<i64> = (0..rows)
            .flat_map(|r| {
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|a, b| value(r, *b).total_cmp(&value(r, *a)));
                order.into_iter().take(k).map(|j| j as i64)
            })
            .collect();
        assert_eq!(ints(top_k_indices(x, k)), expected);
        assert_eq!(ints(top_k_indices(strided, k)), expected);
    }
}
