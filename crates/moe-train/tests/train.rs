//! Training end to end on a tiny model: loss goes down, resume is exact, NaN stops the run.

mod common;

use std::path::Path;

use burn::module::{Module, Param};
use burn::prelude::*;
use common::{job, tiny_model, tiny_train};
use moe_core::RouterConfig;
use moe_core::testing::{test_device, values};
use moe_model::checkpoint::{self, WEIGHTS_FILE};
use moe_train::data::train_windows;
use moe_train::eval::random_router_controls;
use moe_train::parallel::{StepEngine, StepResult};
use moe_train::{ByteTokenizer, Corpus, DataError, RunDir, Start, evaluate, train};
use rstest::rstest;

#[rstest]
fn a_short_run_lowers_the_loss_and_reports_routing(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
    #[values("mixtral", "deepseek")] router: &str,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let router = if router == "mixtral" {
        RouterConfig::mixtral()
    } else {
        RouterConfig::deepseek_v3(2)
    };
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_train(40);
    let corpus = Corpus::builtin(config.seed, config.corpus_bytes, &ByteTokenizer);
    let run = RunDir::create(&tmp.path().join("run"), false).unwrap();
    let out = train(job(
        config,
        Start::Fresh(tiny_model(router)),
        &corpus,
        run.clone(),
        &device,
    ))
    .unwrap();
    assert!(
        out.final_train_loss < out.first_train_loss - 0.5,
        "{} -> {}",
        out.first_train_loss,
        out.final_train_loss
    );
    let metrics = run.metrics().unwrap();
    assert_eq!(metrics.len(), 4, "an evaluation line every 10 steps");
    assert!(metrics[3]["valid_loss"]["code"].as_f64().unwrap() > 0.0);
    assert!(metrics[3]["routing"]["entropy"].as_f64().unwrap() > 0.0);
    let report = evaluate(&out.model, &corpus, 2, 32, 8);
    assert_eq!(report.tables.len(), 2);
    for table in &report.tables {
        for row in &table.shares {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{row:?}");
        }
        assert!(table.nmi_of_max >= table.nmi && table.nmi_of_max <= 1.0 + 1e-9);
        let cmi = table.conditional_mi.unwrap();
        assert!((0.0..=4f64.ln()).contains(&cmi), "{table:?}");
    }
    assert!(
        report
            .losses
            .iter()
            .all(|l| l.windows == 2 && l.stderr > 0.0)
    );
    // Every evaluated document has a histogram per MoE layer.
    assert!(report.documents.len() >= 4);
    for doc in &report.documents {
        assert_eq!(doc.shares.len(), 2);
        for h in &doc.shares {
            assert!((h.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{h:?}");
        }
    }
    // The final checkpoint loads and carries the trained weights.
    let loaded = checkpoint::load(&out.checkpoint, &device).unwrap();
    assert_eq!(
        values(loaded.model.embed.weight.val()),
        values(out.model.embed.weight.val())
    );
}

fn final_weights(run: &Path, device: &Device) -> Vec<f32> {
    let dir = RunDir::open(run).unwrap().latest().unwrap().unwrap();
    let model = checkpoint::load(&dir, device).unwrap().model;
    let mut all = values(model.embed.weight.val());
    if let moe_model::block::Ffn::Moe(m) = &model.blocks[1].ffn {
        all.extend(values(m.router.gate.weight.val()));
        all.extend(values(m.experts.w_down.val()));
    }
    all
}

#[rstest]
fn resuming_continues_exactly(#[values("mixtral", "deepseek")] router: &str) {
    let router = || match router {
        "mixtral" => RouterConfig::mixtral(),
        _ => RouterConfig::deepseek_v3(2),
    };
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_train(20);
    let corpus = Corpus::builtin(config.seed, config.corpus_bytes, &ByteTokenizer);
    let fresh = || Start::Fresh(tiny_model(router()));
    // 20 steps in one go.
    let straight = tmp.path().join("straight");
    let run = RunDir::create(&straight, false).unwrap();
    train(job(config.clone(), fresh(), &corpus, run, &device)).unwrap();
    // The same run stopped after 10 steps, as an interruption would, then resumed.
    let resumed = tmp.path().join("resumed");
    let run = RunDir::create(&resumed, false).unwrap();
    let mut first = job(config.clone(), fresh(), &corpus, run, &device);
    first.stop_after = Some(10);
    assert!(matches!(train(first), Err(DataError::Interrupted(10))));
    let run = RunDir::open(&resumed).unwrap();
    train(job(config, Start::Resume, &corpus, run, &device)).unwrap();

    let (a, b) = (
        final_weights(&straight, &device),
        final_weights(&resumed, &device),
    );
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "resumed weights differ by {worst}");
    let metrics = |p: &Path| RunDir::open(p).unwrap().metrics().unwrap();
    let (ma, mb) = (metrics(&straight), metrics(&resumed));
    assert_eq!(ma.len(), 2);
    assert_eq!(mb.len(), 2);
    for (x, y) in ma.iter().zip(&mb) {
        let loss = |m: &serde_json::Value| m["train_loss"].as_f64().unwrap();
        assert!((loss(x) - loss(y)).abs() < 1e-5, "{x} vs {y}");
    }
}

