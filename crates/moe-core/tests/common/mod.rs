//! A naive host-side (f64) reference of the MoE layer: every expert on every token, weighted by
//! the sparse gate. It shares no code with the layer's dispatch, so agreement means something.

#![allow(dead_code)] // each test binary uses part of it

use burn::prelude::*;
use moe_core::testing::values;
use moe_core::{MoeLayer, RouterKind};

/// A dense SwiGLU on the host; weights row-major `[d, f]`, `[d, f]`, `[f, d]`.
pub struct HostFfn {
    pub d: usize,
    pub f: usize,
    pub w_gate: Vec<f64>,
    pub w_up: Vec<f64>,
    pub w_down: Vec<f64>,
}

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

impl HostFfn {
    pub fn forward(&self, x: &[f64]) -> Vec<f64> {
        let (d, f) = (self.d, self.f);
        let mut out = vec![0.0; d];
        for j in 0..f {
            let (mut g, mut u) = (0.0, 0.0);
            for (i, xi) in x.iter().enumerate().take(d) {
                g += xi * self.w_gate[i * f + j];
                u += xi * self.w_up[i * f + j];
            }
            let h = silu(g) * u;
            for (o, out_o) in out.iter_mut().enumerate() {
                *out_o += h * self.w_down[j * d + o];
            }
        }
        out
    }
}

fn f64s<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    values(t).into_iter().map(f64::from).collect()
}

/// The reference layer.
pub struct HostMoe {
    pub d: usize,
    pub e: usize,
    pub k: usize,
    pub kind: RouterKind,
    pub renormalize: bool,
    pub route_scale: f64,
    pub gate: Vec<f64>,
    pub bias: Option<Vec<f64>>,
    pub experts: Vec<HostFfn>,
    pub shared: Option<HostFfn>,
    pub capacity_factor: Option<f64>,
}

/// What the reference decided and computed.
pub struct HostOutput {
    /// `[T * d]`
    pub output: Vec<f64>,
    /// Per token, the (expert, weight) pairs that were processed.
    pub kept: Vec<Vec<(usize, f64)>>,
    /// Per token, the experts chosen (before capacity), in rank order.
    pub chosen: Vec<Vec<usize>>,
    /// Assignments dropped by capacity.
    pub dropped: usize,
    /// Assignments processed per expert.
    pub load: Vec<usize>,
}

impl HostMoe {
    pub fn from_layer(layer: &MoeLayer) -> Self {
        let [e, d, f] = layer.experts.w_gate.shape().dims();
        let per_expert = |w: Tensor<3>| -> Vec<Vec<f64>> {
            (0..e).map(|i| f64s(w.clone().slice(i..i + 1))).collect()
        };
        let (wg, wu, wd) = (
            per_expert(layer.experts.w_gate.val()),
            per_expert(layer.experts.w_up.val()),
            per_expert(layer.experts.w_down.val()),
        );
        let experts = (0..e)
            .map(|i| HostFfn {
                d,
                f,
                w_gate: wg[i].clone(),
                w_up: wu[i].clone(),
                w_down: wd[i].clone(),
            })
            .collect();
        let shared = layer.shared.as_ref().map(|s| {
            let [_, fs] = s.w_gate.weight.shape().dims();
            HostFfn {
                d,
                f: fs,
                w_gate: f64s(s.w_gate.weight.val()),
                w_up: f64s(s.w_up.weight.val()),
                w_down: f64s(s.w_down.weight.val()),
            }
        });
        let cfg = &layer.router.config;
        Self {
            d,
            e,
            k: cfg.top_k,
            kind: cfg.kind,
            renormalize: cfg.renormalize,
            route_scale: cfg.route_scale,
            gate: f64s(layer.router.gate.weight.val()),
            bias: layer.router.bias.as_ref().map(|b| f64s(b.val())),
            experts,
            shared,
            capacity_factor: layer.capacity_factor,
        }
    }

    /// Router logits of one token.
    fn logits(&self, x: &[f64]) -> Vec<f64> {
        (0..self.e)
            .map(|j| (0..self.d).map(|i| x[i] * self.gate[i * self.e + j]).sum())
            .collect()
    }

