//! Checkpoints: a directory with `config.json`, `model.bpk` (Burn's burnpack), `tokenizer.json`
//! and, where a trainer saved it, training state.
//!
//! Writing is atomic and durable: files go into a hidden sibling directory that is synced to the
//! disk and renamed into place only once complete, so a crash or a power cut never leaves a
//! partial checkpoint under the final name.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::Module;
use burn::prelude::*;
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::DType;

use crate::block::Ffn;
use crate::config::ModelConfig;
use crate::durable;
use crate::error::{ModelError, Result};
use crate::model::MoeLm;
use crate::store::{ColdLayer, ColdWeight, ExpertStore, LayerSource, StoreConfig};
use crate::weights;

/// The model configuration file.
pub const CONFIG_FILE: &str = "config.json";
/// The weights file.
pub const WEIGHTS_FILE: &str = "model.bpk";
/// The tokenizer description file.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Marks a staging directory: `.NAME.partial-PID-N` beside the checkpoint `NAME`.
const STAGING_MARK: &str = ".partial-";
/// Marks a checkpoint moved aside while its replacement is renamed in: `.NAME.old-PID-N`.
const OLD_MARK: &str = ".old-";

/// Builds a checkpoint in a temporary directory and moves it into place on [`commit`].
///
/// The temporary directory (`.NAME.partial-PID-N`) and the name an overwritten checkpoint is
/// moved aside to (`.NAME.old-PID-N`) are unique to the writer. Starting a writer cleans up what
/// dead writers left in the same directory. Dropping the writer without committing removes its
/// temporary directory.
///
/// [`commit`]: CheckpointWriter::commit
#[derive(Debug)]
pub struct CheckpointWriter {
    target: PathBuf,
    staging: PathBuf,
    old: PathBuf,
    committed: bool,
}

