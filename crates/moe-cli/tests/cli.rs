//! The `moe` binary end to end.

use std::path::Path;
use std::process::{Command, Output};

fn moe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args)
        .output()
        .expect("run moe")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A tiny model config file so CLI tests train in seconds. It names only what differs from the
/// defaults (nested `moe` included): the rest comes from the defaults.
fn tiny_model(dir: &Path) -> String {
    let path = dir.join("model.json");
    let partial = r#"{"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64,
        "max_seq_len": 64, "moe": {"d_model": 32, "d_ff": 32, "n_experts": 4}}"#;
    std::fs::write(&path, partial).unwrap();
    path.display().to_string()
}

/// Flags of a short, quiet run on the tiny model: `steps` steps of 8 windows of 32 tokens.
fn quick_run(steps: &'static str) -> [&'static str; 7] {
    [
        "--seq-len",
        "32",
        "--batch-size",
        "8",
        "--steps",
        steps,
        "--quiet",
    ]
}

#[test]
fn train_then_eval_generate_logits_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let model = tiny_model(tmp.path());
    let run_s = run.display().to_string();
    let o = moe(&[
        "train",
        "--steps",
        "30",
        "--out",
        &run_s,
        "--model-config",
        &model,
        "--seq-len",
        "32",
        "--batch-size",
        "8",
        "--eval-every",
        "10",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("NMI"), "{out}");
    assert!(
        out.contains("[code]") && out.contains("[spanish]"),
        "samples per domain: {out}"
    );
    assert!(run.join("loss.svg").exists() && run.join("routing-layer-0.svg").exists());
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );

    let o = moe(&["eval", &run_s, "--json", "--windows", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(report["losses"].as_array().unwrap().len(), 4);
    assert!(report.get("controls").is_none(), "controls only when asked");
    let o = moe(&[
        "eval",
        &run_s,
        "--json",
        "--windows",
        "2",
        "--controls",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let controls = report["controls"].as_array().unwrap();
    assert_eq!(controls.len(), 2, "{report}");
    assert_eq!(controls[0]["layers"].as_array().unwrap().len(), 2);

    let ckpt = moe_train::train::resolve_checkpoint(&run)
        .unwrap()
        .display()
        .to_string();
    let o = moe(&[
        "generate",
        &ckpt,
        "--prompt",
        "def ",
        "--max-new-tokens",
        "5",
        "--greedy",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let g: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(g["prompt_tokens"], serde_json::json!([100, 101, 102, 32]));
    assert!(g["new_tokens"].as_array().unwrap().len() <= 5);

    // A run directory stands for its latest checkpoint here too.
    let o = moe(&["logits", &run_s, "--prompt", "ab"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let l: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(l["tokens"], serde_json::json!([97, 98]));
    assert_eq!(l["logits"].as_array().unwrap().len(), 2);
    assert_eq!(l["logits"][0].as_array().unwrap().len(), 258);

    let o = moe(&["inspect", &ckpt, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let i: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(i["total_params"].as_u64().unwrap() > i["active_params"].as_u64().unwrap());
    // A run directory stands for its latest checkpoint.
    let o = moe(&["inspect", &run_s, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["total_params"], i["total_params"]);

    // Refuses to train over the run without --overwrite, and leaves it as it was.
    let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let o = moe(&[
        "train",
        "--steps",
        "5",
        "--out",
        &run_s,
        "--model-config",
        &model,
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--overwrite"), "{}", stderr(&o));
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), before);

    // Resume to more steps continues from step 30.
    let o = moe(&[
        "train", "--resume", "--out", &run_s, "--steps", "40", "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("trained 40 steps"), "{}", stdout(&o));
}

/// `--device a,b` trains data-parallel and resumes like any run.
#[test]
fn data_parallel_training_runs_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run").display().to_string();
    let model = tiny_model(tmp.path());
    let args = |steps: &str| {
        let mut a = vec![
            "train",
            "--device",
            "flex,flex",
            "--steps",
            steps,
            "--out",
            &run,
        ];
        a.extend(["--seq-len", "32", "--batch-size", "4", "--quiet"]);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let mut first = args("6");
    first.extend([
        "--model-config".into(),
        model,
        "--stop-after".into(),
        "3".into(),
    ]);
    let o = moe(&first.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let mut resume = args("6");
    resume.push("--resume".into());
    let o = moe(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"step\":6"), "{metrics}");
}

#[test]
fn a_refused_run_leaves_nothing_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let run = tmp.path().join("run");
    let args = [
        "train",
        "--data",
        &empty.display().to_string(),
        "--out",
        &run.display().to_string(),
    ]
    .map(String::from);
    let o = moe(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("no domains"), "{err}");
    assert!(!run.exists(), "a refused run must not create its directory");
    // Each cause once: "path: problem", not "path: problem: problem".
    let missing = tmp.path().join("nope").display().to_string();
    let err = stderr(&moe(&["train", "--data", &missing, "--out", "x"]));
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}

#[test]
fn bad_input_is_one_line_and_a_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing").display().to_string();
    for args in [
        vec!["eval", &missing],
        vec!["generate", &missing, "--prompt", "x"],
        vec!["train", "--device", "cuda:7", "--steps", "1"],
        vec!["inspect", &missing],
    ] {
        let o = moe(&args);
        assert!(!o.status.success(), "{args:?} should fail");
        let err = stderr(&o);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// A Hugging Face Mixtral 8x7B config, given as the file or as its directory (which failed
/// before: the directory was read as one of our checkpoints).
#[test]
fn inspect_a_mixtral_8x7b_config_without_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("config.json");
    std::fs::write(&path, r#"{"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
        "tie_word_embeddings": false}"#).unwrap();
    let mut printed = Vec::new();
    for arg in [&path, tmp.path()] {
        let o = moe(&["inspect", &arg.display().to_string(), "--json"]);
        assert!(o.status.success(), "{}: {}", arg.display(), stderr(&o));
        let i: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(i["total_params"].as_u64().unwrap(), 46_702_792_704);
        assert_eq!(i["active_params"].as_u64().unwrap(), 12_879_925_248);
        printed.push(stdout(&o));
    }
    assert_eq!(printed[0], printed[1]);
}

/// A small dense checkpoint, written through the library.
fn dense_checkpoint(dir: &Path) -> String {
    let model = moe_model::ModelConfig::new()
        .with_vocab_size(258)
        .with_d_model(32)
        .with_n_layers(2)
        .with_n_heads(2)
        .with_n_kv_heads(1)
        .with_d_ff(64)
        .with_ffn_plan(moe_model::FfnPlan::AllDense)
        .init_seeded(&burn::tensor::Device::flex(), 1)
        .unwrap();
    moe_model::checkpoint::save(dir, &model, None, false).unwrap();
    dir.display().to_string()
}

/// Every weight of a checkpoint, in visiting order.
fn weights(dir: &Path) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl burn::module::ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::Tensor<D>>) {
            let data = param.val().into_data();
            self.0.push(data.try_into_vec_as::<f32>().unwrap());
        }
    }
    let ckpt = moe_model::checkpoint::load(dir, &burn::tensor::Device::flex()).unwrap();
    let mut collect = Collect(Vec::new());
    burn::module::Module::visit(&ckpt.model, &mut collect);
    collect.0
}

/// `moe upcycle` draws its routers and noise from `--seed` (default 0): the same seed writes
/// the same weights, another seed others. Before the flag, two runs drew different routers.
/// (The files are not byte-identical: Burn gives each new parameter a random id.)
#[test]
fn upcycle_is_seeded() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = dense_checkpoint(&tmp.path().join("dense"));
    let upcycle = |name: &str, seed: Option<&str>| {
        let out = tmp.path().join(name);
        let mut args = vec!["upcycle", &dense, "--out", out.to_str().unwrap()];
        args.extend(["--experts", "4", "--top-k", "2", "--noise", "0.1"]);
        args.extend(seed.map(|s| ["--seed", s]).into_iter().flatten());
        let o = moe(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        weights(&out)
    };
    let (a, b) = (upcycle("a", None), upcycle("b", Some("0")));
    assert!(a == b, "the same seed must give the same weights");
    assert!(a != upcycle("c", Some("1")), "another seed, other routers");
}

/// A run whose `latest` names a damaged checkpoint resumes from the newest complete one and
/// says so on stderr (before, it stopped or loaded the damaged one).
#[test]
fn resume_falls_back_to_the_newest_complete_checkpoint_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let run_s = run.display().to_string();
    let model = tiny_model(tmp.path());
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--out",
            &run_s,
            "--seq-len",
            "16",
            "--batch-size",
            "2",
        ];
        args.extend(["--checkpoint-every", "1", "--quiet"]);
        args.extend(extra);
        moe(&args)
    };
    let o = train(&["--steps", "2", "--model-config", &model]);
    assert!(o.status.success(), "{}", stderr(&o));
    let step2 = run.join("checkpoints/step-0000002");
    std::fs::remove_file(step2.join("model.bpk")).unwrap();
    let o = train(&["--steps", "3", "--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.starts_with("warning: "), "{err}");
    assert!(err.contains("step-0000002, which is incomplete"), "{err}");
    assert!(
        err.contains("using") && err.contains("step-0000001"),
        "{err}"
    );
    assert!(stdout(&o).contains("trained 3 steps"), "{}", stdout(&o));
}

#[test]
fn branch_merge_fine_tune_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let dense = tmp.path().join("dense.json");
    let text = std::fs::read_to_string(&model).unwrap().replace(
        "\"d_model\": 32,",
        "\"d_model\": 32, \"ffn_plan\": \"AllDense\",",
    );
    std::fs::write(&dense, text).unwrap();
    let dir = tmp.path().join("branches");
    let dir_s = dir.display().to_string();
    let small = ["--seq-len", "32", "--batch-size", "8", "--eval-every", "10"];
    let mut args = vec![
        "branch",
        "--config",
        dense.to_str().unwrap(),
        "--out",
        &dir_s,
        "--domains",
        "code,english",
        "--devices",
        "flex,ndarray",
        "--steps",
        "10",
        "--quiet",
    ];
    args.extend(small);
    let o = moe(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("branch code"), "{}", stdout(&o));

    // Branching again over the same directory needs --overwrite and changes nothing.
    let before = std::fs::read_to_string(dir.join("code/latest")).unwrap();
    let o = moe(&args);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--overwrite"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(dir.join("code/latest")).unwrap(),
        before
    );

    // A branch is an ordinary run: it resumes on its own domain only.
    let code_run = dir.join("code").display().to_string();
    let o = moe(&[
        "train", "--resume", "--out", &code_run, "--steps", "14", "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let latest = std::fs::read_to_string(dir.join("code/latest")).unwrap();
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("code").join(latest.trim()).join("trainer.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], 14);
    assert_eq!(state["domains"], serde_json::json!(["code"]));

    let merged = tmp.path().join("merged").display().to_string();
    let (code, english) = (
        dir.join("code").display().to_string(),
        dir.join("english").display().to_string(),
    );
    let o = moe(&["merge", &code, &english, "--out", &merged, "--top-k", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("expert 1"), "{}", stdout(&o));

    let ft = tmp.path().join("ft").display().to_string();
    let mut args = vec![
        "train", "--from", &merged, "--train", "router", "--steps", "10", "--out", &ft, "--quiet",
    ];
    args.extend(small);
    let o = moe(&args);
    assert!(o.status.success(), "{}", stderr(&o));

    let o = moe(&["eval", &ft, "--json", "--windows", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(report["tables"].as_array().unwrap().len(), 2);
    let own = report["own_expert_share"].as_object().unwrap();
    assert_eq!(own.keys().collect::<Vec<_>>(), ["code", "english"]);

    // Branches of different architectures are refused, naming the branch.
    let o = moe(&[
        "merge",
        &code,
        &merged,
        "--out",
        &tmp.path().join("x").display().to_string(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not dense"), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

/// Branch-Train-MiX options: branches with the body frozen keep the base's attention; a merge
/// with the base as generalist expert and routers from domain means; Branch-Train-Merge
/// against the merged model on the same positions.
#[test]
fn frozen_branches_generalist_domain_mean_routers_and_btm() {
    let tmp = tempfile::tempdir().unwrap();
    let base = dense_checkpoint(&tmp.path().join("base"));
    let dir = tmp.path().join("fb");
    let small = quick_run("6");
    let mut args = vec!["branch", "--base", &base, "--freeze-body"];
    args.extend(["--domains", "code,english", "--out", dir.to_str().unwrap()]);
    args.extend(small);
    let o = moe(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let code = dir.join("code");
    let latest = std::fs::read_to_string(code.join("latest")).unwrap();
    let (before, after) = (
        weights(Path::new(&base)),
        weights(&code.join(latest.trim())),
    );
    // Visiting order: embedding first, then per block attention norm and projections.
    assert_eq!(before[0], after[0], "embeddings frozen");
    assert_eq!(before[1], after[1], "the first attention norm frozen");
    assert_ne!(before, after, "the FFNs trained");

    let merged = tmp.path().join("m");
    let (code_s, english_s) = (code.display().to_string(), dir.join("english"));
    let mut args = vec![
        "merge",
        &code_s,
        english_s.to_str().unwrap(),
        "--generalist",
        &base,
    ];
    args.extend(["--router-init", "domain-means", "--top-k", "1"]);
    args.extend(["--out", merged.to_str().unwrap()]);
    let o = moe(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("expert 2"), "{}", stdout(&o));
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("merge.json")).unwrap()).unwrap();
    assert_eq!(info["experts"][2]["generalist"], true);

    let mut args = vec!["btm", &code_s, english_s.to_str().unwrap(), "--prefix", "8"];
    args.extend([
        "--windows",
        "2",
        "--json",
        "--against",
        merged.to_str().unwrap(),
    ]);
    let o = moe(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["btm"]["losses"].as_array().unwrap().len(), 4);
    assert!(
        r["btm"]["own_branch"][0].as_f64().is_some(),
        "code has a branch"
    );
    assert!(r["btm"]["own_branch"][1].is_null(), "arithmetic has none");
    assert_eq!(r["against"][0]["losses"][0]["windows"], 2);
    let o = moe(&[
        "btm",
        &code_s,
        english_s.to_str().unwrap(),
        "--prefix",
        "32",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--prefix"), "{}", stderr(&o));
}

/// `moe train --seeds N` trains one run per seed; `moe compare` gives each group's loss with
/// an interval and the difference, paired by seed.
#[test]
fn seeds_and_compare() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    // A smaller corpus of another corpus seed, which evaluations must rebuild.
    let config = tmp.path().join("train.json");
    std::fs::write(&config, r#"{"corpus_bytes": 60000, "corpus_seed": 3}"#).unwrap();
    let small = quick_run("4");
    let (moe_dir, dense_dir) = (tmp.path().join("moe"), tmp.path().join("dense"));
    for (out, dense) in [(&moe_dir, false), (&dense_dir, true)] {
        let mut args = vec!["train", "--seeds", "2", "--model-config", &model];
        args.extend(["--config", config.to_str().unwrap()]);
        args.extend(["--out", out.to_str().unwrap()]);
        args.extend(small);
        if dense {
            args.push("--dense");
        }
        let o = moe(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(out.join("seed-42/latest").exists() && out.join("seed-43/latest").exists());
    }
    let (a, b) = (moe_dir.to_str().unwrap(), dense_dir.to_str().unwrap());
    let o = moe(&["compare", a, b, "--windows", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("dense - moe") && text.contains("±"), "{text}");
    assert!(text.contains("paired by seed"), "{text}");
    let o = moe(&["compare", a, b, "--windows", "2", "--json"]);
    let c: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(c["groups"][1]["paired"], true);
    assert_eq!(c["groups"][0]["runs"], 2);
    assert!(
        c["groups"][1]["vs_first"][0]["half_width"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    // `moe eval` rebuilds the run's corpus: all windows of 6 kB of validation text per domain
    // (the default corpus has 300 kB, about 9,000 windows of 32 tokens).
    let seed_run = moe_dir.join("seed-42");
    let o = moe(&[
        "eval",
        seed_run.to_str().unwrap(),
        "--windows",
        "all",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let windows = r["losses"][0]["windows"].as_u64().unwrap();
    assert!((150..400).contains(&windows), "{windows}");
}

/// `moe export --hf` writes a Mixtral directory that `moe import-hf` reads back to the same
/// logits; `--out` and `--hf` are exclusive, one required; a dense model is refused in one line.
#[test]
fn export_hf_round_trips_through_import_hf() {
    let tmp = tempfile::tempdir().unwrap();
    let model = moe_model::ModelConfig::new()
        .with_vocab_size(258)
        .with_d_model(32)
        .with_n_layers(2)
        .with_n_heads(2)
        .with_n_kv_heads(1)
        .with_moe(moe_core::MoeLayerConfig::new(32, 24, 4))
        .init_seeded(&burn::tensor::Device::flex(), 5)
        .unwrap();
    let ckpt = tmp.path().join("ckpt");
    moe_model::checkpoint::save(&ckpt, &model, None, false).unwrap();
    let ckpt = ckpt.display().to_string();
    let hf = tmp.path().join("hf").display().to_string();
    let back = tmp.path().join("back").display().to_string();
    let o = moe(&["export", &ckpt, "--hf", &hf]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = moe(&["import-hf", &hf, "--out", &back]);
    assert!(o.status.success(), "{}", stderr(&o));
    let logits = |c: &str| stdout(&moe(&["logits", c, "--ids", "1,2,3,250,7"]));
    assert_eq!(logits(&ckpt), logits(&back));

    let o = moe(&["export", &ckpt, "--hf", &hf]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not empty"), "{}", stderr(&o));
    for args in [
        vec!["export", ckpt.as_str()],
        vec![
            "export",
            ckpt.as_str(),
            "--out",
            "x.safetensors",
            "--hf",
            "y",
        ],
    ] {
        let o = moe(&args);
        assert!(!o.status.success(), "{args:?}");
        assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    }
    let dense = dense_checkpoint(&tmp.path().join("dense"));
    let o = moe(&[
        "export",
        &dense,
        "--hf",
        &tmp.path().join("d").display().to_string(),
    ]);
    assert!(stderr(&o).contains("ffn_plan"), "{}", stderr(&o));
    assert!(!tmp.path().join("d").exists());
}

/// `moe trace` records every token's experts per MoE layer; `moe cache-sim` replays the trace:
/// Belady's optimum bounds LRU and LFU, and a budget holding every expert misses each once.
#[test]
fn trace_then_cache_sim() {
    let (tmp, ckpt_s) = saved_tiny_moe_of_8(3);
    let trace = tmp.path().join("trace.jsonl");
    let trace_s = trace.display().to_string();
    let o = moe(&[
        "trace",
        &ckpt_s,
        "--tokens",
        "100",
        "--seq-len",
        "40",
        "--out",
        &trace_s,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["kind"], "moe-trace");
    assert_eq!(lines[0]["moe_layers"], serde_json::json!([0, 1]));
    let expert_bytes = lines[0]["expert_bytes"].as_u64().unwrap();
    assert_eq!(expert_bytes, 3 * 32 * 32 * 4);
    assert_eq!(lines.len(), 1 + 4 * 100, "4 built-in domains x 100 tokens");
    for token in &lines[1..] {
        let layers = token["experts"].as_array().unwrap();
        assert_eq!(layers.len(), 2);
        for picks in layers {
            let picks: Vec<u64> = serde_json::from_value(picks.clone()).unwrap();
            assert_eq!(picks.len(), 2, "top-2");
            assert!(picks[0] != picks[1] && picks.iter().all(|&e| e < 8));
        }
    }

    let budgets = format!(
        "{},{},{}",
        2 * expert_bytes,
        6 * expert_bytes,
        16 * expert_bytes
    );
    let o = moe(&["cache-sim", &trace_s, "--budget", &budgets, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let rows = out["results"].as_array().unwrap();
    assert_eq!(rows.len(), 9, "3 budgets x 3 policies");
    for budget in rows.chunks(3) {
        let rate = |i: usize| budget[i]["hit_rate"].as_f64().unwrap();
        assert_eq!(budget[2]["policy"], "belady");
        assert!(rate(0) <= rate(2) && rate(1) <= rate(2), "{budget:?}");
        assert_eq!(
            budget[0]["hits"].as_u64().unwrap() + budget[0]["misses"].as_u64().unwrap(),
            4 * 100 * 2 * 2,
            "every use counted"
        );
    }
    for row in &rows[6..] {
        assert!(
            row["misses"].as_u64().unwrap() <= 16,
            "all 16 experts fit: {row}"
        );
    }
    let o = moe(&["cache-sim", &trace_s, "--budget", "1KiB"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("top-2"), "{}", stderr(&o));
}

/// `moe quantize` stores the experts in q8 (inspect shows it), and the quantised checkpoint
/// generates the same tokens resident or paged under a budget.
#[test]
fn quantize_then_generate_resident_and_paged() {
    let (tmp, ckpt_s) = saved_tiny_moe_of_8(5);
    let q = tmp.path().join("q8").display().to_string();
    let o = moe(&["quantize", &ckpt_s, "--experts", "q8", "--out", &q]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("MiB of expert weights"),
        "{}",
        stdout(&o)
    );
    let o = moe(&["inspect", &q, "--json"]);
    let i: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let q8 = i["stored"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["dtype"] == "q8");
    assert_eq!(
        q8.unwrap()["expert_bytes"],
        2 * 3 * 8 * (32 * 32 + 32 * 32 / 8)
    );

    let generate = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["generate", &q, "--ids", "1,2,3", "--greedy", "--json"];
        args.extend_from_slice(extra);
        let o = moe(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str(&stdout(&o)).unwrap()
    };
    let resident = generate(&[]);
    if cfg!(target_os = "linux") {
        assert!(resident["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
    }
    let paged = generate(&["--expert-budget", "40KiB", "--prefetch"]);
    assert_eq!(paged["new_tokens"], resident["new_tokens"]);
    assert!(paged["expert_store"]["misses"].as_u64().unwrap() > 0);
}

/// [`tiny_moe_of_8`] of `seed` saved as a checkpoint in a fresh temporary directory: the
/// directory (removed when dropped) and the checkpoint's path as an argument.
fn saved_tiny_moe_of_8(seed: u64) -> (tempfile::TempDir, String) {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    moe_model::checkpoint::save(&ckpt, &tiny_moe_of_8(seed), None, false).unwrap();
    let ckpt = ckpt.display().to_string();
    (tmp, ckpt)
}

/// A 2-layer MoE of 8 experts (d_model 32, d_ff 32, top-2) drawn from `seed`, with the byte
/// tokenizer's vocabulary of 258.
fn tiny_moe_of_8(seed: u64) -> moe_model::MoeLm {
    moe_model::ModelConfig::new()
        .with_vocab_size(258)
        .with_d_model(32)
        .with_n_layers(2)
        .with_n_heads(2)
        .with_n_kv_heads(1)
        .with_d_ff(64)
        .with_max_seq_len(64)
        .with_moe(moe_core::MoeLayerConfig::new(32, 32, 8))
        .init_seeded(&burn::tensor::Device::flex(), seed)
        .unwrap()
}

/// `moe bench --decode CKPT`: prefill and decode speed per context; contexts the model cannot
/// hold are listed as skipped; with a budget the store's counts come along.
#[test]
fn bench_decode_of_a_checkpoint() {
    let (_tmp, ckpt) = saved_tiny_moe_of_8(2);
    let args = [
        "bench",
        "--decode",
        &ckpt,
        "--context",
        "8,16,200",
        "--new-tokens",
        "4",
        "--batch",
        "1,3",
        "--json",
    ];
    let o = moe(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let out: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let cases = out["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4, "2 contexts at 2 batch sizes");
    assert_eq!(cases[3]["batch"], 3);
    assert_eq!(out["skipped_contexts"], serde_json::json!([200]));
    for c in cases {
        assert!(c["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(c["first_prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(c["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    let o = moe(&[&args[..], &["--expert-budget", "40KiB"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let out: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(out["expert_store"]["misses"].as_u64().unwrap() > 0);
    let o = moe(&["bench", "--expert-budget", "40KiB"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("use it with --decode"),
        "{}",
        stderr(&o)
    );
}

/// `moe generate --prompts FILE`: every line continued in one batch as it is alone.
#[test]
fn generate_a_batch_of_prompts() {
    let (tmp, ckpt) = saved_tiny_moe_of_8(3);
    let lines = ["abc", "hello world", "z"];
    let file = tmp.path().join("prompts.txt");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let file = file.display().to_string();
    let common = ["--greedy", "--max-new-tokens", "5", "--json"];
    let o = moe(&[&["generate", &ckpt, "--prompts", &file][..], &common].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let batch: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let results = batch["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for (line, result) in lines.iter().zip(results) {
        let o = moe(&[&["generate", &ckpt, "--prompt", line][..], &common].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        let alone: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(result["new_tokens"], alone["new_tokens"], "{line}");
        assert_eq!(result["text"], alone["text"], "{line}");
    }
    let o = moe(&["generate", &ckpt, "--prompts", &file, "--greedy"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("--- prompt 3 ---\nz"),
        "each prompt under its number: {text}"
    );
}

/// `moe generate --kv-cache f16` generates with keys and values cached in half precision, and
/// an unknown cache type is a one-line error.
#[test]
fn generate_with_an_f16_kv_cache() {
    let (_tmp, ckpt) = saved_tiny_moe_of_8(5);
    let args = [
        "generate",
        &ckpt,
        "--prompt",
        "abc",
        "--greedy",
        "--max-new-tokens",
        "4",
    ];
    let o = moe(&[&args[..], &["--kv-cache", "f16", "--json"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let out: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(out["new_tokens"].as_array().map(Vec::len), Some(4));
    let o = moe(&[&args[..], &["--kv-cache", "q3"]].concat());
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("unknown KV cache type `q3`: expected f32 or f16"),
        "{err}"
    );
}

/// `moe bench --cases`: only the layer cases selected run (a full name selects that case alone,
/// other text every case containing it), no ratio lacks one of its cases, and a name that
/// matches no case is a one-line error, also beside names that do.
#[test]
fn bench_runs_only_the_selected_cases() {
    let args = ["bench", "--quick", "--tokens", "16", "--cases"];
    let o = moe(&[&args[..], &["moe_top2_padded,dense_active", "--json"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let out: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let names: Vec<&str> = out["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    let expected = [
        "dense_active_fwd",
        "moe_top2_padded_fwd",
        "dense_active_fwd_bwd",
    ];
    assert_eq!(names, expected);
    assert_eq!(out["ratios"], serde_json::json!({}));
    assert_eq!(out["breakdown"], serde_json::json!([]));
    let o = moe(&[&args[..], &["dense_active_fwd,moe_top2_fwd", "--json"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let out: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        out["cases"].as_array().unwrap().len(),
        2,
        "not the _bwd cases"
    );
    let ratios: Vec<&String> = out["ratios"].as_object().unwrap().keys().collect();
    assert_eq!(ratios, ["moe_vs_dense_active_fwd"]);
    for wrong in ["nothing", "moe_top2_padded,nothing", "moe_top2,"] {
        let o = moe(&[&args[..], &[wrong]].concat());
        assert!(!o.status.success(), "{wrong}");
        assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
        assert!(stderr(&o).contains("matches no case"), "{}", stderr(&o));
    }
}

/// `moe bench --device A,B,C`: the same cases on each backend in one table, a backend that fails
/// as a line saying why, and a grouped bar chart.
#[test]
fn bench_compares_backends_side_by_side() {
    let (tmp, ckpt) = saved_tiny_moe_of_8(4);
    let plot = tmp.path().join("bars.svg");
    let plot_s = plot.display().to_string();
    let args = [
        "bench",
        "--decode",
        &ckpt,
        "--context",
        "8",
        "--batch",
        "1,2",
        "--new-tokens",
        "2",
        "--device",
        "flex,ndarray,wgpu:99",
    ];
    let o = moe(&[&args[..], &["--json", "--plot", &plot_s]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let out: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let c = &out["comparison"];
    assert_eq!(
        c["devices"],
        serde_json::json!(["flex", "ndarray", "wgpu:99"])
    );
    let rows = c["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "prefill and decode at batch 1 and 2");
    for row in rows {
        let v = row["tokens_per_s"].as_array().unwrap();
        assert!(v[0].as_f64().unwrap() > 0.0 && v[1].as_f64().unwrap() > 0.0);
        assert!(v[2].is_null());
        assert_eq!(row["ratio_to_first"][0], 1.0);
    }
    assert_eq!(c["failed"][0]["device"], "wgpu:99");
    assert_eq!(out["runs"].as_array().unwrap().len(), 3);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains("ndarray"), "the legend names each backend");
    let o = moe(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = stdout(&o);
    assert!(table.contains("ndarray/flex"), "{table}");
    assert!(table.contains("wgpu:99: could not run"), "{table}");
}
