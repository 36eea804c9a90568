//! Drop the MoE layer into your own Burn code.
//!
//! ```text
//! cargo run --release --example moe_layer -- [flex|ndarray|wgpu|wgpu:cpu]
//! ```
//!
//! Builds a Mixtral-style layer (8 experts, top-2, one shared expert), runs a batch through it on
//! the chosen backend, and prints the output shape, the routing statistics and what the sparsity
//! buys in parameters and FLOPs.

use burn::prelude::*;
use burn::tensor::Distribution;
use moe::moe_core::{MoeLayerConfig, RouterConfig, WeightDType, parse_device};

fn main() {
    let name = std::env::args().nth(1).unwrap_or_else(|| "flex".into());
    let device = match parse_device(&name) {
        Ok(device) => device,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };

    // Your model's FFN slot: d_model 256, experts of width 512.
    let config = MoeLayerConfig::new(256, 512, 8)
        .with_router(RouterConfig::mixtral())
        .with_n_shared_experts(1);
    let layer = config.init(&device);

    let x = Tensor::<3>::random([4, 128, 256], Distribution::Normal(0.0, 1.0), &device);
    let out = layer.forward(x, None);
    // In training, add the auxiliary losses to the language-model loss:
    let aux = out.aux.balance.clone().mul_scalar(0.01) + out.aux.z.clone().mul_scalar(0.001);

    println!("device          {name}");
    println!("output shape    {:?}", out.output.dims());
    println!("aux loss        {:.5}", aux.into_scalar::<f32>());
    let s = out.stats.summary();
    let shares: Vec<String> = s.load_share.iter().map(|p| format!("{:.3}", p)).collect();
    println!("expert shares   [{}]", shares.join(", "));
    println!(
        "router entropy  {:.3} nats (uniform: {:.3})",
        s.entropy,
        (8f64).ln()
    );
    println!(
        "max violation   {:.3}   load CV {:.3}   dropped {}",
        s.max_violation, s.load_cv, s.dropped
    );

    let acc = config.accounting();
    println!("total params    {}", acc.total_params);
    println!(
        "active params   {} per token ({:.2}x fewer)",
        acc.active_params,
        acc.sparsity_ratio()
    );
    println!("FLOPs / token   {}", acc.flops_per_token);
    for dtype in WeightDType::ALL {
        println!(
            "weights {dtype:<5}   {:.2} MiB (experts alone {:.2} MiB)",
            acc.weight_bytes(dtype) as f64 / (1 << 20) as f64,
            acc.expert_bytes(dtype) as f64 / (1 << 20) as f64
        );
    }
}
