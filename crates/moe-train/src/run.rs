//! A run directory: `train.json`, `metrics.jsonl`, versioned checkpoints under `checkpoints/`,
//! and `latest`, a pointer to the newest complete checkpoint that is replaced atomically (write a
//! temporary file, then rename), so an interrupted run always resumes from a whole checkpoint.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use moe_model::{checkpoint, durable};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::error::{DataError, Result};

/// Trainer state saved beside the model in each checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Steps completed.
    pub step: usize,
    /// Domain names, in label order.
    pub domains: Vec<String>,
    /// Where the data came from: "builtin" or the `--data` directory.
    pub data: String,
    /// The run's training configuration (its corpus settings, window length and evaluation
    /// windows), so that an evaluation of the checkpoint rebuilds the same validation text.
    /// Absent in checkpoints written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<TrainConfig>,
}

/// The trainer state file in a checkpoint.
pub const STATE_FILE: &str = "trainer.json";
impl TrainerState {
    /// Reads the trainer state of checkpoint `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
        let malformed = |e| DataError::run(&path, format!("malformed trainer state: {e}"));
        let mut found: serde_json::Value = serde_json::from_str(&text).map_err(malformed)?;
        if let Some(train) = found.get_mut("train") {
            fill_train_defaults(train);
        }
        serde_json::from_value(found).map_err(malformed)
    }
}

/// Fills the fields added to [`TrainConfig`] since `found` was written with their defaults.
fn fill_train_defaults(found: &mut serde_json::Value) {
    let defaults = serde_json::to_value(TrainConfig::new()).expect("a config always serialises");
    moe_model::fill_defaults(found, &defaults);
}

/// The training configuration file of a run directory.
pub const TRAIN_CONFIG_FILE: &str = "train.json";
/// The optimizer state file in a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";

/// The checkpoint a run continues from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latest {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Why it is not the checkpoint the `latest` pointer names, when it is not: for the user.
    pub warning: Option<String>,
}

/// A run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    /// Its path.
    pub path: PathBuf,
}

impl RunDir {
    /// Opens `path` for a new run. An existing non-empty directory is refused unless `overwrite`,
    /// in which case its old checkpoints and metrics are removed first.
    pub fn create(path: &Path, overwrite: bool) -> Result<Self> {
        if path.exists() {
            if !path.is_dir() {
                return Err(DataError::run(path, "exists and is not a directory"));
            }
            let non_empty = fs::read_dir(path)
                .map_err(|e| DataError::io(path, e))?
                .next()
                .is_some();
            if non_empty && !overwrite {
                return Err(DataError::run(
                    path,
                    "already exists; pass --overwrite to replace it, or --resume to continue it",
                ));
            }
            if non_empty {
                for name in ["checkpoints", "latest", "metrics.jsonl", TRAIN_CONFIG_FILE] {
                    let p = path.join(name);
                    let removed = if p.is_dir() {
                        fs::remove_dir_all(&p)
                    } else {
                        fs::remove_file(&p)
                    };
                    match removed {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(DataError::io(&p, e));
                        }
                        _ => {}
                    }
                }
            }
        }
        fs::create_dir_all(path.join("checkpoints")).map_err(|e| DataError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// Opens an existing run to resume it.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_dir() {
            return Err(DataError::run(path, "no such run directory to resume"));
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// Removes what a killed run left half-written: staging directories of checkpoints
    /// (`checkpoints/.step-*.partial-*`) and temporary files (`*.tmp-*`). Never touches a
    /// complete checkpoint. Call only when no other process writes to the run.
    pub fn remove_stale(&self) -> Result<()> {
        for dir in [self.path.clone(), self.path.join("checkpoints")] {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(DataError::io(&dir, e)),
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                let removed = if name.starts_with('.') && name.contains(".partial-") {
                    fs::remove_dir_all(&path)
                } else if name.contains(".tmp-") && path.is_file() {
                    fs::remove_file(&path)
                } else {
                    continue;
                };
                removed.map_err(|e| DataError::io(&path, e))?;
            }
        }
        Ok(())
    }

    /// Records the run's training configuration (`train.json`), which `--resume` reads back.
    pub fn write_config(&self, config: &TrainConfig) -> Result<()> {
        let json = serde_json::to_string_pretty(config).expect("a config always serialises");
        write_atomic(&self.path.join(TRAIN_CONFIG_FILE), json.as_bytes())
    }

