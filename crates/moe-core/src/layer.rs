//! The MoE feed-forward layer: router, expert bank, optional shared experts.

use burn::prelude::*;

use crate::accounting::Accounting;
use crate::dispatch::{LayoutChoice, TokenDispatch, expert_choice_apply};
use crate::error::ConfigError;
use crate::experts::{Experts, ExpertsConfig};
use crate::ffn::{SwiGluFfn, SwiGluFfnConfig};
use crate::loss::{entropy_sum, load_balancing_loss, router_z_loss};
use crate::router::{Assignment, Router, RouterConfig, RouterKind};
use crate::stats::RoutingStats;

/// How the experts' matmuls are issued in dropless mode.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum ExpertCompute {
    /// Padded batches in training. In inference, segments on a host CPU backend (their chains
    /// run side by side on the cores); elsewhere segments when experts get many rows each or
    /// loads are very uneven, padded batches otherwise (see
    /// [`SEGMENT_MIN_ROWS`](crate::dispatch::SEGMENT_MIN_ROWS)).
    Auto,
    /// One batched matmul over `[E, C, d]` blocks padded to the busiest expert.
    Padded,
    /// One matmul per expert on exactly its rows (inference; in training the backward pass of
    /// slicing the stacked weights costs a full-size gradient per expert).
    Segments,
}

/// Configuration of an [`MoeLayer`].
#[derive(Config, Debug, PartialEq)]
pub struct MoeLayerConfig {
    /// Model width.
    pub d_model: usize,
    /// Hidden width of each routed expert.
    pub d_ff: usize,
    /// Number of routed experts.
    pub n_experts: usize,
    /// Routing policy. Default: Mixtral (softmax, top-2, renormalised).
    #[config(default = "RouterConfig::new()")]
    pub router: RouterConfig,
    /// Always-active shared experts (DeepSeekMoE), each of width `d_ff`; run as one dense SwiGLU
    /// of width `n_shared_experts * d_ff`. Default: 0.
    #[config(default = 0)]
    pub n_shared_experts: usize,
    /// Capacity factor: each expert takes at most `ceil(cf * T * k / E)` assignments and the rest
    /// are dropped (they pass through the residual). `None` is dropless. Expert choice uses it as
    /// its capacity (default 1.0 there). Default: `None`.
    #[config(default = "None")]
    pub capacity_factor: Option<f64>,
    /// How dropless expert matmuls are issued. Default: [`ExpertCompute::Auto`].
    #[config(default = "ExpertCompute::Auto")]
    pub compute: ExpertCompute,
}

impl MoeLayerConfig {
    /// Checks every size and rate.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("d_model", self.d_model),
            ("d_ff", self.d_ff),
            ("n_experts", self.n_experts),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero { name });
            }
        }
        self.router.validate(self.n_experts)?;
        if let Some(cf) = self.capacity_factor
            && !(cf > 0.0 && cf.is_finite())
        {
            return Err(ConfigError::OutOfRange {
                name: "capacity_factor",
                expected: "positive and finite",
                value: cf,
            });
        }
        Ok(())
    }

    /// Builds the layer, or says why the configuration cannot work.
    pub fn try_init(&self, device: &Device) -> Result<MoeLayer, ConfigError> {
        self.validate()?;
        Ok(MoeLayer {
            router: self.router.init(self.d_model, self.n_experts, device),
            experts: self.experts_config().init(device),
            shared: self.shared_config().map(|c| c.init(device)),
            capacity_factor: self.capacity_factor,
            compute: self.compute,
        })
    }

    /// Builds the layer.
    ///
    /// # Panics
    /// If the configuration is invalid; use [`Self::try_init`] to get the error instead.
    pub fn init(&self, device: &Device) -> MoeLayer {
        self.try_init(device)
            .unwrap_or_else(|e| panic!("invalid MoE layer configuration: {e}"))
    }

    /// The routed expert bank's configuration.
    pub fn experts_config(&self) -> ExpertsConfig {
        ExpertsConfig::new(self.d_model, self.d_ff, self.n_experts)
    }

    /// The shared experts' configuration, if any.
    pub fn shared_config(&self) -> Option<SwiGluFfnConfig> {
        (self.n_shared_experts > 0)
            .then(|| SwiGluFfnConfig::new(self.d_model, self.n_shared_experts * self.d_ff))
    }

    /// Experts a token uses on average: k for token choice, `k * cf` for expert choice.
    pub fn experts_per_token(&self) -> f64 {
        let k = self.router.top_k as f64;
        match self.router.kind {
            RouterKind::ExpertChoice => k * self.capacity_factor.unwrap_or(1.0),
            _ => k,
        }
    }

    /// Parameters, active parameters and FLOPs per token.
    pub fn accounting(&self) -> Accounting {
        let (d, e) = (self.d_model, self.n_experts);
        let expert = 3 * d * self.d_ff;
        let shared = self.shared_config().map_or(0, |c| c.num_params());
        let router = d * e;
        let bias = if self.router.selection_bias { e } else { 0 };
        let active_matmul =
            router + shared + (self.experts_per_token() * expert as f64).round() as usize;
        Accounting {
            total_params: router + bias + shared + e * expert,
            active_params: active_matmul + bias,
            expert_params: e * expert,
            flops_per_token: 2 * active_matmul,
        }
    }
}

