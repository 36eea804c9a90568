//! Checkpoints: a directory with `config.json`, `model.bpk` (Burn's burnpack), `tokenizer.json`
//! and, where a trainer saved it, training state.
//!
//! Writing is atomic: files go into a hidden sibling directory that is renamed into place only
//! once complete, so a crash never leaves a partial checkpoint under the final name.

use std::fs;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::*;
use burn::store::ModuleRecord;
use burn::store::{ModuleSnapshot, SafetensorsStore};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::model::MoeLm;

/// The model configuration file.
pub const CONFIG_FILE: &str = "config.json";
/// The weights file.
pub const WEIGHTS_FILE: &str = "model.bpk";
/// The tokenizer description file.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Builds a checkpoint in a temporary directory and moves it into place on [`commit`].
///
/// Dropping the writer without committing removes the temporary directory.
///
/// [`commit`]: CheckpointWriter::commit
#[derive(Debug)]
pub struct CheckpointWriter {
    target: PathBuf,
    staging: PathBuf,
    committed: bool,
}

impl CheckpointWriter {
    /// Starts a checkpoint that will appear at `target`.
    pub fn new(target: impl Into<PathBuf>) -> Result<Self> {
        let target = target.into();
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(|e| ModelError::io(&parent, e))?;
        let name = target
            .file_name()
            .ok_or_else(|| ModelError::checkpoint(&target, "a checkpoint needs a directory name"))?
            .to_string_lossy()
            .into_owned();
        let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(|e| ModelError::io(&staging, e))?;
        }
        fs::create_dir(&staging).map_err(|e| ModelError::io(&staging, e))?;
        Ok(Self {
            target,
            staging,
            committed: false,
        })
    }

    /// The temporary directory, for callers that add files of their own.
    pub fn dir(&self) -> &Path {
        &self.staging
    }

    /// Writes the config and the weights.
    pub fn write_model(&self, model: &MoeLm) -> Result<()> {
        self.write_text(CONFIG_FILE, &model.config.to_json())?;
        let path = self.staging.join(WEIGHTS_FILE);
        model
            .clone()
            .save_file(&path)
            .map_err(|e| ModelError::checkpoint(&path, format!("cannot write weights: {e}")))
    }

    /// Writes a value as pretty JSON.
    pub fn write_json<T: serde::Serialize>(&self, name: &str, value: &T) -> Result<()> {
        let text = serde_json::to_string_pretty(value).map_err(|source| ModelError::Json {
            path: self.staging.join(name),
            source,
        })?;
        self.write_text(name, &text)
    }

    /// Writes a text file.
    pub fn write_text(&self, name: &str, text: &str) -> Result<()> {
        let path = self.staging.join(name);
        fs::write(&path, text).map_err(|e| ModelError::io(&path, e))
    }

    /// Moves the checkpoint into place. An existing checkpoint at the target is replaced only
    /// with `overwrite`; it stays whole until the new one is complete.
    pub fn commit(mut self, overwrite: bool) -> Result<PathBuf> {
        if self.target.exists() {
            if !overwrite {
                return Err(ModelError::checkpoint(
                    &self.target,
                    "already exists (pass --overwrite to replace it)",
                ));
            }
            let old = self.staging.with_extension("old");
            fs::rename(&self.target, &old).map_err(|e| ModelError::io(&self.target, e))?;
            fs::rename(&self.staging, &self.target).map_err(|e| ModelError::io(&self.target, e))?;
            fs::remove_dir_all(&old).map_err(|e| ModelError::io(&old, e))?;
        } else {
            fs::rename(&self.staging, &self.target).map_err(|e| ModelError::io(&self.target, e))?;
        }
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.staging);
        }
    }
}

/// Saves a model (and an optional tokenizer description) as a checkpoint directory.
pub fn save(
    dir: &Path,
    model: &MoeLm,
    tokenizer: Option<&serde_json::Value>,
    overwrite: bool,
) -> Result<PathBuf> {
    save_with(dir, model, tokenizer, &[], overwrite)
}

/// [`save`] with extra JSON files (name, content) in the checkpoint.
pub fn save_with(
    dir: &Path,
    model: &MoeLm,
    tokenizer: Option<&serde_json::Value>,
    extra: &[(&str, serde_json::Value)],
    overwrite: bool,
) -> Result<PathBuf> {
    let writer = CheckpointWriter::new(dir)?;
    writer.write_model(model)?;
    if let Some(t) = tokenizer {
        writer.write_json(TOKENIZER_FILE, t)?;
    }
    for (name, value) in extra {
        writer.write_json(name, value)?;
    }
    writer.commit(overwrite)
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// The model, on the requested device.
    pub model: MoeLm,
    /// The tokenizer description, if the checkpoint has one.
    pub tokenizer: Option<serde_json::Value>,
    /// Where it was loaded from.
    pub dir: PathBuf,
}

/// Checks that `dir` is a directory holding a checkpoint.
fn require_dir(dir: &Path) -> Result<()> {
    let meta = fs::metadata(dir).map_err(|e| ModelError::io(dir, e))?;
    if !meta.is_dir() {
        return Err(ModelError::checkpoint(
            dir,
            "is a file, expected a checkpoint directory",
        ));
    }
    Ok(())
}

/// Reads just the configuration of a checkpoint directory.
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    require_dir(dir)?;
    ModelConfig::load_json(&dir.join(CONFIG_FILE))
}

/// Loads a checkpoint directory onto `device`, validating config and weights against each other.
pub fn load(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let config = load_config(dir)?;
    let model = load_weights(config.init(device)?, &dir.join(WEIGHTS_FILE))?;
    let tokenizer_path = dir.join(TOKENIZER_FILE);
    let tokenizer = if tokenizer_path.exists() {
        let text =
            fs::read_to_string(&tokenizer_path).map_err(|e| ModelError::io(&tokenizer_path, e))?;
        Some(
            serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: tokenizer_path,
                source,
            })?,
        )
    } else {
        None
    };
    Ok(Checkpoint {
        model,
        tokenizer,
        dir: dir.to_path_buf(),
    })
}

/// Loads weights from a burnpack file into a module built from the matching config.
pub fn load_weights<M: Module>(module: M, path: &Path) -> Result<M> {
    let meta = fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if meta.is_dir() {
        return Err(ModelError::checkpoint(
            path,
            "is a directory, expected a weights file",
        ));
    }
    if meta.len() == 0 {
        return Err(ModelError::checkpoint(path, "is empty"));
    }
    let record = ModuleRecord::load(path).map_err(|e| {
        ModelError::checkpoint(path, format!("not a readable burnpack weights file ({e})"))
    })?;
    module.try_load_record(record).map_err(|e| {
        ModelError::checkpoint(
            path,
            format!(
                "weights do not fit {CONFIG_FILE} ({})",
                brief(&e.to_string())
            ),
        )
    })
}

/// The start of a long message (a record error lists every mismatched tensor).
fn brief(message: &str) -> String {
    const LIMIT: usize = 200;
    if message.len() <= LIMIT {
        return message.to_string();
    }
    let mut end = LIMIT;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &message[..end])
}

/// Exports the weights as a safetensors file (tensor names are the module paths).
pub fn export_safetensors(model: &MoeLm, path: &Path) -> Result<()> {
    let mut store = SafetensorsStore::from_file(path).overwrite(true);
    model
        .save_into(&mut store)
        .map_err(|e| ModelError::checkpoint(path, format!("cannot write safetensors: {e}")))
}
