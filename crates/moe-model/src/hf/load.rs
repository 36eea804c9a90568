//! Loading the parts every family names alike (linears, norms, attention, dense MLPs) and expert
//! banks in either layout, with Hugging Face's `[out, in]` linears transposed to our `[in, out]`.

use burn::module::Param;
use burn::nn::{Linear, RmsNorm};
use burn::prelude::*;
use moe_core::{Experts, MoeLayer, SwiGluFfn};

use super::HfTensors;
use crate::block::{Block, Ffn};
use crate::error::Result;

/// The MoE layer of an MoE block.
pub(super) fn moe_of(block: &mut Block) -> &mut MoeLayer {
    match &mut block.ffn {
        Ffn::Moe(moe) => moe,
        Ffn::Dense(_) => unreachable!("load_moe is called on MoE blocks only"),
    }
}

/// The MoE block of OLMoE and the Qwen families: router `mlp.gate`, experts
/// `mlp.experts.N.{gate,up,down}_proj` or transformers 5's fused `mlp.experts.gate_up_proj` /
/// `down_proj`.
pub(super) fn load_qwen_style_moe(
    st: &mut HfTensors,
    prefix: &str,
    block: &mut Block,
) -> Result<()> {
    let m = format!("{prefix}.mlp");
    let experts = format!("{m}.experts");
    let layout = if st.has(&format!("{experts}.gate_up_proj")) {
        ExpertLayout::Stacked {
            gate_up: "gate_up_proj",
            down: "down_proj",
        }
    } else {
        ExpertLayout::PerExpert {
            gate: "gate_proj",
            up: "up_proj",
            down: "down_proj",
        }
    };
    st.load_moe(&format!("{m}.gate"), &experts, layout, moe_of(block))
}

/// Where a family stores its routed experts.
pub(super) enum ExpertLayout<'a> {
    /// One linear `[out, in]` per expert and projection:
    /// `{experts}.{j}.{gate|up|down}.weight`.
    PerExpert {
        gate: &'a str,
        up: &'a str,
        down: &'a str,
    },
    /// Stacked: `gate_up` `[E, 2F, D]` (the gate's rows first), `down` `[E, D, F]`.
    Stacked { gate_up: &'a str, down: &'a str },
}

impl HfTensors {
    /// A tensor of any rank on `device`, in the import's dtype, checked against `shape`.
    pub(super) fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>> {
        let data = self.data(name, &shape)?;
        Ok(Tensor::from_data(data, (device, self.dtype())))
    }

    /// A Hugging Face linear `[out, in]` as our `[in, out]`.
    fn linear(
        &mut self,
        name: &str,
        d_in: usize,
        d_out: usize,
        device: &Device,
    ) -> Result<Param<Tensor<2>>> {
        Ok(Param::from_tensor(
            self.tensor(name, [d_out, d_in], device)?.transpose(),
        ))
    }

    fn vector(&mut self, name: &str, n: usize, device: &Device) -> Result<Param<Tensor<1>>> {
        Ok(Param::from_tensor(self.tensor(name, [n], device)?))
    }

    /// `{prefix}.weight` (and `{prefix}.bias` where the layer has one) into a linear layer of
    /// the expected shape.
    pub(super) fn load_linear(&mut self, prefix: &str, linear: &mut Linear) -> Result<()> {
        let [d_in, d_out] = linear.weight.lazy_shape().dims();
        let device = linear.weight.lazy_device();
        linear.weight = self.linear(&format!("{prefix}.weight"), d_in, d_out, &device)?;
        if let Some(bias) = &mut linear.bias {
            *bias = self.vector(&format!("{prefix}.bias"), d_out, &device)?;
        }
        Ok(())
    }

    pub(super) fn load_norm(&mut self, prefix: &str, norm: &mut RmsNorm) -> Result<()> {
        let [n] = norm.gamma.lazy_shape().dims();
        let device = norm.gamma.lazy_device();
        norm.gamma = self.vector(&format!("{prefix}.weight"), n, &device)?;
        Ok(())
    }

    /// `{prefix}.{gate,up,down}_proj`.
    pub(super) fn load_swiglu(&mut self, prefix: &str, ffn: &mut SwiGluFfn) -> Result<()> {
        self.load_linear(&format!("{prefix}.gate_proj"), &mut ffn.w_gate)?;
        self.load_linear(&format!("{prefix}.up_proj"), &mut ffn.w_up)?;
        self.load_linear(&format!("{prefix}.down_proj"), &mut ffn.w_down)
    }

    /// `{prefix}.{q,k,v,o}_proj` and, where the config has them, `{prefix}.{q,k}_norm`.
    pub(super) fn load_attention(&mut self, prefix: &str, block: &mut Block) -> Result<()> {
        let attn = &mut block.attn;
        self.load_linear(&format!("{prefix}.q_proj"), &mut attn.q_proj)?;
        self.load_linear(&format!("{prefix}.k_proj"), &mut attn.k_proj)?;
        self.load_linear(&format!("{prefix}.v_proj"), &mut attn.v_proj)?;
        self.load_linear(&format!("{prefix}.o_proj"), &mut attn.o_proj)?;
        if let Some(norm) = &mut attn.q_norm {
            self.load_norm(&format!("{prefix}.q_norm"), norm)?;
        }
        if let Some(norm) = &mut attn.k_norm {
            self.load_norm(&format!("{prefix}.k_norm"), norm)?;
        }
        Ok(())
    }

    /// The router `{gate}.weight` `[E, D]` and the expert bank under `experts`.
    pub(super) fn load_moe(
        &mut self,
        gate: &str,
        experts: &str,
        layout: ExpertLayout,
        moe: &mut MoeLayer,
    ) -> Result<()> {
        self.load_linear(gate, &mut moe.router.gate)?;
        self.load_experts(experts, layout, &mut moe.experts)
    }

    pub(super) fn load_experts(
        &mut self,
        prefix: &str,
        layout: ExpertLayout,
        experts: &mut Experts,
    ) -> Result<()> {
        let [e, d, f] = experts.w_gate.lazy_shape().dims();
        let device = experts.w_gate.lazy_device();
        match layout {
            ExpertLayout::PerExpert { gate, up, down } => {
                // gate and up are [f, d]: transposed to [d, f]; down is [d, f] -> [f, d].
                let mut bank = |w: &str, rows: usize, cols: usize| -> Result<Param<Tensor<3>>> {
                    let experts = (0..e)
                        .map(|j| {
                            let name = format!("{prefix}.{j}.{w}.weight");
                            Ok(self
                                .tensor(&name, [rows, cols], &device)?
                                .transpose()
                                .unsqueeze_dim(0))
                        })
                        .collect::<Result<Vec<Tensor<3>>>>()?;
                    Ok(Param::from_tensor(Tensor::cat(experts, 0)))
                };
                experts.w_gate = bank(gate, f, d)?;
                experts.w_up = bank(up, f, d)?;
                experts.w_down = bank(down, d, f)?;
            }
            ExpertLayout::Stacked { gate_up, down } => {
                let gate_up =
                    self.tensor(&format!("{prefix}.{gate_up}"), [e, 2 * f, d], &device)?;
                let down = self.tensor(&format!("{prefix}.{down}"), [e, d, f], &device)?;
                let half = |rows: std::ops::Range<usize>| {
                    Param::from_tensor(gate_up.clone().slice([0..e, rows, 0..d]).swap_dims(1, 2))
                };
                experts.w_gate = half(0..f);
                experts.w_up = half(f..2 * f);
                experts.w_down = Param::from_tensor(down.swap_dims(1, 2));
            }
        }
        Ok(())
    }
}