/// The auxiliary losses of a forward pass, unweighted (the trainer picks the coefficients).
#[derive(Debug, Clone)]
pub struct AuxLosses {
    /// Switch load-balancing loss `E * sum_i f_i P_i` (1 when uniform). Scalar `[1]`.
    pub balance: Tensor<1>,
    /// Router z-loss `mean(logsumexp(logits)^2)`. Scalar `[1]`.
    pub z: Tensor<1>,
}

impl AuxLosses {
    /// Adds another layer's losses.
    pub fn merge(self, other: Self) -> Self {
        Self {
            balance: self.balance + other.balance,
            z: self.z + other.z,
        }
    }
}

/// What [`MoeLayer::forward`] returns.
#[derive(Debug, Clone)]
pub struct MoeOutput<const D: usize> {
    /// The layer output, same shape as the input.
    pub output: Tensor<D>,
    /// Auxiliary losses.
    pub aux: AuxLosses,
    /// Routing statistics (device tensors).
    pub stats: RoutingStats,
}

/// A Mixture-of-Experts SwiGLU feed-forward layer.
#[derive(Module, Debug)]
pub struct MoeLayer {
    /// The gate network.
    pub router: Router,
    /// The routed experts.
    pub experts: Experts,
    /// Always-active shared experts.
    pub shared: Option<SwiGluFfn>,
    /// Capacity factor (`None`: dropless).
    pub capacity_factor: Option<f64>,
    /// How dropless expert matmuls are issued.
    #[module(skip)]
    pub compute: ExpertCompute,
}

