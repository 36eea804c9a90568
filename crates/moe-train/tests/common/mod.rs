//! Tiny models and training configs shared by the training tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burn::prelude::*;
use moe_core::{MoeLayerConfig, RouterConfig};
use moe_model::ModelConfig;
use moe_train::{ByteTokenizer, Corpus, Progress, RunDir, Start, TrainConfig, TrainJob};

pub fn tiny_model(router: RouterConfig) -> ModelConfig {
    ModelConfig::new()
        .with_vocab_size(258)
        .with_d_model(32)
        .with_n_layers(2)
        .with_n_heads(2)
        .with_n_kv_heads(1)
        .with_max_seq_len(32)
        .with_moe(MoeLayerConfig::new(32, 32, 4).with_router(router))
}

pub fn tiny_train(steps: usize) -> TrainConfig {
    TrainConfig::new()
        .with_steps(steps)
        .with_batch_size(8)
        .with_seq_len(32)
        .with_warmup_steps(5)
        .with_eval_every(10)
        .with_eval_windows(2)
        .with_checkpoint_every(10)
        .with_corpus_bytes(20_000)
}

pub fn job<'a>(
    config: TrainConfig,
    start: Start,
    corpus: &'a Corpus,
    run: RunDir,
    device: &Device,
) -> TrainJob<'a> {
    TrainJob {
        config,
        start,
        corpus,
        data_source: "builtin".into(),
        tokenizer: &ByteTokenizer,
        run,
        devices: vec![device.clone()],
        progress: Progress::Hidden,
        stop: Arc::new(AtomicBool::new(false)),
        stop_after: None,
    }
}