impl CheckpointWriter {
    /// Starts a checkpoint that will appear at `target`.
    pub fn new(target: impl Into<PathBuf>) -> Result<Self> {
        let target = target.into();
        let parent = durable::parent_dir(&target);
        fs::create_dir_all(&parent).map_err(|e| ModelError::io(&parent, e))?;
        let name = target
            .file_name()
            .ok_or_else(|| ModelError::checkpoint(&target, "a checkpoint needs a directory name"))?
            .to_string_lossy()
            .into_owned();
        remove_leftovers(&parent);
        let suffix = durable::unique_suffix();
        let staging = parent.join(format!(".{name}{STAGING_MARK}{suffix}"));
        let old = parent.join(format!(".{name}{OLD_MARK}{suffix}"));
        fs::create_dir(&staging).map_err(|e| ModelError::io(&staging, e))?;
        Ok(Self {
            target,
            staging,
            old,
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
        weights::save_burnpack(model, &self.staging.join(WEIGHTS_FILE))
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
    ///
    /// Every file of the checkpoint and its directory are synced to the disk first, and the
    /// parent directory after each rename, so that a power cut leaves either the previous
    /// checkpoint or the new one, whole.
    pub fn commit(mut self, overwrite: bool) -> Result<PathBuf> {
        let replace = self.target.exists();
        if replace && !overwrite {
            return Err(ModelError::checkpoint(
                &self.target,
                "already exists (pass --overwrite to replace it)",
            ));
        }
        durable::sync_tree(&self.staging)?;
        if replace {
            self.replace()?;
        } else {
            durable::rename(&self.staging, &self.target)?;
        }
        self.committed = true;
        Ok(self.target.clone())
    }

    /// Moves the existing checkpoint aside, renames the new one in, and removes the old one. If
    /// the new one cannot be renamed in, the old one is put back.
    fn replace(&self) -> Result<()> {
        durable::rename(&self.target, &self.old)?;
        if let Err(e) = durable::rename(&self.staging, &self.target) {
            let _ = durable::rename(&self.old, &self.target);
            return Err(e);
        }
        fs::remove_dir_all(&self.old).map_err(|e| ModelError::io(&self.old, e))
    }
}

/// A directory a checkpoint writer works in, recognised by its name.
#[derive(Debug, PartialEq, Eq)]
enum Leftover {
    /// A checkpoint being written (`.NAME.partial-PID-N`).
    Staging,
    /// The checkpoint `NAME`, moved aside to be replaced (`.NAME.old-PID-N`).
    Old(String),
}

/// Reads a writer's directory name: what it is and the id of the process that made it. Names
/// of older versions without the counter (`.NAME.partial-PID`) are recognised too.
fn parse_leftover(file_name: &str) -> Option<(Leftover, u32)> {
    let rest = file_name.strip_prefix('.')?;
    let (kind, tail) = if let Some((_, tail)) = rest.rsplit_once(STAGING_MARK) {
        (Leftover::Staging, tail)
    } else {
        let (name, tail) = rest.rsplit_once(OLD_MARK)?;
        (Leftover::Old(name.to_string()), tail)
    };
    let (pid, counter) = tail.split_once('-').unwrap_or((tail, "0"));
    counter.parse::<u64>().ok()?;
    let pid = pid.parse().ok()?;
    match &kind {
        Leftover::Old(name) if name.is_empty() => None,
        _ => Some((kind, pid)),
    }
}

/// Cleans up after checkpoint writers in `parent` whose process has ended (a crash, a kill):
/// removes their staging directories, and removes a checkpoint they had moved aside to replace,
/// or puts it back when its replacement never arrived. Directories of running processes, this
/// one included, are left alone. Best effort: what cannot be cleaned now is left for the next
/// save.
fn remove_leftovers(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((kind, pid)) = parse_leftover(&name) else {
            continue;
        };
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir || pid == std::process::id() || durable::process_alive(pid) {
            continue;
        }
        let _ = clean_leftover(parent, &entry.path(), kind);
    }
}

/// Removes one leftover of a dead writer (or restores the checkpoint it had moved aside).
fn clean_leftover(parent: &Path, path: &Path, kind: Leftover) -> Result<()> {
    match kind {
        Leftover::Old(name) if !parent.join(&name).exists() => {
            durable::rename(path, &parent.join(name))
        }
        _ => fs::remove_dir_all(path).map_err(|e| ModelError::io(path, e)),
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
    let writer = CheckpointWriter::new(dir)?;
    writer.write_model(model)?;
    if let Some(t) = tokenizer {
        writer.write_json(TOKENIZER_FILE, t)?;
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

impl Checkpoint {
    /// The checkpoint with its model laid out for inference ([`MoeLm::for_inference`]).
    pub fn for_inference(mut self) -> Self {
        self.model = self.model.for_inference();
        self
    }
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

/// Whether `dir` holds a whole checkpoint: a non-empty config and weights file. Cheap (no
/// parsing); a damaged file still shows when the checkpoint is loaded.
pub fn is_complete(dir: &Path) -> bool {
    has_files(dir, &[CONFIG_FILE, WEIGHTS_FILE])
}

/// Whether every one of `names` is a non-empty file in `dir`.
pub fn has_files(dir: &Path, names: &[&str]) -> bool {
    names
        .iter()
        .all(|name| fs::metadata(dir.join(name)).is_ok_and(|m| m.is_file() && m.len() > 0))
}

/// Reads just the configuration of a checkpoint directory.
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    require_dir(dir)?;
    ModelConfig::load_json(&dir.join(CONFIG_FILE))
}

/// Loads a checkpoint directory onto `device`, validating config and weights against each other.
/// Weights stored in another dtype (an import kept in bf16, say) are converted to f32, the
/// dtype the model computes in, one tensor at a time.
pub fn load(dir: &Path, device: &Device) -> Result<Checkpoint> {
    load_as(dir, device, Some(DType::F32))
}

/// [`load`] with the weights in `dtype`, or with `None` as stored.
///
/// The model is built from the stored tensors directly: nothing is drawn at random first, and
/// the weights file is read tensor by tensor, so peak memory is the model plus one tensor.
pub fn load_as(dir: &Path, device: &Device, dtype: Option<DType>) -> Result<Checkpoint> {
    let config = load_config(dir)?;
    let model = load_weights(config.skeleton(device)?, &dir.join(WEIGHTS_FILE), dtype)?;
    Ok(Checkpoint {
        model,
        tokenizer: load_tokenizer_spec(dir)?,
        dir: dir.to_path_buf(),
    })
}

/// Loads a checkpoint directory onto `device` with its routed experts paged: they stay in the
/// weights file, and an [`ExpertStore`] keeps at most `config.budget_bytes` of them resident,
/// reading the others when routed. Everything else is loaded as [`load`] does, in f32. The
/// model computes the same logits as a resident one running exact segments.
///
/// Refused for a capacity-limited MoE (paging runs dropless segments) and a model without MoE
/// layers.
pub fn load_paged(
    dir: &Path,
    device: &Device,
    config: StoreConfig,
) -> Result<(Checkpoint, Arc<ExpertStore>)> {
    let model_config = load_config(dir)?;
    if model_config.moe.capacity_factor.is_some() {
        return Err(ModelError::Config(
            "an expert budget needs a dropless model; this one has a capacity factor".into(),
        ));
    }
    let path = dir.join(WEIGHTS_FILE);
    check_weights_file(&path)?;
    let (mut model, cold) = weights::load_burnpack_except(
        model_config.skeleton(device)?,
        &path,
        Some(DType::F32),
        weights::is_routed_expert,
    )?;
    let mut by_name: HashMap<String, burn_pack::Tensor> = cold.into_iter().collect();
    let mut layers = Vec::new();
    let mut take = |prefix: &str, w: &str| -> Result<ColdWeight> {
        let name = format!("{prefix}.{w}");
        let t = by_name
            .remove(&name)
            .ok_or_else(|| ModelError::checkpoint(&path, format!("'{name}' is missing")))?;
        let [experts, rows, cols] = t.shape.dims();
        let dtype = t.dtype;
        let bytes = t
            .into_bytes()
            .map_err(|e| ModelError::checkpoint(&path, format!("'{name}': {e}")))?;
        Ok(ColdWeight {
            bytes,
            dtype,
            experts,
            rows,
            cols,
        })
    };
    let mut prefixes = Vec::new();
    for (i, block) in model.blocks.iter().enumerate() {
        if let Ffn::Moe(_) = block.ffn {
            let prefix = format!("blocks.{i}.ffn.Moe.experts");
            layers.push(ColdLayer {
                w_gate: take(&prefix, "w_gate")?,
                w_up: take(&prefix, "w_up")?,
                w_down: take(&prefix, "w_down")?,
            });
            prefixes.push(i);
        }
    }
    let top_k = model_config.moe.router.top_k;
    let store = Arc::new(ExpertStore::new(layers, config, DType::F32, top_k)?);
    for (layer, i) in prefixes.into_iter().enumerate() {
        if let Ffn::Moe(moe) = &mut model.blocks[i].ffn {
            moe.experts.source = Some(Arc::new(LayerSource {
                store: store.clone(),
                layer,
            }));
        }
    }
    let ckpt = Checkpoint {
        model,
        tokenizer: load_tokenizer_spec(dir)?,
        dir: dir.to_path_buf(),
    };
    Ok((ckpt, store))
}

/// The tokenizer description of checkpoint `dir` (its `tokenizer.json`), if it has one.
pub fn load_tokenizer_spec(dir: &Path) -> Result<Option<serde_json::Value>> {
    let path = dir.join(TOKENIZER_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let spec = serde_json::from_str(&text).map_err(|source| ModelError::Json { path, source })?;
    Ok(Some(spec))
}

/// Loads weights from a burnpack file into a module built lazily from the matching config
/// ([`ModelConfig::skeleton`]), tensor by tensor, each converted to `dtype` (`None`: as stored).
pub fn load_weights<M: Module>(module: M, path: &Path, dtype: Option<DType>) -> Result<M> {
    check_weights_file(path)?;
    Ok(weights::load_burnpack_except(module, path, dtype, |_| false)?.0)
}

/// A weights file that exists, is a file and is not empty.
fn check_weights_file(path: &Path) -> Result<()> {
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
    Ok(())
}

/// Exports the weights as a safetensors file (tensor names are the module paths).
pub fn export_safetensors(model: &MoeLm, path: &Path) -> Result<()> {
    let mut store = SafetensorsStore::from_file(path).overwrite(true);
    model
        .save_into(&mut store)
        .map_err(|e| ModelError::checkpoint(path, format!("cannot write safetensors: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::tests::take_synced;

    /// A writer for `target` with a config and a weights file of the given content.
    fn staged(target: &Path, content: &str) -> CheckpointWriter {
        let writer = CheckpointWriter::new(target).unwrap();
        writer.write_text(CONFIG_FILE, content).unwrap();
        writer.write_text(WEIGHTS_FILE, content).unwrap();
        writer
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn commit_syncs_every_file_the_directory_and_the_parent_after_each_rename() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("ckpt");
        for replace in [false, true] {
            let writer = staged(&target, "{}");
            let staging = writer.dir().to_path_buf();
            take_synced();
            writer.commit(true).unwrap();
            let synced = take_synced();
            let mut files = synced[..2].to_vec();
            files.sort();
            assert_eq!(
                files,
                [staging.join(CONFIG_FILE), staging.join(WEIGHTS_FILE)]
            );
            let renames = if replace { 2 } else { 1 };
            let after = [vec![staging], vec![tmp.path().to_path_buf(); renames]].concat();
            assert_eq!(synced[2..], after, "replace: {replace}");
        }
        assert_eq!(names(tmp.path()), ["ckpt"], "nothing left beside it");
    }

    #[test]
    fn two_writers_of_one_target_in_one_process_do_not_collide() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("ckpt");
        let (a, b) = (staged(&target, "a"), staged(&target, "b"));
        assert_ne!(a.dir(), b.dir());
        a.commit(false).unwrap();
        b.commit(true).unwrap();
        assert_eq!(fs::read_to_string(target.join(CONFIG_FILE)).unwrap(), "b");
        assert_eq!(names(tmp.path()), ["ckpt"]);
    }

    #[test]
    fn leftover_names_are_recognised() {
        let id = |s: &str| parse_leftover(s);
        assert_eq!(id(".step-1.partial-12-3"), Some((Leftover::Staging, 12)));
        assert_eq!(id(".step-1.partial-12"), Some((Leftover::Staging, 12)));
        assert_eq!(id(".a.b.old-7-0"), Some((Leftover::Old("a.b".into()), 7)));
        for other in [
            "step-1",
            ".step-1.old",
            ".x.partial-",
            ".old-1-2",
            ".x.old-a-1",
            ".x.old-1-b",
        ] {
            assert_eq!(id(other), None, "{other}");
        }
    }

    /// What crashed writers left is cleaned on the next save: their staging directories go, a
    /// checkpoint they moved aside is removed (when its replacement arrived) or put back. Live
    /// writers' directories stay: this process's and another running one's.
    #[cfg(unix)]
    #[test]
    fn the_next_save_cleans_up_after_dead_writers_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let dead = crate::durable::tests::finished_pid();
        let live = std::os::unix::process::parent_id();
        let dirs = [
            format!(".step-1.partial-{dead}-0"),
            format!(".step-2.partial-{dead}"),
            format!(".step-3.old-{dead}-4"),
            format!(".step-4.old-{dead}-5"),
            format!(".step-5.partial-{live}-0"),
            format!(".step-6.old-{live}-0"),
        ];
        for name in dirs.iter().chain(&["step-3".to_string()]) {
            fs::create_dir(dir.join(name)).unwrap();
            fs::write(dir.join(name).join(CONFIG_FILE), name).unwrap();
        }
        let in_flight = staged(&dir.join("step-7"), "7");
        staged(&dir.join("step-8"), "8").commit(false).unwrap();
        let mut expected = vec![
            format!(".step-5.partial-{live}-0"),
            format!(".step-6.old-{live}-0"),
            in_flight
                .dir()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            "step-3".into(),
            "step-4".into(),
            "step-8".into(),
        ];
        expected.sort();
        assert_eq!(names(dir), expected);
        // The checkpoint put back is the one that was moved aside; the newer step-3 stays.
        let config = |name: &str| fs::read_to_string(dir.join(name).join(CONFIG_FILE)).unwrap();
        assert_eq!(config("step-4"), format!(".step-4.old-{dead}-5"));
        assert_eq!(config("step-3"), "step-3");
        in_flight.commit(false).unwrap();
    }

    #[test]
    fn complete_means_a_config_and_weights_that_are_not_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        assert!(!is_complete(dir));
        fs::write(dir.join(CONFIG_FILE), "{}").unwrap();
        fs::write(dir.join(WEIGHTS_FILE), "").unwrap();
        assert!(!is_complete(dir));
        fs::write(dir.join(WEIGHTS_FILE), "w").unwrap();
        assert!(is_complete(dir));
    }
}
