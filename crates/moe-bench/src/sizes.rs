//! The layer sizes the benchmark measures.

/// Layer sizes of the benchmark. The defaults are the ones the targets are stated for.
#[derive(Debug, Clone, Copy)]
pub struct BenchSizes {
    /// Tokens per call. Default 2048.
    pub tokens: usize,
    /// Model width. Default 512.
    pub d_model: usize,
    /// Experts of the routing-overhead cases. Default 8.
    pub experts: usize,
    /// Expert width of those cases (top-2: twice this is the dense width). Default 1024.
    pub expert_d_ff: usize,
    /// Experts of the fine-grained case. Default 64.
    pub fine_experts: usize,
    /// Expert width of the fine-grained case. Default 512.
    pub fine_d_ff: usize,
}

impl Default for BenchSizes {
    fn default() -> Self {
        Self {
            tokens: 2048,
            d_model: 512,
            experts: 8,
            expert_d_ff: 1024,
            fine_experts: 64,
            fine_d_ff: 512,
        }
    }
}