    /// Selection scores and normalised probabilities of one token.
    pub fn scores(&self, x: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let l = self.logits(x);
        match self.kind {
            RouterKind::Sigmoid => {
                let s: Vec<f64> = l.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
                let sum: f64 = s.iter().sum();
                (s.clone(), s.iter().map(|v| v / sum).collect())
            }
            _ => {
                let m = l.iter().cloned().fold(f64::MIN, f64::max);
                let ex: Vec<f64> = l.iter().map(|v| (v - m).exp()).collect();
                let sum: f64 = ex.iter().sum();
                let p: Vec<f64> = ex.iter().map(|v| v / sum).collect();
                (p.clone(), p)
            }
        }
    }

    pub fn capacity(&self, t: usize) -> usize {
        let cf = self.capacity_factor.unwrap_or(1.0);
        ((cf * (t * self.k) as f64 / self.e as f64).ceil() as usize).clamp(1, t)
    }

    /// x: `[T * d]` row-major.
    pub fn forward(&self, x: &[f64]) -> HostOutput {
        let t = x.len() / self.d;
        let tok = |i: usize| &x[i * self.d..(i + 1) * self.d];
        let mut kept: Vec<Vec<(usize, f64)>> = vec![vec![]; t];
        let mut chosen = vec![vec![]; t];
        let mut load = vec![0usize; self.e];
        let mut dropped = 0;
        if self.kind == RouterKind::ExpertChoice {
            let c = self.capacity(t);
            let probs: Vec<Vec<f64>> = (0..t).map(|i| self.scores(tok(i)).0).collect();
            for (ex, l) in load.iter_mut().enumerate() {
                let mut order: Vec<usize> = (0..t).collect();
                order.sort_by(|a, b| probs[*b][ex].total_cmp(&probs[*a][ex]));
                for &i in &order[..c] {
                    kept[i].push((ex, probs[i][ex]));
                    *l += 1;
                }
            }
            dropped = kept.iter().filter(|k| k.is_empty()).count();
        } else {
            let mut weights = vec![vec![]; t];
            for i in 0..t {
                let (s, _) = self.scores(tok(i));
                let mut order: Vec<usize> = (0..self.e).collect();
                let biased = |j: usize| s[j] + self.bias.as_ref().map_or(0.0, |b| b[j]);
                order.sort_by(|a, b| biased(*b).total_cmp(&biased(*a)));
                let sel = &order[..self.k];
                let mut w: Vec<f64> = sel.iter().map(|&j| s[j]).collect();
                if self.renormalize {
                    let sum: f64 = w.iter().sum();
                    w.iter_mut().for_each(|v| *v /= sum);
                }
                w.iter_mut().for_each(|v| *v *= self.route_scale);
                chosen[i] = sel.to_vec();
                weights[i] = w;
            }
            // k-major priority: every token's first choice before any second choice.
            let cap = self.capacity_factor.map(|_| self.capacity(t));
            for r in 0..self.k {
                for i in 0..t {
                    let ex = chosen[i][r];
                    if cap.is_some_and(|c| load[ex] >= c) {
                        dropped += 1;
                    } else {
                        load[ex] += 1;
                        kept[i].push((ex, weights[i][r]));
                    }
                }
            }
        }
        let mut output = vec![0.0; t * self.d];
        for i in 0..t {
            let out = &mut output[i * self.d..(i + 1) * self.d];
            for &(ex, w) in &kept[i] {
                for (o, y) in out.iter_mut().zip(self.experts[ex].forward(tok(i))) {
                    *o += w * y;
                }
            }
            if let Some(s) = &self.shared {
                for (o, y) in out.iter_mut().zip(s.forward(tok(i))) {
                    *o += y;
                }
            }
        }
        HostOutput {
            output,
            kept,
            chosen,
            dropped,
            load,
        }
    }
}

/// Random input `[T, d]` from a seed, plus its host copy.
pub fn random_input(t: usize, d: usize, seed: u64, device: &Device) -> (Tensor<2>, Vec<f64>) {
    // A small LCG keeps inputs identical on every backend.
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let host: Vec<f64> = (0..t * d)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64) * 2.0 - 1.0
        })
        .collect();
    let data: Vec<f32> = host.iter().map(|v| *v as f32).collect();
    let x = Tensor::<1>::from_floats(data.as_slice(), device).reshape([t, d]);
    // Round-trip through f32 so the reference sees exactly what the layer sees.
    let host = data.iter().map(|v| f64::from(*v)).collect();
    (x, host)
}
