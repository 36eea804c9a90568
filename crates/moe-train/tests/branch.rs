//! Branch-Train-MiX end to end on a tiny model: branches train alike in parallel and in sequence,
//! a failing branch leaves the others intact, merged checkpoints fine-tune with a frozen body.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burn::prelude::*;
use common::{tiny_model, tiny_train};
use moe_core::testing::{test_device, values};
use moe_core::{MoeLayerConfig, RouterConfig};
use moe_model::block::Ffn;
use moe_model::checkpoint::{self, CheckpointWriter};
use moe_model::{FfnPlan, ModelConfig, MoeLm};
use moe_train::branch::{
    Branch, BranchJob, BranchOutcome, merge_checkpoints, save_merged, train_branches,
};
use moe_train::merge_info::MergeInfo;
use moe_train::router_init::routers_from_domain_means;
use moe_train::{
    ByteTokenizer, Corpus, RunDir, Start, Tokenizer, TrainConfig, TrainPart, evaluate, train,
};
use rstest::rstest;

fn dense() -> ModelConfig {
    tiny_model(RouterConfig::mixtral()).with_ffn_plan(FfnPlan::AllDense)
}

fn branch_job<'a>(
    corpus: &'a Corpus,
    out: &Path,
    domains: &[&str],
    device: &Device,
    parallel: bool,
) -> BranchJob<'a> {
    BranchJob {
        base: Start::Fresh(dense()),
        config: tiny_train(6),
        corpus,
        data_source: "builtin".into(),
        tokenizer: &ByteTokenizer,
        out: out.to_path_buf(),
        branches: domains
            .iter()
            .map(|d| Branch {
                domain: d.to_string(),
                device: device.clone(),
            })
            .collect(),
        overwrite: false,
        parallel,
        progress: None,
        stop: Arc::new(AtomicBool::new(false)),
    }
}

fn weights(model: &MoeLm) -> Vec<f32> {
    let mut all = values(model.embed.weight.val());
    for block in &model.blocks {
        all.extend(values(block.attn.q_proj.weight.val()));
        if let Ffn::Dense(f) = &block.ffn {
            all.extend(values(f.w_down.weight.val()));
        }
    }
    all
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn latest(outcome: &BranchOutcome) -> PathBuf {
    outcome.result.as_ref().unwrap().checkpoint.clone()
}

#[rstest]
fn parallel_and_sequential_branches_train_identical_weights(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let corpus = Corpus::builtin(42, 20_000, &ByteTokenizer);
    let domains = ["code", "spanish"];
    let par = train_branches(branch_job(
        &corpus,
        &tmp.path().join("par"),
        &domains,
        &device,
        true,
    ))
    .unwrap();
    let seq = train_branches(branch_job(
        &corpus,
        &tmp.path().join("seq"),
        &domains,
        &device,
        false,
    ))
    .unwrap();
    let mut trained = Vec::new();
    for (p, s) in par.iter().zip(&seq) {
        assert_eq!(p.domain, s.domain);
        let (a, b) = (
            checkpoint::load(&latest(p), &device).unwrap().model,
            checkpoint::load(&latest(s), &device).unwrap().model,
        );
        let worst = max_diff(&weights(&a), &weights(&b));
        // Bit for bit on the CPU backends. cubecl autotunes wgpu kernels by timing them, and
        // concurrent branches load the device while it does, so the kernels picked (and their
        // summation order) may differ: equal to rounding there.
        let tolerance = if backend == "wgpu" { 1e-6 } else { 0.0 };
        assert!(
            worst <= tolerance,
            "branch {}: weights differ by {worst}",
            p.domain
        );
        trained.push(weights(&a));
        // Each branch is an ordinary run that saw only its own domain.
        let state = moe_train::run::TrainerState::read(&latest(p)).unwrap();
        assert_eq!(state.domains, std::slice::from_ref(&p.domain));
    }
    let apart = max_diff(&trained[0], &trained[1]);
    assert!(
        apart > 1e-3,
        "branches on different domains diverge: {apart}"
    );
}

#[test]
fn a_failing_branch_is_named_and_leaves_the_others_intact() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("branches");
    std::fs::create_dir_all(&out).unwrap();
    // The arithmetic branch cannot create its run directory: a file is in the way.
    std::fs::write(out.join("arithmetic"), "not a directory").unwrap();
    let corpus = Corpus::builtin(42, 20_000, &ByteTokenizer);
    let outcomes = train_branches(branch_job(
        &corpus,
        &out,
        &["code", "arithmetic", "english"],
        &device,
        true,
    ))
    .unwrap();
    let failed: Vec<_> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].domain, "arithmetic");
    let err = failed[0].result.as_ref().unwrap_err().to_string();
    assert!(err.contains("not a directory"), "{err}");
    for o in outcomes.iter().filter(|o| o.result.is_ok()) {
        let ckpt = RunDir::open(&o.run).unwrap().latest().unwrap().unwrap();
        checkpoint::load(&ckpt, &device).unwrap();
    }
    assert_eq!(
        std::fs::read_to_string(out.join("arithmetic")).unwrap(),
        "not a directory"
    );
}