impl MoeLayer {
    /// x: `[batch, seq, d_model]`; mask: `[batch, seq]`, true for real tokens (padding neither
    /// takes an expert's capacity nor counts in the losses and statistics).
    /// Output: `[batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<3>, mask: Option<Tensor<2, Bool>>) -> MoeOutput<3> {
        let [b, s, d] = x.dims();
        let out = self.forward_tokens(x.reshape([b * s, d]), mask.map(|m| m.reshape([b * s])));
        MoeOutput {
            output: out.output.reshape([b, s, d]),
            aux: out.aux,
            stats: out.stats,
        }
    }

    /// The layer on a flat list of tokens.
    ///
    /// x: `[T, d_model]`; valid: `[T]` -> output `[T, d_model]`
    pub fn forward_tokens(&self, x: Tensor<2>, valid: Option<Tensor<1, Bool>>) -> MoeOutput<2> {
        let [t, _] = x.dims();
        let e = self.router.n_experts();
        let k = self.router.config.top_k;
        let device = x.device();
        let capacity = |cf: f64| self.capacity(t, cf);

        let routing = self.router.forward(
            x.clone(),
            valid.clone(),
            capacity(self.capacity_factor.unwrap_or(1.0)),
        );
        let valid_f = valid.clone().map(|v| v.float()); // [T]
        let tokens = match &valid_f {
            Some(v) => v.clone().sum(),
            None => Tensor::full([1], t as f64, &device),
        };

        let (mut output, routed, load, dropped, requested) = match routing.assignment {
            Assignment::TokenChoice { experts, weights } => {
                let choice = self.layout_choice(t, device.is_autodiff());
                let plan = TokenDispatch::plan(experts, valid, e, choice);
                let output = plan.apply(&self.experts, x.clone(), weights);
                let dropped = plan.dropped();
                let requested = tokens.clone().mul_scalar(k as f64);
                (output, plan.routed, plan.load, dropped, requested)
            }
            Assignment::ExpertChoice {
                tokens: picks,
                weights,
            } => {
                let [_, c] = picks.dims();
                let source = picks.clone().reshape([e * c]);
                let (weights, picked) = match &valid_f {
                    // Padding only fills slots when real tokens run out; give it no weight.
                    Some(v) => {
                        let real = v.clone().select(0, source.clone()).reshape([e, c]);
                        (weights * real.clone(), real)
                    }
                    None => (weights, Tensor::ones([e, c], &device)),
                };
                let load = picked.clone().sum_dim(1).reshape([e]); // [E]
                let coverage = Tensor::<1>::zeros([t], &device).select_assign(
                    0,
                    source,
                    picked.reshape([e * c]),
                    burn::tensor::IndexingUpdateOp::Add,
                ); // [T] experts per token
                let unpicked = coverage.equal_elem(0.0).float();
                let unpicked = match &valid_f {
                    Some(v) => unpicked * v.clone(),
                    None => unpicked,
                };
                let output = expert_choice_apply(&self.experts, x.clone(), picks, weights);
                (output, load.clone(), load, unpicked.sum(), tokens.clone())
            }
        };
        if let Some(shared) = &self.shared {
            output = output + shared.forward(x);
        }

        let entropy_sum = entropy_sum(routing.probs.clone(), valid_f.clone());
        let aux = AuxLosses {
            balance: load_balancing_loss(routed.clone(), routing.probs, valid_f.clone()),
            z: router_z_loss(routing.logits, valid_f),
        };
        let stats = RoutingStats {
            load,
            routed,
            dropped,
            requested,
            entropy_sum,
            tokens,
        };
        MoeOutput { output, aux, stats }
    }

    /// Per-expert capacity `ceil(cf * T * k / E)` for `t` tokens, at least 1 and at most `t`.
    fn capacity(&self, t: usize, cf: f64) -> usize {
        let (e, k) = (self.router.n_experts(), self.router.config.top_k);
        ((cf * (t * k) as f64 / e as f64).ceil() as usize).clamp(1, t)
    }

    /// The token-choice dispatch layout for `t` tokens, in training or inference.
    pub fn layout_choice(&self, t: usize, training: bool) -> LayoutChoice {
        match (self.capacity_factor, self.compute) {
            (Some(cf), _) => LayoutChoice::Capacity(self.capacity(t, cf)),
            (None, ExpertCompute::Padded) => LayoutChoice::DroplessPadded,
            (None, ExpertCompute::Segments) => LayoutChoice::DroplessSegments,
            // Slicing stacked weights costs a full-size gradient per expert in the backward pass.
            (None, ExpertCompute::Auto) if training => LayoutChoice::DroplessPadded,
            (None, ExpertCompute::Auto) => LayoutChoice::DroplessAuto,
        }
    }

    /// Auxiliary-loss-free balancing (DeepSeek-V3): after an optimizer step, moves each expert's
    /// selection bias by `rate` toward the mean load, `b_i += rate * sign(mean_load - load_i)`.
    /// Overloaded experts become less likely to be picked, idle ones more. A no-op for a router
    /// without selection bias.
    ///
    /// load: `[E]`, e.g. [`RoutingStats::load`] accumulated since the last update.
    pub fn update_selection_bias(&mut self, load: Tensor<1>, rate: f64) {
        if let Some(bias) = self.router.bias.take() {
            let load = load.detach().to_device(&bias.val().device());
            let delta = (load.clone().mean() - load).sign().mul_scalar(rate); // [E]
            self.router.bias = Some(bias.map(|b| (b + delta).detach()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::test_device;
    use burn::module::Param;
    use rstest::rstest;

    /// Overloads expert 0 through the gate weights, then lets the bias rule rebalance.
    #[rstest]
    fn bias_updates_move_load_toward_uniform(#[values("flex", "ndarray", "wgpu")] backend: &str) {
        let Some(device) = test_device(backend) else {
            return;
        };
        let (d, e) = (16, 8);
        let mut layer = MoeLayerConfig::new(d, 8, e)
            .with_router(RouterConfig::deepseek_v3(2))
            .init(&device);
        let gate = layer.router.gate.weight.val();
        let skew = Tensor::<2>::zeros([d, e], &device)
            .slice_assign([0..d, 0..1], Tensor::full([d, 1], 0.3, &device));
        layer.router.gate.weight = Param::from_tensor(gate + skew);
        let x = Tensor::<2>::random([256, d], burn::tensor::Distribution::Default, &device)
            .add_scalar(0.5);

        let violation = |layer: &MoeLayer| {
            layer
                .forward_tokens(x.clone(), None)
                .stats
                .summary()
                .max_violation
        };
        let before = violation(&layer);
        for _ in 0..60 {
            let load = layer.forward_tokens(x.clone(), None).stats.load;
            layer.update_selection_bias(load, 0.01);
        }
        let after = violation(&layer);
        assert!(before > 1.0, "the skew should overload expert 0: {before}");
        assert!(after < 0.5 * before, "max violation {before} -> {after}");
    }

    #[test]
    fn bias_update_is_a_no_op_without_a_bias() {
        let device = Device::flex();
        let mut layer = MoeLayerConfig::new(8, 8, 4).init(&device);
        layer.update_selection_bias(Tensor::from_floats([1.0, 2.0, 3.0, 4.0], &device), 0.1);
        assert!(layer.router.bias.is_none());
    }
}
