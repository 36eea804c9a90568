//! `moe import-hf` with a Hugging Face tokenizer, then `moe generate` and `moe logits` on text,
//! chat and raw-id prompts. The fixture `tests/fixtures/hf-mixtral-eos` (a tiny random Mixtral
//! over a trained byte-level BPE vocabulary, made by `scripts/hf_tokenizer_fixture.py`) comes
//! with the tokens transformers generates greedily with its EOS list and with the tokenizer's EOS
//! alone.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::prelude::*;
use moe_core::MoeLayerConfig;
use moe_model::{ModelConfig, checkpoint};
use serde_json::Value;

fn moe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args)
        .output()
        .expect("run moe")
}

/// Stdout of a run that must succeed.
fn ok(args: &[&str]) -> String {
    let o = moe(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "moe {args:?}: {err}");
    String::from_utf8(o.stdout).unwrap()
}

/// The one-line error of a run that must fail.
fn fails(args: &[&str]) -> String {
    let o = moe(args);
    assert!(!o.status.success(), "moe {args:?} succeeded");
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    err
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-mixtral-eos")
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

/// A copy of the fixture without the named files.
fn fixture_without(dir: &Path, skip: &[&str]) -> String {
    fs::create_dir_all(dir).unwrap();
    for entry in fs::read_dir(fixture()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap();
        if !skip.contains(&name) {
            fs::copy(&path, dir.join(name)).unwrap();
        }
    }
    dir.display().to_string()
}

fn import(hf_dir: &str, out: &Path) -> String {
    let out_s = out.display().to_string();
    let said = ok(&["import-hf", hf_dir, "--out", &out_s]);
    assert!(said.contains("imported"), "{said}");
    out_s
}

fn greedy(ckpt: &str, prompt: &[&str], max_new: usize) -> Value {
    let max = max_new.to_string();
    let mut args = vec![
        "generate",
        ckpt,
        "--greedy",
        "--max-new-tokens",
        &max,
        "--json",
    ];
    args.extend_from_slice(prompt);
    serde_json::from_str(&ok(&args)).unwrap()
}

#[test]
fn imported_tokenizer_encodes_like_transformers_and_generation_stops_at_eos() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = json(&fixture().join("expected.json"));
    let ckpt = import(&fixture().display().to_string(), &tmp.path().join("ckpt"));
    let stored = tmp.path().join("ckpt/hf-tokenizer");
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        assert!(stored.join(name).is_file(), "{name} not copied");
    }
    // The project's own tokenizer spec is not written for an imported model.
    assert!(!tmp.path().join("ckpt/tokenizer.json").exists());

    let stop = ids(&expected["greedy_with_eos"]);
    let eos = ids(&expected["eos"]);
    assert!(
        stop.len() < 24 && eos.contains(stop.last().unwrap()),
        "fixture: {stop:?}"
    );
    let out = greedy(
        &ckpt,
        &["--prompt", expected["prompt"].as_str().unwrap()],
        24,
    );
    assert_eq!(ids(&out["prompt_tokens"]), ids(&expected["prompt_ids"]));
    assert_eq!(ids(&out["new_tokens"]), stop, "stops at the second EOS id");

    // Without generation_config.json, EOS is the tokenizer's `</s>` alone: the same model runs on
    // past the token that stopped it above, as transformers does.
    let free = fixture_without(&tmp.path().join("free-hf"), &["generation_config.json"]);
    let free = import(&free, &tmp.path().join("free"));
    let out = greedy(
        &free,
        &["--prompt", expected["prompt"].as_str().unwrap()],
        24,
    );
    let longer = ids(&expected["greedy_with_tokenizer_eos"]);
    assert!(
        longer.len() > stop.len() && longer.starts_with(&stop),
        "fixture: {longer:?}"
    );
    assert_eq!(ids(&out["new_tokens"]), longer);
}

#[test]
fn chat_ids_and_their_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = import(&fixture().display().to_string(), &tmp.path().join("ckpt"));
    let tokenizer_expected = json(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../moe-train/tests/fixtures/hf-tokenizer/expected.json"),
    );
    let chat = &tokenizer_expected["chat"];
    let message = chat["messages"][0]["content"].as_str().unwrap();
    let out = greedy(&ckpt, &["--chat", "--prompt", message], 2);
    assert_eq!(ids(&out["prompt_tokens"]), ids(&chat["ids"]));

    // Raw ids, checked against the vocabulary of 384.
    let out = greedy(&ckpt, &["--ids", "0,307,222"], 2);
    assert_eq!(ids(&out["prompt_tokens"]), [0, 307, 222]);
    let logits: Value = serde_json::from_str(&ok(&["logits", &ckpt, "--ids", "5,6"])).unwrap();
    assert_eq!(ids(&logits["tokens"]), [5, 6]);
    assert_eq!(logits["logits"][1].as_array().unwrap().len(), 384);
    for cmd in ["generate", "logits"] {
        let err = fails(&[cmd, &ckpt, "--ids", "1,384"]);
        assert!(err.contains("384") && err.contains("vocabulary"), "{err}");
        let err = fails(&[cmd, &ckpt, "--ids", "1,x"]);
        assert!(err.contains("--ids"), "{err}");
    }

    // A tokenizer without a chat template.
    let plain = fixture_without(&tmp.path().join("plain-hf"), &["chat_template.jinja"]);
    let plain = import(&plain, &tmp.path().join("plain"));
    let err = fails(&["generate", &plain, "--chat", "--prompt", "hi"]);
    assert!(err.contains("no chat template"), "{err}");
}

