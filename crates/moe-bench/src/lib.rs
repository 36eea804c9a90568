//! # moe-bench
//!
//! Measured speed of MoE layers against dense feed-forward blocks on one backend: the cases
//! behind `moe bench` and the criterion benches (`benches/moe.rs`), the MoE / dense ratios the
//! project's targets are stated in, and a breakdown of where an MoE layer's forward time goes.
//!
//! Every timed call ends by reading one scalar back from the device, so asynchronous backends
//! (wgpu) are timed to completion; inputs are drawn fresh, outside the timer, for every call.
//!
//! ```no_run
//! use burn::prelude::*;
//! use moe_bench::{BenchBudget, BenchSizes, run};
//!
//! let sizes = BenchSizes { tokens: 512, ..BenchSizes::default() };
//! let report = run(&Device::flex(), "flex", &sizes, &BenchBudget::quick())?;
//! println!("plain matmul: {:.1} GFLOP/s", report.matmul_gflops);
//! for case in &report.cases {
//!     println!("{:<28} {:>10.0} tokens/s", case.name, case.tokens_per_s);
//! }
//! for (ratio, value) in &report.ratios {
//!     println!("{ratio}: {value:.2}");
//! }
//! # Ok::<(), String>(())
//! ```
//!
//! Modules, each importing only those before it: [`sizes`] (what is measured), [`timing`]
//! (how long, the median, the matmul baseline), [`case`] (one case), [`suite`] (the cases and
//! ratios of a run), [`breakdown`](mod@breakdown) (an MoE layer's stages), [`report`] (a whole run),
//! [`decode`] (a whole model's prefill and decode), [`compare`] (backends side by side).
#![warn(missing_docs)]

pub mod breakdown;
pub mod case;
pub mod compare;
pub mod decode;
pub mod report;
pub mod sizes;
pub mod suite;
pub mod timing;

pub use breakdown::{Breakdown, breakdown};
pub use case::{BenchCase, BenchInput, dense_case, model_case, moe_case};
pub use compare::{BackendRun, Comparison};
pub use decode::{DecodeCase, decode_model, decode_speed};
pub use report::{BenchReport, CaseResult, FailedCase, run, run_selected};
pub use sizes::BenchSizes;
pub use suite::{RATIOS, case_names, cases, selected_cases};
pub use timing::{BenchBudget, Read, matmul_gflops, measure};