    /// Reads the run's training configuration back.
    pub fn read_config(&self) -> Result<TrainConfig> {
        let path = self.path.join(TRAIN_CONFIG_FILE);
        let text = fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
        let malformed = |e| DataError::run(&path, format!("malformed training config: {e}"));
        let mut found: serde_json::Value = serde_json::from_str(&text).map_err(malformed)?;
        fill_train_defaults(&mut found);
        serde_json::from_value(found).map_err(malformed)
    }

    /// The directory a checkpoint of `step` is written to.
    pub fn checkpoint_dir(&self, step: usize) -> PathBuf {
        self.path
            .join("checkpoints")
            .join(format!("step-{step:07}"))
    }

    /// The checkpoint to continue from, if any: the one `latest` names, or the newest complete
    /// one when `latest` names a missing or incomplete checkpoint (or is itself missing while
    /// checkpoints exist). The caller tells the user about a fallback; see [`Self::find_latest`].
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        Ok(self.find_latest()?.map(|l| l.dir))
    }

    /// [`Self::latest`], with a warning when it is not the checkpoint `latest` names.
    pub fn find_latest(&self) -> Result<Option<Latest>> {
        let pointer = self.path.join("latest");
        let named = match fs::read_to_string(&pointer) {
            Ok(rel) => Some(self.path.join(rel.trim())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(DataError::io(pointer, e)),
        };
        let problem = match &named {
            Some(dir) if is_complete(dir) => {
                return Ok(Some(Latest {
                    dir: dir.clone(),
                    warning: None,
                }));
            }
            Some(dir) if dir.is_dir() => {
                format!("points to {}, which is incomplete", dir.display())
            }
            Some(dir) => format!("points to {}, which is missing", dir.display()),
            None => "is missing".to_string(),
        };
        match (self.newest_complete()?, named) {
            (Some(dir), _) => Ok(Some(Latest {
                warning: Some(format!(
                    "{}: {problem}; using {}, the newest complete checkpoint",
                    pointer.display(),
                    dir.display()
                )),
                dir,
            })),
            (None, None) => Ok(None),
            (None, Some(_)) => Err(DataError::run(
                &pointer,
                format!("{problem}, and no complete checkpoint is left"),
            )),
        }
    }

    /// The checkpoint directories (`checkpoints/step-*`), oldest first.
    fn checkpoints(&self) -> Result<Vec<PathBuf>> {
        let dir = self.path.join("checkpoints");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(DataError::io(&dir, e)),
        };
        let mut steps: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
            })
            .collect();
        steps.sort();
        Ok(steps)
    }

    /// The newest checkpoint that [`is_complete`].
    fn newest_complete(&self) -> Result<Option<PathBuf>> {
        Ok(self
            .checkpoints()?
            .into_iter()
            .rev()
            .find(|d| is_complete(d)))
    }

    /// Points `latest` at a committed checkpoint and removes all but the newest `keep`.
    pub fn set_latest(&self, checkpoint: &Path, keep: usize) -> Result<()> {
        let rel = checkpoint.strip_prefix(&self.path).unwrap_or(checkpoint);
        write_atomic(&self.path.join("latest"), rel.to_string_lossy().as_bytes())?;
        let steps = self.checkpoints()?;
        for old in steps.iter().rev().skip(keep) {
            if old != checkpoint {
                fs::remove_dir_all(old).map_err(|e| DataError::io(old, e))?;
            }
        }
        Ok(())
    }

    /// Appends one JSON line to `metrics.jsonl`.
    pub fn append_metrics(&self, line: &serde_json::Value) -> Result<()> {
        let path = self.path.join("metrics.jsonl");
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| DataError::io(&path, e))?;
        writeln!(f, "{line}").map_err(|e| DataError::io(&path, e))
    }

    /// Reads back every metrics line.
    pub fn metrics(&self) -> Result<Vec<serde_json::Value>> {
        let path = self.path.join("metrics.jsonl");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(DataError::io(path, e)),
        };
        // A line cut by a crash is skipped, not fatal.
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// Drops metrics lines past `step` (from a run that died after its last checkpoint).
    pub fn truncate_metrics(&self, step: usize) -> Result<()> {
        let kept: Vec<String> = self
            .metrics()?
            .into_iter()
            .filter(|m| m["step"].as_u64().is_some_and(|s| s as usize <= step))
            .map(|m| m.to_string() + "\n")
            .collect();
        write_atomic(&self.path.join("metrics.jsonl"), kept.concat().as_bytes())
    }
}