#[test]
fn without_a_tokenizer_bytes_when_the_vocabulary_covers_them_else_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let files = [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ];
    let bare = fixture_without(&tmp.path().join("bare-hf"), &files);
    let bare = import(&bare, &tmp.path().join("bare"));
    let out = greedy(&bare, &["--prompt", "ab"], 2);
    assert_eq!(ids(&out["prompt_tokens"]), [97, 98]);
    let err = fails(&["generate", &bare, "--chat", "--prompt", "hi"]);
    assert!(err.contains("--chat"), "{err}");

    // A vocabulary of 64 ids cannot hold bytes: text is refused, ids work.
    let config = ModelConfig::new()
        .with_vocab_size(64)
        .with_d_model(16)
        .with_n_layers(1)
        .with_n_heads(2)
        .with_n_kv_heads(1)
        .with_d_ff(16)
        .with_max_seq_len(16)
        .with_moe(MoeLayerConfig::new(16, 16, 4));
    let model = config.init(&Device::flex()).unwrap();
    let small = tmp.path().join("small");
    checkpoint::save(&small, &model, None, false).unwrap();
    let small = small.display().to_string();
    let err = fails(&["generate", &small, "--prompt", "hi"]);
    assert!(err.contains("--ids"), "{err}");
    let out = greedy(&small, &["--ids", "1,2"], 3);
    assert_eq!(out["new_tokens"].as_array().unwrap().len(), 3);
}

/// An import kept in bf16 says so in `inspect`; training on from it encodes the corpus with its
/// tokenizer and carries the tokenizer into the run's checkpoints, which then encode prompts as
/// the import did.
#[test]
fn bf16_import_and_its_tokenizer_carry_through_training() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = json(&fixture().join("expected.json"));
    let out = tmp.path().join("ckpt");
    let out_s = out.display().to_string();
    let hf = fixture().display().to_string();
    let said = ok(&["import-hf", &hf, "--out", &out_s, "--dtype", "bf16"]);
    assert!(said.contains("bf16") && !said.contains("f32"), "{said}");

    let inspect: Value = serde_json::from_str(&ok(&["inspect", &out_s, "--json"])).unwrap();
    let stored = inspect["stored"].as_array().unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["dtype"], "bf16");
    assert!(stored[0]["expert_bytes"].as_u64().unwrap() > 0);
    let hf_inspect: Value = serde_json::from_str(&ok(&["inspect", &hf, "--json"])).unwrap();
    assert_eq!(hf_inspect["stored"][0]["dtype"], "f32");
    assert_eq!(
        hf_inspect["stored"][0]["expert_bytes"].as_u64().unwrap(),
        2 * stored[0]["expert_bytes"].as_u64().unwrap()
    );

    // Paged: two experts of 6 KiB resident (the top-2), the rest read when routed; the same
    // tokens as fully resident.
    let prompt = expected["prompt"].as_str().unwrap();
    let resident = greedy(&out_s, &["--prompt", prompt], 12);
    let paged = greedy(
        &out_s,
        &[
            "--prompt",
            prompt,
            "--expert-budget",
            "12KiB",
            "--expert-cache",
            "lfu",
        ],
        12,
    );
    assert_eq!(paged["new_tokens"], resident["new_tokens"]);
    let store = &paged["expert_store"];
    assert_eq!(store["capacity"], 2, "{store}");
    assert!(store["misses"].as_u64().unwrap() > 0, "{store}");
    assert!(resident.get("expert_store").is_none());

    let run = tmp.path().join("run").display().to_string();
    ok(&[
        "train",
        "--from",
        &out_s,
        "--out",
        &run,
        "--steps",
        "2",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--quiet",
    ]);
    let latest = fs::read_to_string(tmp.path().join("run/latest")).unwrap();
    let trained = tmp.path().join("run").join(latest.trim());
    assert!(trained.join("hf-tokenizer/tokenizer.json").is_file());
    let got = greedy(&trained.display().to_string(), &["--prompt", prompt], 2);
    assert_eq!(ids(&got["prompt_tokens"]), ids(&expected["prompt_ids"]));
}

/// `--stop` ends the text before the first stop string and stops generating; the streamed text
/// mode prints the prompt and the same text.
#[test]
fn stop_strings_and_streamed_text() {
    let tmp = tempfile::tempdir().unwrap();
    let free = fixture_without(&tmp.path().join("free-hf"), &["generation_config.json"]);
    let free = import(&free, &tmp.path().join("free"));
    let full = greedy(&free, &["--prompt", "Hello"], 24);
    let text = full["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 6, "fixture text too short: {text:?}");
    let stop: String = chars[3..5].iter().collect();
    let cut = text.find(&stop).unwrap();
    let stopped = greedy(&free, &["--prompt", "Hello", "--stop", &stop], 24);
    assert_eq!(stopped["text"].as_str().unwrap(), &text[..cut]);
    let (all, short) = (ids(&full["new_tokens"]), ids(&stopped["new_tokens"]));
    assert!(short.len() <= all.len() && all.starts_with(&short));

    let printed = ok(&[
        "generate",
        &free,
        "--prompt",
        "Hello",
        "--greedy",
        "--max-new-tokens",
        "24",
    ]);
    assert_eq!(printed, format!("Hello{text}\n"));
    let printed = ok(&[
        "generate",
        &free,
        "--prompt",
        "Hello",
        "--greedy",
        "--max-new-tokens",
        "24",
        "--stop",
        &stop,
    ]);
    assert_eq!(printed, format!("Hello{}\n", &text[..cut]));
}
