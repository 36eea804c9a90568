//! The MoE feed-forward layer: router, expert bank, optional shared experts.

use burn::prelude::*;

use crate::accounting::Accounting;
use crate::dispatch::{LayoutChoice, TokenDispatch, capacity, expert_choice_apply};
use crate::error::ConfigError;
use crate::experts::{Experts, ExpertsConfig, OUT_IN_MIN_ELEMENTS, WeightOrder};
use crate::ffn::{SwiGluFfn, SwiGluFfnConfig};
use crate::host::runs_on_host;
use crate::loss::{entropy_sum, load_balancing_loss, router_z_loss};
use crate::router::{Assignment, Router, RouterConfig, RouterKind, Routing};
use crate::stats::RoutingStats;

/// How the experts' matmuls are issued in dropless mode.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum ExpertCompute {
    /// In training, padded blocks, with a second tier for busy experts when routing is uneven
    /// ([`ExpertLayout::Tiered`](crate::dispatch::ExpertLayout::Tiered)): the work stays within
    /// `4 sqrt(E)` times the assignments however collapsed the routing. In inference, segments
    /// on a host CPU backend (their chains run side by side on the cores); elsewhere padded
    /// batches, unless loads are so uneven that padding would more than double the rows (see
    /// [`LayoutChoice::DroplessAuto`](crate::dispatch::LayoutChoice::DroplessAuto)).
    Auto,
    /// One batched matmul over `[E, C, d]` blocks padded to the busiest expert.
    Padded,
    /// One matmul per expert on exactly its rows. Inference only: in training the backward pass
    /// of slicing the stacked weights costs a full-size gradient per expert, so a layer with
    /// it is refused on an autodiff device.
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
    /// Exact segments ([`ExpertCompute::Segments`]) are refused on an autodiff device.
    pub fn try_init(&self, device: &Device) -> Result<MoeLayer, ConfigError> {
        self.validate()?;
        if self.compute == ExpertCompute::Segments && device.is_autodiff() {
            return Err(ConfigError::SegmentsInTraining);
        }
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
        if b * s == 0 {
            // Burn reads a 0 in a reshape target as "keep this dimension": no flattening.
            let (aux, stats) = self.empty_aux_and_stats(&x.device());
            return MoeOutput {
                output: x,
                aux,
                stats,
            };
        }
        let out = self.forward_tokens(x.reshape([b * s, d]), mask.map(|m| m.reshape([b * s])));
        MoeOutput {
            output: out.output.reshape([b, s, d]),
            aux: out.aux,
            stats: out.stats,
        }
    }

    /// The layer's output alone, for inference: token-choice routing dispatches and combines
    /// without computing the balancing losses, the router entropy or the routing statistics.
    ///
    /// x: `[batch, seq, d_model]`; mask: `[batch, seq]`, true for real tokens (padding takes no
    /// expert's rows) -> `[batch, seq, d_model]`
    pub fn infer(&self, x: Tensor<3>, mask: Option<Tensor<2, Bool>>) -> Tensor<3> {
        let [b, s, d] = x.dims();
        if b * s == 0 || self.router.config.kind == RouterKind::ExpertChoice {
            // Expert choice needs the real-token count for its capacity: the full path.
            return self.forward(x, mask).output;
        }
        let x = x.reshape([b * s, d]);
        let valid = mask.map(|m| m.reshape([b * s]));
        let routing = self.router.forward(x.clone());
        let (_, mut output) = self.dispatch(x.clone(), &routing.assignment, valid);
        if let Some(shared) = &self.shared {
            output = output + shared.forward(x);
        }
        output.reshape([b, s, d])
    }

    /// The same layer laid out for inference on its device: on a host CPU backend (flex or
    /// ndarray without autodiff), where its experts run as exact segments, a resident f32 or
    /// f16 bank of experts of at least [`OUT_IN_MIN_ELEMENTS`] per matrix moves to
    /// [`WeightOrder::OutIn`], which multiplies the few rows per expert of decoding faster
    /// (docs/benchmarks.md). Elsewhere (wgpu, autodiff, padded or capacity layouts, paged banks,
    /// small experts) nothing changes. The outputs are the same up to float rounding. Do not
    /// train it.
    pub fn for_inference(mut self) -> Self {
        let [_, d, f] = self.experts.dims();
        let segments = matches!(
            self.layout_choice(false),
            LayoutChoice::DroplessSegments | LayoutChoice::DroplessAuto
        );
        let host = runs_on_host(&self.router.gate.weight.lazy_device());
        if segments && host && d * f >= OUT_IN_MIN_ELEMENTS {
            self.experts = self.experts.with_order(WeightOrder::OutIn);
        }
        self
    }

    /// The layer on a flat list of tokens.
    ///
    /// x: `[T, d_model]`; valid: `[T]` -> output `[T, d_model]`
    pub fn forward_tokens(&self, x: Tensor<2>, valid: Option<Tensor<1, Bool>>) -> MoeOutput<2> {
        let [t, _] = x.dims();
        if t == 0 {
            return self.empty_output(x);
        }
        let device = x.device();
        let valid_f = valid.clone().map(|v| v.float()); // [T]
        let tokens = match &valid_f {
            Some(v) => v.clone().sum(),
            None => Tensor::full([1], t as f64, &device),
        };
        let (routing, routed) = match self.router.config.kind {
            RouterKind::ExpertChoice => {
                let routing = self.route_expert_choice(x.clone(), valid.clone());
                let routed = self.expert_choice(x.clone(), &routing.assignment, &valid_f, &tokens);
                (routing, routed)
            }
            RouterKind::Softmax | RouterKind::Sigmoid => {
                let routing = self.router.forward(x.clone());
                let routed = self.token_choice(x.clone(), &routing.assignment, valid, &tokens);
                (routing, routed)
            }
        };
        let mut output = routed.output;
        if let Some(shared) = &self.shared {
            output = output + shared.forward(x);
        }
        let entropy_sum = entropy_sum(routing.probs.clone().detach(), valid_f.clone());
        let aux = AuxLosses {
            balance: load_balancing_loss(routed.routed.clone(), routing.probs, valid_f.clone()),
            z: router_z_loss(routing.logits, valid_f),
        };
        let choices = match &routing.assignment {
            Assignment::TokenChoice { experts, .. } => Some(experts.clone()),
            Assignment::ExpertChoice { .. } => None,
        };
        let stats = RoutingStats {
            load: routed.load,
            routed: routed.routed,
            dropped: routed.dropped,
            requested: routed.requested,
            entropy_sum,
            tokens,
            choices,
        };
        MoeOutput { output, aux, stats }
    }

    /// Expert-choice routing, with each expert's capacity computed from the real tokens alone
    /// (one scalar read back when there is a mask), so padding never changes what real tokens
    /// get.
    fn route_expert_choice(&self, x: Tensor<2>, valid: Option<Tensor<1, Bool>>) -> Routing {
        let [t, _] = x.dims();
        let real = match &valid {
            Some(v) => v.clone().int().sum().into_scalar::<i64>() as usize,
            None => t,
        };
        let (e, k) = (self.router.n_experts(), self.router.config.top_k);
        let c = capacity(self.capacity_factor.unwrap_or(1.0), real, k, e);
        self.router.forward_expert_choice(x, valid, c)
    }

    /// Dispatches a token-choice assignment and combines the expert outputs.
    ///
    /// x: `[T, d_model]`; tokens: real tokens (scalar `[1]`)
    fn token_choice(
        &self,
        x: Tensor<2>,
        assignment: &Assignment,
        valid: Option<Tensor<1, Bool>>,
        tokens: &Tensor<1>,
    ) -> Routed {
        let (plan, output) = self.dispatch(x, assignment, valid);
        Routed {
            output,
            dropped: plan.dropped(),
            requested: tokens.clone().mul_scalar(self.router.config.top_k as f64),
            routed: plan.routed,
            load: plan.load,
        }
    }

    /// Plans a token-choice assignment's dispatch in this layer's layout and runs the experts:
    /// the plan (loads, drops) and the combined output `[T, d_model]`.
    ///
    /// x: `[T, d_model]`; valid: `[T]`, true for real tokens
    fn dispatch(
        &self,
        x: Tensor<2>,
        assignment: &Assignment,
        valid: Option<Tensor<1, Bool>>,
    ) -> (TokenDispatch, Tensor<2>) {
        let Assignment::TokenChoice { experts, weights } = assignment else {
            unreachable!("token-choice routers assign experts to tokens");
        };
        let choice = self.layout_choice(x.device().is_autodiff());
        let plan = TokenDispatch::plan(experts.clone(), valid, self.router.n_experts(), choice);
        let output = plan.apply(&self.experts, x, weights.clone());
        (plan, output)
    }

    /// Runs an expert-choice assignment; padding picked when real tokens run out gets no
    /// weight and no load.
    ///
    /// x: `[T, d_model]`; valid: `[T]` (1 real, 0 padding); tokens: real tokens (scalar `[1]`)
    fn expert_choice(
        &self,
        x: Tensor<2>,
        assignment: &Assignment,
        valid: &Option<Tensor<1>>,
        tokens: &Tensor<1>,
    ) -> Routed {
        let Assignment::ExpertChoice {
            tokens: picks,
            weights,
        } = assignment
        else {
            unreachable!("expert-choice routers assign tokens to experts");
        };
        let [t, _] = x.dims();
        let [e, c] = picks.dims();
        let device = x.device();
        let source = picks.clone().reshape([e * c]);
        let (weights, picked) = match valid {
            Some(v) => {
                let real = v.clone().select(0, source.clone()).reshape([e, c]);
                let padding = real.clone().equal_elem(0.0);
                (weights.clone().mask_fill(padding, 0.0), real)
            }
            None => (weights.clone(), Tensor::ones([e, c], &device)),
        };
        let load = picked.clone().sum_dim(1).reshape([e]); // [E]
        let coverage = Tensor::<1>::zeros([t], &device).select_assign(
            0,
            source,
            picked.reshape([e * c]),
            burn::tensor::IndexingUpdateOp::Add,
        ); // [T] experts per token
        let mut unpicked = coverage.equal_elem(0.0).float();
        if let Some(v) = valid {
            unpicked = unpicked * v.clone();
        }
        Routed {
            output: expert_choice_apply(&self.experts, x, picks.clone(), weights),
            routed: load.clone(),
            load,
            dropped: unpicked.sum(),
            requested: tokens.clone(),
        }
    }

    /// What an empty batch gives: no output rows, zero losses and statistics.
    fn empty_output(&self, x: Tensor<2>) -> MoeOutput<2> {
        let (aux, stats) = self.empty_aux_and_stats(&x.device());
        MoeOutput {
            output: x,
            aux,
            stats,
        }
    }

    /// Zero losses and statistics, for an empty batch.
    fn empty_aux_and_stats(&self, device: &Device) -> (AuxLosses, RoutingStats) {
        let e = self.router.n_experts();
        let zero = || Tensor::<1>::zeros([1], device);
        let aux = AuxLosses {
            balance: zero(),
            z: zero(),
        };
        let stats = RoutingStats {
            load: Tensor::zeros([e], device),
            routed: Tensor::zeros([e], device),
            dropped: zero(),
            requested: zero(),
            entropy_sum: zero(),
            tokens: zero(),
            choices: None,
        };
        (aux, stats)
    }

    /// The token-choice dispatch layout, in training (on an autodiff device) or inference.
    ///
    /// # Panics
    /// For [`ExpertCompute::Segments`] in training: slicing the stacked weights per expert costs a
    /// bank-sized gradient per expert in the backward pass; [`ExpertCompute::Auto`] bounds the
    /// padding there instead.
    pub fn layout_choice(&self, training: bool) -> LayoutChoice {
        if self.experts.is_paged() {
            // A paged bank fetches experts one by one: exact segments, whatever the setting.
            assert!(
                !training && self.capacity_factor.is_none(),
                "a paged expert bank is dropless and inference-only"
            );
            return LayoutChoice::DroplessSegments;
        }
        match (self.capacity_factor, self.compute) {
            (Some(cf), _) => LayoutChoice::Capacity(cf),
            (None, ExpertCompute::Padded) => LayoutChoice::DroplessPadded,
            (None, ExpertCompute::Segments) if training => {
                panic!("{}", ConfigError::SegmentsInTraining)
            }
            (None, ExpertCompute::Segments) => LayoutChoice::DroplessSegments,
            (None, ExpertCompute::Auto) if training => LayoutChoice::DroplessTiered,
            (None, ExpertCompute::Auto) => LayoutChoice::DroplessAuto,
        }
    }

    /// Auxiliary-loss-free balancing (DeepSeek-V3): after an optimizer step, moves each expert's
    /// selection bias by `rate` toward the mean of what the router sent each expert,
    /// `b_i += rate * sign(mean_routed - routed_i)`. Overloaded experts become less likely to be
    /// picked, idle ones more. The rule reads [`RoutingStats::routed`], the router's choices
    /// before any capacity limit: the post-capacity load hides exactly the overload the bias is
    /// there to correct. A no-op for a router without selection bias.
    ///
    /// stats: accumulated since the last update ([`RoutingStats::merge`]).
    pub fn update_selection_bias(&mut self, stats: &RoutingStats, rate: f64) {
        if let Some(bias) = self.router.bias.take() {
            let routed = stats
                .routed
                .clone()
                .detach()
                .to_device(&bias.val().device());
            let delta = (routed.clone().mean() - routed).sign().mul_scalar(rate); // [E]
            self.router.bias = Some(bias.map(|b| (b + delta).detach()));
        }
    }
}