/// The gradients the engine gathers from three shards (8 windows split 3/3/2, each loss
/// weighted by its share) are those of the whole batch on one device, and so are the losses.
/// AdamW would hide a gradient off by a constant factor, so they are compared directly.
#[rstest]
fn shard_gradients_sum_to_the_whole_batch_gradient(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let config = tiny_train(1).with_aux_loss_coef(0.0).with_z_loss_coef(0.0);
    let corpus = Corpus::builtin(config.seed, config.corpus_bytes, &ByteTokenizer);
    let model = tiny_model(RouterConfig::mixtral())
        .init_seeded(&device.clone().autodiff(), 3)
        .unwrap();
    let windows = train_windows(&corpus, config.seed, 0, config.batch_size, config.seq_len);
    let step = |devices: Vec<Device>| {
        StepEngine::new(&devices, config.batch_size)
            .unwrap()
            .step(&model, &config, &corpus, &windows)
            .unwrap()
    };
    let (one, three) = (step(vec![device.clone()]), step(vec![device.clone(); 3]));
    assert!(
        (one.loss - three.loss).abs() < 1e-5,
        "{} vs {}",
        one.loss,
        three.loss
    );
    assert!((one.lm - three.lm).abs() < 1e-5);
    let grad = |r: &StepResult, id| values::<2>(r.grads.get(id).expect("a gradient"));
    for id in [model.embed.weight.id, model.blocks[0].attn.q_proj.weight.id] {
        let (a, b) = (grad(&one, id), grad(&three, id));
        let scale = a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let worst = a
            .iter()
            .zip(&b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            scale > 0.0 && worst < 1e-4 * scale,
            "gradients differ by {worst} (scale {scale})"
        );
    }
    let load = |r: &StepResult| values(r.routing[0].1.load.clone());
    assert_eq!(load(&one), load(&three), "the load is summed over shards");
}

/// Data-parallel training (burn-train's multi-device engine, here three workers sharing one
/// device, splitting 8 windows 3/3/2) takes the same steps as one device. The balancing losses
/// are off: they are computed per shard, so with them on the runs differ by design; the bias
/// update (deepseek) sees the summed load and matches.
#[rstest]
fn data_parallel_steps_match_one_device(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
    #[values("mixtral", "deepseek")] router: &str,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let router = || match router {
        "mixtral" => RouterConfig::mixtral(),
        _ => RouterConfig::deepseek_v3(2),
    };
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_train(10).with_aux_loss_coef(0.0).with_z_loss_coef(0.0);
    let corpus = Corpus::builtin(config.seed, config.corpus_bytes, &ByteTokenizer);
    let run = |name: &str, devices: Vec<Device>| {
        let path = tmp.path().join(name);
        let mut job = job(
            config.clone(),
            Start::Fresh(tiny_model(router())),
            &corpus,
            RunDir::create(&path, false).unwrap(),
            &device,
        );
        job.devices = devices;
        train(job).unwrap();
        path
    };
    let one = run("one", vec![device.clone()]);
    let three = run("three", vec![device.clone(); 3]);
    let (a, b) = (final_weights(&one, &device), final_weights(&three, &device));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "data-parallel weights differ by {worst}");
    let loss = |p: &Path| {
        RunDir::open(p).unwrap().metrics().unwrap()[0]["train_loss"]
            .as_f64()
            .unwrap()
    };
    assert!((loss(&one) - loss(&three)).abs() < 1e-4);
}

