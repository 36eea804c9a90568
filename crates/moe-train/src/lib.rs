//! # moe-train
//!
//! Data, training loops and evaluation for `moe` models: a byte-level tokenizer and Hugging Face
//! tokenizers (with chat templates) behind a [`Tokenizer`] trait, a built-in four-domain corpus (code, arithmetic, English, Spanish) and
//! user corpora, the joint training loop with balancing losses or bias updates, exact resume,
//! branch training and merging (Branch-Train-MiX), evaluation with per-domain losses and
//! domain x expert routing tables, SVG reports, and the MoE-vs-dense benchmark cases.
//!
//! ```no_run
//! use moe_train::{ByteTokenizer, Corpus, TrainConfig};
//!
//! let corpus = Corpus::builtin(42, 100_000, &ByteTokenizer);
//! let config = TrainConfig::new().with_steps(50);
//! assert_eq!(corpus.names(), ["code", "arithmetic", "english", "spanish"]);
//! # let _ = config;
//! ```
#![warn(missing_docs)]

pub mod bench;
pub mod branch;
pub mod chat;
pub mod config;
pub mod corpus;
pub mod data;
pub mod error;
pub mod eval;
pub mod hf_tokenizer;
pub mod parallel;
pub mod report;
pub mod run;
pub mod tokenizer;
pub mod train;

pub use config::{TrainConfig, TrainPart};
pub use data::Corpus;
pub use error::{DataError, Result};
pub use eval::{EvalReport, evaluate};
pub use hf_tokenizer::HfTokenizer;
pub use run::RunDir;
pub use tokenizer::{ByteTokenizer, Tokenizer};
pub use train::{Progress, Start, TrainJob, TrainOutcome, train};
