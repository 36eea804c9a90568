//! Parameter, FLOP and memory accounting: what sparsity buys and what it costs.

use std::fmt;
use std::ops::Add;

/// A floating-point storage type for weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WeightDType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// 16-bit brain float.
    BF16,
}

impl WeightDType {
    /// Every type, in the order reports list them.
    pub const ALL: [Self; 3] = [Self::F32, Self::F16, Self::BF16];

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

impl fmt::Display for WeightDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        })
    }
}

/// Parameters and compute of a layer or a whole model.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Accounting {
    /// Every stored parameter.
    pub total_params: usize,
    /// Parameters one token uses on average (the k active experts, shared experts, router).
    pub active_params: usize,
    /// Parameters of the routed experts alone (the memory sparsity adds).
    pub expert_params: usize,
    /// Forward FLOPs per token of the matmuls: 2 x the active matmul parameters (one multiply and
    /// one add each). Attention's sequence-dependent FLOPs are not included.
    pub flops_per_token: usize,
}

impl Accounting {
    /// Bytes of all weights in the given type.
    pub fn weight_bytes(&self, dtype: WeightDType) -> usize {
        self.total_params * dtype.bytes()
    }

    /// Bytes of the routed experts alone in the given type.
    pub fn expert_bytes(&self, dtype: WeightDType) -> usize {
        self.expert_params * dtype.bytes()
    }

    /// total / active: how many times more parameters than a token pays for.
    pub fn sparsity_ratio(&self) -> f64 {
        self.total_params as f64 / self.active_params.max(1) as f64
    }
}

impl Add for Accounting {
    type Output = Self;

    fn add(self, o: Self) -> Self {
        Self {
            total_params: self.total_params + o.total_params,
            active_params: self.active_params + o.active_params,
            expert_params: self.expert_params + o.expert_params,
            flops_per_token: self.flops_per_token + o.flops_per_token,
        }
    }
}

impl std::iter::Sum for Accounting {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), Add::add)
    }
}
