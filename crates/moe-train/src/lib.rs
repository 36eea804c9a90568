//! # moe-train
//!
//! Data, training loops and evaluation for `moe` models: a byte-level tokenizer and Hugging Face
//! tokenizers (with chat templates) behind a [`Tokenizer`] trait, a built-in four-domain corpus (code, arithmetic, English, Spanish) and
//! user corpora, the joint training loop with balancing losses or bias updates, exact resume,
//! branch training and merging (Branch-Train-MiX), evaluation with per-domain losses and
//! domain x expert routing tables, and SVG reports.
//!
//! ```no_run
//! use moe_train::{ByteTokenizer, Corpus, TrainConfig};
//!
//! let corpus = Corpus::builtin(42, 100_000, &ByteTokenizer);
//! let config = TrainConfig::new().with_steps(50);
//! assert_eq!(corpus.names(), ["code", "arithmetic", "english", "spanish"]);
//! # let _ = config;
//! ```
//!
//! ## Module layers
//!
//! The modules form layers; each imports only modules below it, never one above:
//!
//! `error` < `config` < `chat` < `tokenizer` < `hf_tokenizer` < `corpus` < `data` < `run` < `objective` < `routing` <
//! `eval` < `merge_info` < `parallel` < `train` < `branch` < `report`
//!
//! (`chat`: chat templates; `hf_tokenizer`: Hugging Face tokenizers; `objective`: the losses; `routing`: routing statistics over passes; `merge_info`: the
//! record of a merged model's experts.) `grep -rn 'use crate::' src` lists the edges.
#![warn(missing_docs)]

pub mod branch;
pub mod btm;
pub mod chat;
pub mod compare;
pub mod config;
pub mod corpus;
pub mod data;
pub mod error;
pub mod eval;
pub mod hf_tokenizer;
pub mod interval;
pub mod merge_info;
pub mod objective;
pub mod parallel;
pub mod report;
pub mod router_init;
pub mod routing;
pub mod run;
pub mod tokenizer;
pub mod trace;
pub mod train;

pub use config::{TrainConfig, TrainPart};
pub use data::Corpus;
pub use error::{DataError, Result};
pub use eval::{EvalReport, evaluate};
pub use hf_tokenizer::HfTokenizer;
pub use run::RunDir;
pub use tokenizer::{ByteTokenizer, Tokenizer};
pub use train::{Progress, Start, TrainJob, TrainOutcome, train};