#[test]
fn bad_branch_jobs_are_refused_before_anything_is_written() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let corpus = Corpus::builtin(42, 20_000, &ByteTokenizer);
    let out = tmp.path().join("b");
    let mut sparse = branch_job(&corpus, &out, &["code"], &device, true);
    sparse.base = Start::Fresh(tiny_model(RouterConfig::mixtral()));
    let err = train_branches(sparse).unwrap_err().to_string();
    assert!(err.contains("base must be a dense model"), "{err}");
    let err = train_branches(branch_job(
        &corpus,
        &out,
        &["code", "klingon"],
        &device,
        true,
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("unknown domain 'klingon'"), "{err}");
    let err = train_branches(branch_job(&corpus, &out, &["code", "code"], &device, true))
        .unwrap_err()
        .to_string();
    assert!(err.contains("listed twice"), "{err}");
    assert!(!out.exists(), "nothing written for a refused job");
}

/// Trains a code and an English branch under `dir/b`; their latest checkpoints.
fn code_and_english_branches(corpus: &Corpus, dir: &Path, device: &Device) -> Vec<PathBuf> {
    let job = branch_job(corpus, &dir.join("b"), &["code", "english"], device, true);
    let outcomes = train_branches(job).unwrap();
    outcomes.iter().map(latest).collect()
}

#[test]
fn merged_branches_fine_tune_only_their_routers_and_report_own_expert_shares() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let corpus = Corpus::builtin(42, 20_000, &ByteTokenizer);
    let paths = code_and_english_branches(&corpus, tmp.path(), &device);
    let routing = MoeLayerConfig::new(32, 32, 2).with_router(RouterConfig::mixtral().with_top_k(1));
    let (model, tokenizer, info) = merge_checkpoints(&paths, None, routing, 5, &device).unwrap();
    assert_eq!(info.experts[0].domains, ["code"]);
    assert_eq!(info.experts[1].domains, ["english"]);
    let merged = tmp.path().join("merged");
    save_merged(&merged, &model, tokenizer.as_ref(), &info, false).unwrap();
    assert_eq!(MergeInfo::read(&merged).unwrap(), Some(info.clone()));

    let config: TrainConfig = tiny_train(10).with_train(TrainPart::Router);
    let pair = corpus.select(&["code".into(), "english".into()]).unwrap();
    let out = train(common::job(
        config,
        Start::From(merged.clone()),
        &pair,
        RunDir::create(&tmp.path().join("ft"), false).unwrap(),
        &device,
    ))
    .unwrap();
    let before = checkpoint::load(&merged, &device).unwrap().model;
    assert_eq!(
        values(out.model.embed.weight.val()),
        values(before.embed.weight.val())
    );
    for (a, b) in out.model.blocks.iter().zip(&before.blocks) {
        let (Ffn::Moe(x), Ffn::Moe(y)) = (&a.ffn, &b.ffn) else {
            panic!("merged blocks are MoE");
        };
        assert_eq!(values(x.experts.w_up.val()), values(y.experts.w_up.val()));
        assert_eq!(
            values(a.attn.o_proj.weight.val()),
            values(b.attn.o_proj.weight.val())
        );
        assert_ne!(
            values(x.router.gate.weight.val()),
            values(y.router.gate.weight.val())
        );
    }
    let report = evaluate(&out.model, &pair, 2, 32, 8);
    let own = info.own_expert_shares(&report);
    assert_eq!(own.len(), 2);
    for (d, (domain, share)) in own.iter().enumerate() {
        assert_eq!(domain, &report.domains[d]);
        let by_hand: f64 =
            report.tables.iter().map(|t| t.shares[d][d]).sum::<f64>() / report.tables.len() as f64;
        assert!((share - by_hand).abs() < 1e-12);
    }
}

