//! A run directory: `train.json`, `metrics.jsonl`, versioned checkpoints under `checkpoints/`,
//! and `latest`, a pointer to the newest complete checkpoint that is replaced atomically (write a
//! temporary file, then rename), so an interrupted run always resumes from a whole checkpoint.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use moe_model::durable;
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
}

/// The trainer state file in a checkpoint.
pub const STATE_FILE: &str = "trainer.json";
impl TrainerState {
    /// Reads the trainer state of checkpoint `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| DataError::run(&path, format!("malformed trainer state: {e}")))
    }
}

/// The training configuration file of a run directory.
pub const TRAIN_CONFIG_FILE: &str = "train.json";
/// The optimizer state file in a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";

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
        serde_json::from_str(&text)
            .map_err(|e| DataError::run(&path, format!("malformed training config: {e}")))
    }

    /// The directory a checkpoint of `step` is written to.
    pub fn checkpoint_dir(&self, step: usize) -> PathBuf {
        self.path
            .join("checkpoints")
            .join(format!("step-{step:07}"))
    }

    /// The newest complete checkpoint, if any.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        let pointer = self.path.join("latest");
        match fs::read_to_string(&pointer) {
            Ok(rel) => {
                let dir = self.path.join(rel.trim());
                if !dir.is_dir() {
                    return Err(DataError::run(
                        &pointer,
                        format!("points to {}, which is missing", dir.display()),
                    ));
                }
                Ok(Some(dir))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DataError::io(pointer, e)),
        }
    }

    /// Points `latest` at a committed checkpoint and removes all but the newest `keep`.
    pub fn set_latest(&self, checkpoint: &Path, keep: usize) -> Result<()> {
        let rel = checkpoint.strip_prefix(&self.path).unwrap_or(checkpoint);
        write_atomic(&self.path.join("latest"), rel.to_string_lossy().as_bytes())?;
        let dir = self.path.join("checkpoints");
        let mut steps: Vec<PathBuf> = fs::read_dir(&dir)
            .map_err(|e| DataError::io(&dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
            })
            .collect();
        steps.sort();
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
