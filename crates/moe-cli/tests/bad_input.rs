//! Every kind of bad input, given to the built `moe` binary: a non-zero exit, one line naming the
//! input and the problem, no panic, and nothing on disk changed.
//!
//! With `MOE_RELIABILITY_TABLE=FILE` the test also writes the table of docs/reliability.md
//! (input, command, what the user sees) from what the binary actually printed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every file under `root` with its contents, to prove a refused command changed nothing.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.insert(path.clone(), Vec::new());
                stack.push(path);
            } else {
                out.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

struct Fixture {
    root: tempfile::TempDir,
}

impl Fixture {
    /// A workspace with a tiny trained run, its checkpoint and assorted damaged inputs.
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let f = Self { root };
        f.write(
            "model.json",
            r#"{"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64,
                "max_seq_len": 32, "moe": {"d_model": 32, "d_ff": 32, "n_experts": 4}}"#,
        );
        let o = f.moe(&[
            "train",
            "--steps",
            "2",
            "--out",
            "run",
            "--model-config",
            "model.json",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--quiet",
        ]);
        assert!(o.0 == 0, "fixture training failed: {}", o.1);
        let ckpt = std::fs::read_to_string(f.path("run/latest")).unwrap();
        let ckpt = f.path("run").join(ckpt.trim());
        copy_dir(&ckpt, &f.path("ckpt"));
        for (name, damage) in [
            ("truncated", Damage::Truncate),
            ("empty-weights", Damage::Empty),
            ("foreign", Damage::Foreign),
        ] {
            copy_dir(&ckpt, &f.path(name));
            let w = f.path(name).join("model.bpk");
            let bytes = std::fs::read(&w).unwrap();
            let new = match damage {
                Damage::Truncate => bytes[..bytes.len() / 2].to_vec(),
                Damage::Empty => Vec::new(),
                Damage::Foreign => b"PK\x03\x04 this is a zip file, not burnpack".repeat(50),
            };
            std::fs::write(w, new).unwrap();
        }
        f.write("prompts-gap.txt", "hello\n\nthere\n");
        f.write("prompts.txt", "hello\nthere\n");
        std::fs::create_dir_all(f.path("empty-corpus")).unwrap();
        std::fs::create_dir_all(f.path("binary-corpus")).unwrap();
        std::fs::write(f.path("binary-corpus/blob.txt"), [0u8, 159, 146, 150, 0, 1]).unwrap();
        std::fs::create_dir_all(f.path("llama")).unwrap();
        f.write(
            "llama/config.json",
            r#"{"model_type": "llama", "hidden_size": 64}"#,
        );
        // A model whose vocabulary is smaller than the byte tokenizer's (no tokenizer.json).
        let small_vocab = moe_model::ModelConfig::new()
            .with_vocab_size(64)
            .with_d_model(32)
            .with_n_layers(1)
            .with_n_heads(2)
            .with_n_kv_heads(1)
            .with_d_ff(64)
            .with_max_seq_len(32)
            .with_ffn_plan(moe_model::FfnPlan::AllDense)
            .init_seeded(&burn::tensor::Device::flex(), 1)
            .unwrap();
        moe_model::checkpoint::save(&f.path("small-vocab"), &small_vocab, None, false).unwrap();
        // Two dense models with no training record (so no domain): branches to merge.
        let dense = small_vocab.config.clone().with_vocab_size(258);
        for (name, seed) in [("dense-a", 2), ("dense-b", 3)] {
            let m = dense
                .init_seeded(&burn::tensor::Device::flex(), seed)
                .unwrap();
            moe_model::checkpoint::save(&f.path(name), &m, None, false).unwrap();
        }
        // A Hugging Face directory whose index sends a shard outside it.
        std::fs::create_dir_all(f.path("escape")).unwrap();
        f.write(
            "escape/config.json",
            r#"{"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32,
                "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                "num_key_value_heads": 1, "num_local_experts": 2, "num_experts_per_tok": 1,
                "max_position_embeddings": 32}"#,
        );
        f.write(
            "escape/model.safetensors.index.json",
            r#"{"weight_map": {"model.embed_tokens.weight": "../ckpt/model.bpk"}}"#,
        );
        f.damaged_hf_dirs();
        f.write("not-json.json", "steps: 10");
        f.write("truncated.json", r#"{"steps": 10, "lr": 0.0"#);
        f.write("list.json", "[1, 2, 3]");
        f.write(
            "k-over-e.json",
            r#"{"moe": {"n_experts": 2, "router": {"top_k": 3}}}"#,
        );
        f.write("zero-experts.json", r#"{"moe": {"n_experts": 0}}"#);
        f.write(
            "heads.json",
            r#"{"d_model": 100, "n_heads": 3, "n_kv_heads": 1}"#,
        );
        f.write("capacity.json", r#"{"moe": {"capacity_factor": 0.0}}"#);
        f.write("negative-lr.json", r#"{"lr": -0.001}"#);
        f.write("negative-aux.json", r#"{"aux_loss_coef": -1.0}"#);
        f.write("zero-router-lr.json", r#"{"router_lr_scale": 0.0}"#);
        f.write("wrong-type.json", r#"{"steps": "many"}"#);
        f
    }

    /// Copies of a small Hugging Face Mixtral directory, each damaged one way: a shard the
    /// index names is missing, a weight stored as integers, a config setting not implemented.
    fn damaged_hf_dirs(&self) {
        let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-mixtral-eos");
        for name in ["hf-missing-shard", "hf-int-weights", "hf-sliding-window"] {
            copy_dir(&good, &self.path(name));
        }
        // Every tensor in model.safetensors, but the index puts one in a second shard.
        let weights = std::fs::read(good.join("model.safetensors")).unwrap();
        let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&weights[8..8 + header_len]).unwrap();
        let header: serde_json::Value = serde_json::from_str(header).unwrap();
        let mut map = serde_json::Map::new();
        for name in header.as_object().unwrap().keys() {
            if name != "__metadata__" {
                map.insert(name.clone(), "model.safetensors".into());
            }
        }
        map.insert(
            "model.norm.weight".into(),
            "model-00002-of-00002.safetensors".into(),
        );
        self.write(
            "hf-missing-shard/model.safetensors.index.json",
            &serde_json::json!({ "weight_map": map }).to_string(),
        );
        // The same header length with one F32 weight relabelled I32.
        let text = std::str::from_utf8(&weights[8..8 + header_len]).unwrap();
        let at = text.find(r#""model.norm.weight":{"dtype":"F32""#).unwrap();
        let relabelled = format!(
            "{}{}",
            &text[..at],
            text[at..].replacen(r#""dtype":"F32""#, r#""dtype":"I32""#, 1)
        );
        let mut ints = weights[..8].to_vec();
        ints.extend_from_slice(relabelled.as_bytes());
        ints.extend_from_slice(&weights[8 + header_len..]);
        std::fs::write(self.path("hf-int-weights/model.safetensors"), ints).unwrap();
        let config = self.path("hf-sliding-window/config.json");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        json["sliding_window"] = 4.into();
        std::fs::write(config, json.to_string()).unwrap();
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    fn write(&self, rel: &str, text: &str) {
        std::fs::write(self.path(rel), text).unwrap();
    }

    /// Runs `moe` in the fixture directory; (exit code, stderr).
    fn moe(&self, args: &[&str]) -> (i32, String) {
        let o = Command::new(env!("CARGO_BIN_EXE_moe"))
            .args(args)
            .current_dir(self.root.path())
            .output()
            .expect("run moe");
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }
}

enum Damage {
    Truncate,
    Empty,
    Foreign,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// (what is wrong, command line, a phrase the message must contain)
const CASES: &[(&str, &str, &str)] = &[
    (
        "missing checkpoint",
        "generate nope --prompt hi",
        "nope: No such file",
    ),
    (
        "a file where a checkpoint directory is expected",
        "generate model.json --prompt hi",
        "is a file, expected a checkpoint directory",
    ),
    (
        "a directory where a file is expected",
        "train --config llama --out r",
        "llama: Is a directory",
    ),
    (
        "missing config file",
        "train --config nope.json --out r",
        "nope.json: No such file",
    ),
    (
        "malformed JSON config",
        "train --config not-json.json --out r",
        "not-json.json: malformed JSON",
    ),
    (
        "truncated JSON config",
        "train --config truncated.json --out r",
        "truncated.json: malformed JSON",
    ),
    (
        "JSON that is not an object",
        "train --model-config list.json --out r",
        "expected a JSON object",
    ),
    (
        "a field of the wrong type",
        "train --config wrong-type.json --out r",
        "wrong-type.json: invalid config",
    ),
    (
        "top_k larger than the number of experts",
        "train --model-config k-over-e.json --out r",
        "top_k (3) must be between 1 and n_experts (2)",
    ),
    (
        "zero experts",
        "train --model-config zero-experts.json --out r",
        "n_experts must be at least 1",
    ),
    (
        "d_model not divisible by the heads",
        "train --model-config heads.json --out r",
        "d_model (100) must be divisible by n_heads (3)",
    ),
    (
        "capacity factor <= 0",
        "train --model-config capacity.json --out r",
        "capacity_factor",
    ),
    (
        "negative learning rate",
        "train --config negative-lr.json --out r",
        "lr must be in (0, 1]",
    ),
    (
        "negative loss coefficient",
        "train --config negative-aux.json --out r",
        "aux_loss_coef must be >= 0",
    ),
    (
        "router learning rate scale of zero",
        "train --config zero-router-lr.json --out r",
        "router_lr_scale must be > 0",
    ),
    (
        "zero steps",
        "train --steps 0 --out r",
        "steps must be at least 1",
    ),
    (
        "truncated weights",
        "generate truncated --prompt hi",
        "truncated/model.bpk",
    ),
    (
        "empty weights file",
        "eval empty-weights",
        "empty-weights/model.bpk",
    ),
    (
        "foreign weights file",
        "generate foreign --prompt hi",
        "foreign/model.bpk",
    ),
    (
        "Hugging Face directory of another model type",
        "import-hf llama --out imported",
        "model_type is 'llama'",
    ),
    (
        "unknown device",
        "train --device cuda:7 --out r",
        "unknown device 'cuda:7'",
    ),
    (
        "batch smaller than the data-parallel devices",
        "train --device flex,flex,flex --batch-size 2 --out r",
        "batch_size 2 cannot be split across 3 devices",
    ),
    (
        "wgpu adapter that does not exist",
        "generate ckpt --prompt hi --device wgpu:99",
        "no wgpu adapter for 'wgpu:99'",
    ),
    (
        "empty corpus directory",
        "train --data empty-corpus --out r",
        "empty-corpus: is empty",
    ),
    (
        "binary corpus file",
        "train --data binary-corpus --out r",
        "blob.txt: looks binary",
    ),
    (
        "prompt longer than the model's context",
        "generate ckpt --prompt 0123456789012345678901234567890123456789",
        "the prompt has 40 tokens but the model's context is 32",
    ),
    (
        "existing run directory without --overwrite",
        "train --steps 2 --out run",
        "run: already exists; pass --overwrite",
    ),
    (
        "resume of a directory that is not a run",
        "train --resume --out nope",
        "nope: no such run directory",
    ),
    (
        "merge output that exists",
        "merge ckpt ckpt --out run",
        "run: already exists",
    ),
    (
        "merge of non-dense branches",
        "merge ckpt ckpt --out merged",
        "not dense",
    ),
    (
        "unknown flag",
        "train --stepz 3",
        "unexpected argument '--stepz'",
    ),
    (
        "merge with one branch",
        "merge ckpt --out m",
        "2 values required",
    ),
    (
        "branch on an unknown domain",
        "branch --out b --domains klingon",
        "unknown domain 'klingon'",
    ),
    (
        "bench with zero tokens",
        "bench --tokens 0",
        "--tokens must be at least 1",
    ),
    ("inspect of a missing path", "inspect nope", "nope"),
    (
        "logits from foreign weights",
        "logits foreign --prompt hi",
        "foreign/model.bpk",
    ),
    (
        "token id outside the vocabulary",
        "logits ckpt --ids 5,999",
        "token id 999 is outside the model's vocabulary of 258",
    ),
    (
        "text prompt for a vocabulary without bytes",
        "logits small-vocab --prompt hi",
        "the vocabulary of 64 does not cover bytes; give token ids with --ids",
    ),
    (
        "Hugging Face shard outside its directory",
        "import-hf escape --out imported",
        "shard '../ckpt/model.bpk' of 'model.embed_tokens.weight' is outside the model directory",
    ),
    (
        "Hugging Face shard missing",
        "import-hf hf-missing-shard --out imported",
        "model-00002-of-00002.safetensors: shard missing (named by the index)",
    ),
    (
        "Hugging Face weight stored as integers",
        "import-hf hf-int-weights --out imported",
        "tensor 'model.norm.weight' is stored as I32; weights must be F32, F16 or BF16",
    ),
    (
        "Hugging Face config setting that is not implemented",
        "import-hf hf-sliding-window --out imported",
        "sliding_window",
    ),
    (
        "import to a dtype that does not exist",
        "import-hf hf-sliding-window --out imported --dtype f8",
        "'f8' is not a weight dtype; use f32, f16 or bf16",
    ),
    (
        "expert budget below one token's experts",
        "generate ckpt --prompt hi --expert-budget 1KiB",
        "one token needs its top-2 at once, so the budget must be at least 24576 bytes",
    ),
    (
        "expert cache policy that cannot run",
        "generate ckpt --prompt hi --expert-budget 1MiB --expert-cache belady",
        "belady needs the future",
    ),
    (
        "expert precision that does not exist",
        "quantize ckpt --experts q3 --out q",
        "'q3' is not an expert precision; use q8 or q4",
    ),
    (
        "export of truncated weights",
        "export truncated --out w.safetensors",
        "truncated/model.bpk",
    ),
    (
        "upcycling a model that is already MoE",
        "upcycle ckpt --out up",
        "already has MoE layers",
    ),
    (
        "an empty line in a prompts file",
        "generate ckpt --prompts prompts-gap.txt",
        "prompts-gap.txt line 2: the prompt is empty",
    ),
    (
        "a prompts file that does not exist",
        "generate ckpt --prompts nope.txt",
        "cannot read",
    ),
    (
        "a batch of prompts to logits",
        "logits ckpt --prompts prompts.txt",
        "only generate does",
    ),
    (
        "bench cases that match no case",
        "bench --cases moe_topp --quick",
        "moe_topp",
    ),
    (
        "an unknown backend in a bench list",
        "bench --device flex,cuda9 --quick",
        "cuda9",
    ),
    (
        "eval on a binary corpus",
        "eval ckpt --data binary-corpus",
        "blob.txt: looks binary",
    ),
    (
        "eval with zero windows",
        "eval ckpt --windows 0",
        "expected a positive number or `all`, got `0`",
    ),
    (
        "train with zero seeds",
        "train --seeds 0 --out s",
        "--seeds",
    ),
    (
        "resuming seeds of a run that has none",
        "train --seeds 2 --resume --out run",
        "run: has no seed-N runs to resume",
    ),
    ("compare a missing run", "compare run nope", "nope"),
    (
        "compare on a binary corpus",
        "compare run ckpt --data binary-corpus",
        "blob.txt: looks binary",
    ),
    (
        "Branch-Train-Merge with a prefix as long as the window",
        "btm ckpt ckpt --prefix 16",
        "--prefix must be in 1..16",
    ),
    (
        "router init from domains for experts without one",
        "merge dense-a dense-b --router-init domain-means --out m",
        "needs at least two experts whose branch trained on one corpus domain",
    ),
];

#[test]
fn every_bad_input_fails_with_one_line_and_changes_nothing() {
    let f = Fixture::new();
    let mut table =
        String::from("| bad input | command | exit | what the user sees |\n|---|---|---|---|\n");
    let mut failures = Vec::new();
    for (what, cmd, expected) in CASES {
        let before = snapshot(f.root.path());
        let args: Vec<&str> = cmd.split_whitespace().collect();
        let (code, err) = f.moe(&args);
        let after = snapshot(f.root.path());
        let line = err.trim_end();
        let ok = code != 0
            && !line.is_empty()
            && line.lines().count() == 1
            && line.starts_with("error: ")
            && line.contains(expected)
            && !line.contains("panicked")
            && !line.contains("internal error")
            && before == after;
        if !ok {
            let changed: Vec<_> = after
                .keys()
                .filter(|k| before.get(*k) != after.get(*k))
                .chain(before.keys().filter(|k| !after.contains_key(*k)))
                .collect();
            failures.push(format!(
                "{what}: `moe {cmd}` exit {code}, expected '{expected}', got:\n{err}\nchanged: {changed:?}"
            ));
        }
        table += &format!(
            "| {what} | `moe {cmd}` | {code} | `{}` |\n",
            line.replace('|', "\\|")
                .replace(&*f.root.path().to_string_lossy(), "…")
        );
    }
    if let Ok(out) = std::env::var("MOE_RELIABILITY_TABLE") {
        std::fs::write(out, &table).unwrap();
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