/// Gates initialised from the domains' mean hidden states lean each domain toward its own
/// expert from the start; a generalist expert gets the direction of the mean over domains.
#[test]
fn routers_from_domain_means_send_each_domain_to_its_own_expert() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let corpus = Corpus::builtin(42, 20_000, &ByteTokenizer);
    let paths = code_and_english_branches(&corpus, tmp.path(), &device);
    let routing = MoeLayerConfig::new(32, 32, 3).with_router(RouterConfig::mixtral().with_top_k(1));
    let (model, _, info) = merge_checkpoints(&paths, Some(&paths[0]), routing, 5, &device).unwrap();
    assert!(info.experts[2].generalist);
    let pair = corpus.select(&["code".into(), "english".into()]).unwrap();
    let model = routers_from_domain_means(model, &pair, &info, 8, 32).unwrap();
    for block in &model.blocks {
        let Ffn::Moe(moe) = &block.ffn else {
            panic!("merged blocks are MoE");
        };
        let w = moe.router.gate.weight.val(); // [d, 3]
        let d = w.dims()[0];
        let norms = values(w.clone().square().sum_dim(0).sqrt());
        assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-4), "{norms:?}");
        // The generalist's gate is the direction of the two domains' mean gates (of equal
        // length, so their sum).
        let sum = w.clone().slice([0..d, 0..1]) + w.clone().slice([0..d, 1..2]);
        let cos = (sum.clone() * w.slice([0..d, 2..3]))
            .sum()
            .into_scalar::<f32>()
            / sum.square().sum().sqrt().into_scalar::<f32>();
        assert!((cos - 1.0).abs() < 1e-4, "{cos}");
    }
    // Each domain's expert takes more of its own domain's tokens than of the other's.
    let report = evaluate(&model, &pair, 8, 32, 8);
    for t in &report.tables {
        let s = &t.shares;
        assert!(
            s[0][0] > s[1][0] && s[1][1] > s[0][1],
            "layer {}: {s:?}",
            t.layer
        );
    }
}

#[test]
fn merging_checks_architectures_and_tokenizers_by_path() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let save = |name: &str, config: ModelConfig, tokenizer: serde_json::Value| {
        let dir = tmp.path().join(name);
        let writer = CheckpointWriter::new(&dir).unwrap();
        writer.write_model(&config.init(&device).unwrap()).unwrap();
        writer
            .write_json(checkpoint::TOKENIZER_FILE, &tokenizer)
            .unwrap();
        writer.commit(false).unwrap()
    };
    let spec = ByteTokenizer.spec();
    let a = save("a", dense(), spec.clone());
    let wide = save("wide", dense().with_d_ff(64), spec.clone());
    let other = save("other", dense(), serde_json::json!({"kind": "bpe"}));
    let routing = MoeLayerConfig::new(32, 32, 2);
    let err = merge_checkpoints(
        &[a.clone(), wide.clone()],
        None,
        routing.clone(),
        0,
        &device,
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with(&wide.display().to_string()), "{err}");
    assert!(err.contains("d_ff"), "{err}");
    let err = merge_checkpoints(&[a, other.clone()], None, routing, 0, &device)
        .unwrap_err()
        .to_string();
    assert!(err.contains("different tokenizer"), "{err}");
    assert!(err.starts_with(&other.display().to_string()), "{err}");
}
