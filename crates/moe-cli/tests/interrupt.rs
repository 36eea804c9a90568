//! Interrupted training: SIGKILL at arbitrary moments never leaves a half-written checkpoint
//! visible and `--resume` always continues; SIGINT finishes the step, saves and exits with 130.
#![cfg(unix)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: usize = 120;

fn model_config(dir: &Path) -> String {
    let path = dir.join("model.json");
    std::fs::write(
        &path,
        r#"{"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64,
            "max_seq_len": 32, "moe": {"d_model": 32, "d_ff": 32, "n_experts": 4}}"#,
    )
    .unwrap();
    path.display().to_string()
}

fn start(run: &Path, model: &str, resume: bool) -> Child {
    let run = run.display().to_string();
    let steps = STEPS.to_string();
    let mut args = vec![
        "train",
        "--out",
        &run,
        "--steps",
        &steps,
        "--quiet",
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--eval-every",
        "20",
        "--checkpoint-every",
        "3",
    ];
    if resume {
        args.push("--resume");
    } else {
        args.extend(["--model-config", model, "--overwrite"]);
    }
    Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start moe")
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
    // SAFETY: kill(2) on our own child's pid; it has not been waited for, so the pid is live.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

/// The step of the run's latest checkpoint, after checking that it loads.
fn latest_step(run: &Path) -> Option<usize> {
    let rel = std::fs::read_to_string(run.join("latest")).ok()?;
    let dir = run.join(rel.trim());
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("trainer.json")).unwrap()).unwrap();
    let device = burn::tensor::Device::flex();
    moe_model::checkpoint::load(&dir, &device)
        .unwrap_or_else(|e| panic!("latest checkpoint does not load: {e}"));
    Some(state["step"].as_u64().unwrap() as usize)
}

/// Waits until the run has a checkpoint past `step`, or the process ends.
fn wait_for_checkpoint_after(run: &Path, step: usize, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        if std::fs::read_to_string(run.join("latest"))
            .ok()
            .and_then(|r| r.trim().rsplit('-').next()?.parse::<usize>().ok())
            .is_some_and(|s| s > step)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("no checkpoint after step {step} within two minutes");
}

#[test]
fn sigkill_at_any_moment_then_resume_reaches_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_config(tmp.path());
    let run = tmp.path().join("run");
    // Deterministic "random" kill delays after a checkpoint appears: some land mid-step, some
    // while a checkpoint is being written.
    let delays_ms = [0u64, 7, 31, 3, 55, 13, 90, 1];
    let mut last = 0;
    for (i, delay) in delays_ms.iter().enumerate() {
        let mut child = start(&run, &model, i > 0);
        wait_for_checkpoint_after(&run, last, &mut child);
        std::thread::sleep(Duration::from_millis(*delay));
        let finished = child.try_wait().unwrap().is_some();
        if !finished {
            signal(&child, libc::SIGKILL);
        }
        child.wait().unwrap();
        let step = latest_step(&run).expect("a checkpoint survives");
        assert!(step >= last, "checkpoints never go back: {last} -> {step}");
        last = step;
        if finished {
            break;
        }
    }
    // Resume to the end.
    let mut child = start(&run, &model, true);
    let status = child.wait().unwrap();
    if last < STEPS {
        assert!(status.success(), "final resume failed");
    }
    assert_eq!(latest_step(&run), Some(STEPS));
    // Metrics hold each evaluation step once, in order.
    let steps: Vec<u64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        steps,
        (1..=STEPS as u64 / 20).map(|i| i * 20).collect::<Vec<_>>()
    );
    // Nothing half-written is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("step-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn sigint_finishes_the_step_saves_and_exits_130() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_config(tmp.path());
    let run = tmp.path().join("run");
    let mut child = start(&run, &model, false);
    wait_for_checkpoint_after(&run, 0, &mut child);
    signal(&child, libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted at step"), "{err}");
    assert!(
        !err.contains("error"),
        "an interruption is not an error: {err}"
    );
    // The checkpoint of the step it stopped at is the latest.
    let said: usize = err
        .split("interrupted at step ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .and_then(|n| n.trim().parse().ok())
        .expect("the step is reported");
    assert_eq!(latest_step(&run), Some(said));
    let o = start(&run, &model, true).wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(latest_step(&run), Some(STEPS));
}
