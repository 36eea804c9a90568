//! Property-based fuzzing of the loaders: random and mutated bytes in a config or a weights file
//! give an error (or, for harmless mutations, a model), never a panic.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::OnceLock;

use burn::prelude::*;
use moe_core::MoeLayerConfig;
use moe_model::ModelConfig;
use moe_model::checkpoint::{self, CONFIG_FILE, WEIGHTS_FILE};
use proptest::prelude::*;

fn tiny() -> ModelConfig {
    ModelConfig::new()
        .with_vocab_size(16)
        .with_d_model(8)
        .with_n_layers(1)
        .with_n_heads(2)
        .with_n_kv_heads(1)
        .with_d_ff(8)
        .with_max_seq_len(8)
        .with_moe(MoeLayerConfig::new(8, 4, 2))
}

/// A valid checkpoint, written once per test binary.
fn original() -> &'static (tempfile::TempDir, Vec<u8>, String) {
    static ORIGINAL: OnceLock<(tempfile::TempDir, Vec<u8>, String)> = OnceLock::new();
    ORIGINAL.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        let model = tiny().init(&Device::flex()).unwrap();
        checkpoint::save(&dir, &model, None, false).unwrap();
        let weights = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        let config = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
        (tmp, weights, config)
    })
}

/// Writes a checkpoint directory with the given config text and weight bytes.
fn write_checkpoint(config: &[u8], weights: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join(CONFIG_FILE), config).unwrap();
    std::fs::write(dir.join(WEIGHTS_FILE), weights).unwrap();
    (tmp, dir)
}

/// How a load ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// A model (a mutation inside tensor data is harmless to the format).
    Loaded,
    /// A one-line error.
    Refused,
    /// A panic, or an error message over several lines: a defect.
    Defect(String),
}

fn load(dir: &std::path::Path) -> Outcome {
    match catch_unwind(AssertUnwindSafe(|| checkpoint::load(dir, &Device::flex()))) {
        Err(_) => Outcome::Defect("checkpoint::load panicked".into()),
        Ok(Ok(_)) => Outcome::Loaded,
        Ok(Err(e)) if e.to_string().contains('\n') => Outcome::Defect(format!("{e}")),
        Ok(Err(_)) => Outcome::Refused,
    }
}

/// A mutation of a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, xor: u8 },
    Truncate { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let n = bytes.len().max(1);
        match m {
            Mutation::Flip { at, xor } => {
                if !bytes.is_empty() {
                    bytes[at % n] ^= xor;
                }
            }
            Mutation::Truncate { at } => bytes.truncate(at % n),
            Mutation::Insert { at, bytes: b } => {
                let at = at % n;
                bytes.splice(at..at, b.iter().copied());
            }
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn mutated_weights_never_panic(mutations in prop::collection::vec(mutation(), 1..4)) {
        let (_, weights, config) = original();
        let (_tmp, dir) = write_checkpoint(config.as_bytes(), &mutate(weights.clone(), &mutations));
        let outcome = load(&dir);
        prop_assert!(!matches!(outcome, Outcome::Defect(_)), "{:?}", outcome);
    }

    /// A valid weights file cut anywhere and continued with random bytes: the loader reads
    /// the real header up to the cut, so every stage of parsing gets reached.
    #[test]
    fn a_valid_prefix_then_random_bytes_never_panics(
        cut in any::<prop::sample::Index>(),
        tail in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let (_, weights, config) = original();
        let mut bytes = weights[..cut.index(weights.len())].to_vec();
        bytes.extend(tail);
        let (_tmp, dir) = write_checkpoint(config.as_bytes(), &bytes);
        let outcome = load(&dir);
        prop_assert!(!matches!(outcome, Outcome::Defect(_)), "{:?}", outcome);
    }

    #[test]
    fn mutated_configs_never_panic(mutations in prop::collection::vec(mutation(), 1..4)) {
        let (_, weights, config) = original();
        let text = mutate(config.clone().into_bytes(), &mutations);
        let (_tmp, dir) = write_checkpoint(&text, weights);
        let parsed = catch_unwind(|| ModelConfig::load_json(&dir.join(CONFIG_FILE)));
        prop_assert!(parsed.is_ok(), "load_json panicked");
        if let Ok(Ok(c)) = parsed {
            prop_assert!(c.validate().is_ok(), "a loaded config is valid");
        }
    }

    /// Well-formed configs with random sizes (zeros and mismatches included) reach validation
    /// and model building: each is refused with one line or builds, never panics.
    #[test]
    fn random_config_values_are_refused_or_built(
        sizes in prop::collection::vec(0usize..7, 7),
        experts in 0usize..5,
        top_k in 0usize..4,
    ) {
        let [vocab, d, layers, heads, kv_heads, ff, seq] = sizes[..] else { unreachable!() };
        let config = ModelConfig::new()
            .with_vocab_size(vocab)
            .with_d_model(2 * d)
            .with_n_layers(layers)
            .with_n_heads(heads)
            .with_n_kv_heads(kv_heads)
            .with_d_ff(ff)
            .with_max_seq_len(seq)
            .with_moe(MoeLayerConfig::new(2 * d, ff, experts)
                .with_router(moe_core::RouterConfig::mixtral().with_top_k(top_k)));
        let json = serde_json::to_vec(&config).unwrap();
        let (_tmp, dir) = write_checkpoint(&json, &[]);
        let outcome = catch_unwind(|| {
            ModelConfig::load_json(&dir.join(CONFIG_FILE))
                .and_then(|c| c.init(&Device::flex()).map(|_| ()))
        });
        match outcome {
            Err(_) => prop_assert!(false, "panicked on {:?}", config),
            Ok(Err(e)) => {
                prop_assert!(!e.to_string().contains('\n'), "{}", e);
                prop_assert!(config.validate().is_err(), "valid config refused: {}", e);
            }
            Ok(Ok(())) => prop_assert!(config.validate().is_ok()),
        }
    }
}