/// The random-router controls of the end-of-training report: two kinds, each over its draws,
/// reproducible from the seed.
#[rstest]
fn random_router_controls_are_reproducible_and_bounded(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let config = tiny_train(1);
    let corpus = Corpus::builtin(config.seed, config.corpus_bytes, &ByteTokenizer);
    let model = tiny_model(RouterConfig::mixtral())
        .init_seeded(&device, 5)
        .unwrap();
    let controls = || random_router_controls(&model, &corpus, 2, 32, 8, 9, 3).unwrap();
    let first = controls();
    let names: Vec<&str> = first.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["trained model, random routers", "untrained model"]);
    for c in &first {
        assert_eq!(c.nmi.n, 3, "{c:?}");
        assert!(0.0 < c.nmi.mean && c.nmi.mean <= 1.0, "{c:?}");
        assert!(
            c.nmi.half_width > 0.0 && c.nmi.half_width.is_finite(),
            "{c:?}"
        );
        assert!(c.nmi_of_max.mean >= c.nmi.mean, "{c:?}");
        assert!(c.conditional_mi.is_some_and(|i| i.mean >= 0.0), "{c:?}");
        assert_eq!(c.layers.len(), 2);
        let layer_mean = c.layers.iter().sum::<f64>() / 2.0;
        assert!((layer_mean - c.nmi.mean).abs() < 1e-9, "{c:?}");
        let cmi = c.layers_conditional_mi.as_ref().expect("token choice");
        assert_eq!(cmi.len(), 2);
        let cmi_mean = cmi.iter().sum::<f64>() / 2.0;
        assert!(
            (cmi_mean - c.conditional_mi.unwrap().mean).abs() < 1e-9,
            "{c:?}"
        );
    }
    let again = controls();
    for (a, b) in first.iter().zip(&again) {
        assert_eq!(a.nmi, b.nmi, "same seed, same draws");
        assert_eq!(a.layers_conditional_mi, b.layers_conditional_mi);
    }
}

#[test]
fn a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let run_path = tmp.path().join("run");
    let corpus = Corpus::builtin(42, 20_000, &ByteTokenizer);
    train(job(
        tiny_train(10),
        Start::Fresh(tiny_model(RouterConfig::mixtral())),
        &corpus,
        RunDir::create(&run_path, false).unwrap(),
        &device,
    ))
    .unwrap();
    let run = RunDir::open(&run_path).unwrap();
    let good = run.latest().unwrap().unwrap();
    // Poison the weights of the latest checkpoint, as a diverged run would.
    let mut model = checkpoint::load(&good, &device).unwrap().model;
    let w = model.embed.weight.val();
    model.embed.weight = Param::from_tensor(w.clone() / w.zeros_like());
    model.save_file(good.join(WEIGHTS_FILE)).unwrap();
    let err = train(job(
        tiny_train(20),
        Start::Resume,
        &corpus,
        run.clone(),
        &device,
    ))
    .unwrap_err();
    assert!(
        matches!(err, DataError::NonFinite { step: 11, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("step 11"));
    assert_eq!(
        run.latest().unwrap().unwrap(),
        good,
        "no checkpoint written after the fault"
    );
    assert_eq!(run.metrics().unwrap().len(), 1);
}

#[test]
fn router_only_training_freezes_everything_else() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let corpus = Corpus::builtin(42, 20_000, &ByteTokenizer);
    let base = tmp.path().join("base");
    let model = tiny_model(RouterConfig::mixtral()).init(&device).unwrap();
    checkpoint::save(&base, &model, None, false).unwrap();
    let config = tiny_train(10).with_train(moe_train::TrainPart::Router);
    let out = train(job(
        config,
        Start::From(base.clone()),
        &corpus,
        RunDir::create(&tmp.path().join("ft"), false).unwrap(),
        &device,
    ))
    .unwrap();
    let before = checkpoint::load(&base, &device).unwrap().model;
    assert_eq!(
        values(out.model.embed.weight.val()),
        values(before.embed.weight.val())
    );
    for (a, b) in out.model.blocks.iter().zip(&before.blocks) {
        assert_eq!(
            values(a.attn.q_proj.weight.val()),
            values(b.attn.q_proj.weight.val())
        );
        if let (moe_model::block::Ffn::Moe(x), moe_model::block::Ffn::Moe(y)) = (&a.ffn, &b.ffn) {
            assert_eq!(values(x.experts.w_up.val()), values(y.experts.w_up.val()));
            assert_ne!(
                values(x.router.gate.weight.val()),
                values(y.router.gate.weight.val()),
                "the router trains"
            );
        }
    }
}

#[test]
fn an_existing_run_is_not_overwritten_without_permission() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("run");
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("metrics.jsonl"), "{\"step\": 1}\n").unwrap();
    let err = RunDir::create(&path, false).unwrap_err().to_string();
    assert!(err.contains("--overwrite"), "{err}");
    assert_eq!(
        std::fs::read_to_string(path.join("metrics.jsonl")).unwrap(),
        "{\"step\": 1}\n"
    );
    RunDir::create(&path, true).unwrap();
    assert!(!path.join("metrics.jsonl").exists());
}