/// Writes a file by writing a temporary sibling (`NAME.tmp-PID`) and renaming it over the target,
/// synced to the disk (the file, then the directory after the rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(durable::write_atomic(path, bytes)?)
}

/// Whether a run's checkpoint is whole: model, trainer state and optimizer state.
fn is_complete(dir: &Path) -> bool {
    checkpoint::is_complete(dir) && checkpoint::has_files(dir, &[STATE_FILE, OPTIMIZER_FILE])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run with checkpoints at `steps`, the complete ones marked `true`.
    fn run_with(steps: &[(usize, bool)]) -> (tempfile::TempDir, RunDir) {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(&tmp.path().join("run"), false).unwrap();
        for &(step, complete) in steps {
            let dir = run.checkpoint_dir(step);
            fs::create_dir_all(&dir).unwrap();
            let files = [
                checkpoint::CONFIG_FILE,
                checkpoint::WEIGHTS_FILE,
                STATE_FILE,
            ];
            for name in files.iter().chain(complete.then_some(&OPTIMIZER_FILE)) {
                fs::write(dir.join(name), "x").unwrap();
            }
        }
        (tmp, run)
    }

    fn point_at(run: &RunDir, step: usize) {
        let rel = run.checkpoint_dir(step);
        let rel = rel.strip_prefix(&run.path).unwrap();
        write_atomic(&run.path.join("latest"), rel.to_string_lossy().as_bytes()).unwrap();
    }

    /// Training configs and trainer states written before a field existed read back with its
    /// default; the values they hold are kept.
    #[test]
    fn configs_from_older_runs_take_defaults_for_new_fields() {
        let (_tmp, run) = run_with(&[]);
        let config = TrainConfig::new().with_steps(7).with_corpus_seed(5);
        let mut old = serde_json::to_value(&config).unwrap();
        old.as_object_mut()
            .unwrap()
            .remove("report_windows")
            .unwrap();
        fs::write(run.path.join(TRAIN_CONFIG_FILE), old.to_string()).unwrap();
        assert_eq!(run.read_config().unwrap(), config);

        let state =
            serde_json::json!({"step": 3, "domains": ["a"], "data": "builtin", "train": old});
        fs::write(run.path.join(STATE_FILE), state.to_string()).unwrap();
        let read = TrainerState::read(&run.path).unwrap();
        assert_eq!((read.step, read.train), (3, Some(config)));
    }

    #[test]
    fn latest_names_a_complete_checkpoint() {
        let (_tmp, run) = run_with(&[(1, true), (2, true)]);
        point_at(&run, 1);
        let latest = run.find_latest().unwrap().unwrap();
        assert_eq!(latest.dir, run.checkpoint_dir(1));
        assert_eq!(latest.warning, None);
    }

    #[test]
    fn a_missing_checkpoint_falls_back_to_the_newest_complete_one_with_a_warning() {
        let (_tmp, run) = run_with(&[(1, true), (2, true), (3, false)]);
        for (named, problem) in [(4, "which is missing"), (3, "which is incomplete")] {
            point_at(&run, named);
            let latest = run.find_latest().unwrap().unwrap();
            assert_eq!(latest.dir, run.checkpoint_dir(2));
            let warning = latest.warning.unwrap();
            assert!(warning.contains(problem), "{warning}");
            assert!(warning.contains("step-0000002"), "{warning}");
            assert_eq!(run.latest().unwrap(), Some(run.checkpoint_dir(2)));
        }
    }

    #[test]
    fn a_missing_pointer_falls_back_too_and_nothing_to_fall_back_to_is_an_error() {
        let (_tmp, run) = run_with(&[(1, true)]);
        let latest = run.find_latest().unwrap().unwrap();
        assert_eq!(latest.dir, run.checkpoint_dir(1));
        assert!(latest.warning.unwrap().contains("latest: is missing"));
        let (_tmp, empty) = run_with(&[(1, false)]);
        assert!(
            empty.find_latest().unwrap().is_none(),
            "a run with no checkpoint yet"
        );
        point_at(&empty, 1);
        let err = empty.find_latest().unwrap_err().to_string();
        assert!(err.contains("no complete checkpoint is left"), "{err}");
    }
}