/// What routing and the experts gave, before the shared experts and the losses.
struct Routed {
    /// `[T, d_model]`
    output: Tensor<2>,
    /// Assignments sent to each expert `[E]`.
    routed: Tensor<1>,
    /// Assignments each expert processed `[E]`.
    load: Tensor<1>,
    /// Dropped assignments (token choice) or unpicked real tokens (expert choice), `[1]`.
    dropped: Tensor<1>,
    /// What `dropped` is a share of, `[1]`.
    requested: Tensor<1>,
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
        // Gates with the spread of a Kaiming initialisation (std about 1/sqrt(3 d)), so that
        // tokens differ in their scores and a bias can move them; from the default small gates
        // the skew alone would decide every token.
        let mut layer = MoeLayerConfig::new(d, 8, e)
            .with_router(RouterConfig::deepseek_v3(2).with_init_std(0.15))
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
            let stats = layer.forward_tokens(x.clone(), None).stats;
            layer.update_selection_bias(&stats, 0.01);
        }
        let after = violation(&layer);
        assert!(before > 1.0, "the skew should overload expert 0: {before}");
        assert!(after < 0.5 * before, "max violation {before} -> {after}");
    }

    fn stats(routed: [f32; 3], load: [f32; 3], device: &Device) -> RoutingStats {
        let zero = || Tensor::<1>::zeros([1], device);
        RoutingStats {
            load: Tensor::from_floats(load, device),
            routed: Tensor::from_floats(routed, device),
            dropped: zero(),
            requested: zero(),
            entropy_sum: zero(),
            tokens: zero(),
            choices: None,
        }
    }

    #[test]
    fn bias_update_is_a_no_op_without_a_bias() {
        let device = Device::flex();
        let mut layer = MoeLayerConfig::new(8, 8, 3).init(&device);
        layer.update_selection_bias(&stats([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], &device), 0.1);
        assert!(layer.router.bias.is_none());
    }

    /// Routed (6, 2, 4) against a capacity of 2: the processed load (2, 2, 2) is even and would
    /// leave the bias alone (as it did before the fix), though expert 0 is overloaded.
    #[test]
    fn bias_update_reads_the_routed_load_not_the_capped_one() {
        let device = Device::flex();
        let mut layer = MoeLayerConfig::new(8, 8, 3)
            .with_router(RouterConfig::deepseek_v3(1))
            .init(&device);
        layer.update_selection_bias(&stats([6.0, 2.0, 4.0], [2.0, 2.0, 2.0], &device), 0.1);
        let bias = layer.router.bias.as_ref().expect("selection bias").val();
        crate::testing::assert_close(bias, Tensor::from_floats([-0.1, 0.1, 0.0], &device), 1e-7);
    }

    #[rstest]
    fn an_empty_batch_gives_an_empty_output(#[values("flex", "ndarray", "wgpu")] backend: &str) {
        let Some(device) = test_device(backend) else {
            return;
        };
        for cf in [None, Some(1.0)] {
            let layer = MoeLayerConfig::new(8, 8, 4)
                .with_capacity_factor(cf)
                .init(&device);
            let out = layer.forward(Tensor::zeros([2, 0, 8], &device), None);
            assert_eq!(out.output.dims(), [2, 0, 8]);
            assert_eq!(out.stats.summary().tokens, 0.0);
            let out = layer.forward_tokens(Tensor::zeros([0, 8], &device), None);
            assert_eq!(out.output.dims(), [0, 8]);
        }
    }

    #[test]
    fn segments_are_refused_in_training() {
        let device = Device::flex().autodiff();
        let config = MoeLayerConfig::new(8, 8, 4).with_compute(ExpertCompute::Segments);
        assert_eq!(
            config.try_init(&device).unwrap_err(),
            ConfigError::SegmentsInTraining
        );
        assert!(config.try_init(&Device::flex()).is_ok());
    }

    /// The router entropy is a statistic: it must not keep the router's graph alive.
    #[test]
    fn routing_statistics_are_outside_the_autodiff_graph() {
        let device = Device::flex().autodiff();
        let layer = MoeLayerConfig::new(8, 8, 4).init(&device);
        let x = Tensor::<2>::ones([6, 8], &device);
        let stats = layer.forward_tokens(x, None).stats;
        assert!(!stats.entropy_sum.is_require_grad());
        assert!(!stats.load.is_require_grad());
    }
}
