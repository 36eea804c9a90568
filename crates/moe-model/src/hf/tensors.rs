//! The tensors of a Hugging Face checkpoint, single or sharded safetensors, memory-mapped.
//!
//! Opening reads only the headers. A tensor is copied out of its mapping when asked for,
//! converted to the import's dtype, and its pages are then dropped from this process's memory;
//! a shard is unmapped once every tensor it holds has been read. An import's resident memory is
//! therefore the model being built plus about one tensor, whatever the size of the shards.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Component, Path, PathBuf};

use burn::tensor::{DType, TensorData};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::weights::{StoredBytes, dtype_name, tally};

/// Where one tensor lives.
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the shard file.
    start: usize,
    end: usize,
    read: bool,
}

/// One mapped safetensors file.
struct Shard {
    path: PathBuf,
    /// `None` once every tensor of the shard has been read.
    map: Option<Mmap>,
    unread: usize,
}

/// The tensors of a checkpoint directory, by name.
pub(super) struct HfTensors {
    index: HashMap<String, Entry>,
    shards: Vec<Shard>,
    /// The dtype tensors are converted to as they are read.
    dtype: DType,
}

/// Tensor name -> the shard file an index places it in.
type ShardOf = HashMap<String, PathBuf>;

/// Whether a shard name from an index file is a plain relative path that stays inside the model
/// directory: only normal components (no `..`, `.`, root or drive prefix), not empty.
fn stays_inside(file: &str) -> bool {
    let path = Path::new(file);
    !file.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// The shard files of `dir` and, for a sharded checkpoint, which file the index says holds
/// each tensor.
fn shard_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<ShardOf>)> {
    let single = dir.join("model.safetensors");
    let sharded = dir.join("model.safetensors.index.json");
    if !sharded.exists() {
        if single.exists() {
            return Ok((vec![single], None));
        }
        return Err(ModelError::checkpoint(
            dir,
            "no model.safetensors or model.safetensors.index.json",
        ));
    }
    let text = fs::read_to_string(&sharded).map_err(|e| ModelError::io(&sharded, e))?;
    let json: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: sharded.clone(),
        source,
    })?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| ModelError::checkpoint(&sharded, "no 'weight_map' object"))?;
    let mut names = HashMap::new();
    let mut files = Vec::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            ModelError::checkpoint(&sharded, format!("shard of '{name}' is not a file name"))
        })?;
        if !stays_inside(file) {
            return Err(ModelError::checkpoint(
                &sharded,
                format!(
                    "shard '{file}' of '{name}' is outside the model directory; \
                     shards must be relative paths inside it"
                ),
            ));
        }
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path.clone());
        }
        names.insert(name.clone(), path);
    }
    files.sort();
    Ok((files, Some(names)))
}

/// Maps shard number `shard` and reads its header: its tensors and where each lives.
fn map_shard(path: &Path, shard: usize) -> Result<(Mmap, Vec<(String, Entry)>)> {
    let file = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ModelError::checkpoint(path, "shard missing (named by the index)")
        } else {
            ModelError::io(path, e)
        }
    })?;
    // SAFETY: the map is read-only and private to this process. Another process truncating
    // the file while it is mapped would fault; that is the documented limit of reading
    // memory-mapped checkpoints, as in every framework that maps them.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&map)
        .map_err(|e| ModelError::checkpoint(path, format!("not a safetensors file ({e})")))?;
    let base = 8 + header_len;
    let tensors = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let (start, end) = info.data_offsets;
            let entry = Entry {
                shard,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: base + start,
                end: base + end,
                read: false,
            };
            (name, entry)
        })
        .collect();
    Ok((map, tensors))
}

impl HfTensors {
    /// Opens the checkpoint of `dir`; tensors are read as `dtype`, or, with `None`, as the dtype
    /// most of the checkpoint's floats are stored in (its source dtype).
    pub(super) fn open(dir: &Path, dtype: Option<DType>) -> Result<Self> {
        let (files, named) = shard_files(dir)?;
        let mut index = HashMap::new();
        let mut shards = Vec::new();
        for path in files {
            let (map, tensors) = map_shard(&path, shards.len())?;
            for (name, entry) in tensors {
                if named
                    .as_ref()
                    .is_some_and(|n| n.get(&name).is_none_or(|p| *p != path))
                {
                    continue; // a tensor the index places elsewhere, or not at all
                }
                index.insert(name, entry);
            }
            shards.push(Shard {
                path,
                map: Some(map),
                unread: 0,
            });
        }
        if let Some(named) = &named {
            check_index(named, &index)?;
        }
        for entry in index.values() {
            shards[entry.shard].unread += 1;
        }
        let dtype = match dtype {
            Some(d) => d,
            None => source_dtype(&index)?,
        };
        Ok(Self {
            index,
            shards,
            dtype,
        })
    }

    /// The dtype tensors are read as.
    pub(super) fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the checkpoint holds `name`.
    pub(super) fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Tensor `name`, checked against `shape`, in the import's dtype. Its pages leave this
    /// process's memory once copied, and its shard is unmapped after its last tensor.
    pub(super) fn data(&mut self, name: &str, shape: &[usize]) -> Result<TensorData> {
        let entry = self
            .index
            .get_mut(name)
            .ok_or_else(|| ModelError::Checkpoint {
                path: PathBuf::from(name),
                problem: "tensor missing from the checkpoint".into(),
            })?;
        let shard = &mut self.shards[entry.shard];
        let path = &shard.path;
        if entry.shape != shape {
            return Err(ModelError::checkpoint(
                path,
                format!(
                    "tensor '{name}' has shape {:?}, the config needs {shape:?}",
                    entry.shape
                ),
            ));
        }
        let map = shard
            .map
            .as_ref()
            .ok_or_else(|| ModelError::checkpoint(path, format!("tensor '{name}' read twice")))?;
        let bytes = &map[entry.start..entry.end];
        let data = convert(bytes, entry.dtype, self.dtype, shape).map_err(|problem| {
            ModelError::checkpoint(path, format!("tensor '{name}' {problem}"))
        })?;
        // SAFETY: a read-only file mapping: dropping its pages only makes later reads fault
        // them back in from the file. Nothing borrows them past this point.
        let _ = unsafe {
            map.unchecked_advise_range(
                UncheckedAdvice::DontNeed,
                entry.start,
                entry.end - entry.start,
            )
        };
        if !entry.read {
            entry.read = true;
            shard.unread -= 1;
            if shard.unread == 0 {
                shard.map = None;
            }
        }
        Ok(data)
    }

    /// What the checkpoint stores, by dtype: routed experts (`*.experts.*`) and the rest.
    pub(super) fn stored(&self) -> Vec<StoredBytes> {
        let entries = self.index.iter().map(|(name, e)| {
            let dtype = float_dtype(e.dtype).map_or(format!("{:?}", e.dtype), dtype_name);
            (name.as_str(), dtype, e.end - e.start)
        });
        tally(entries, |name| name.contains(".experts."))
    }
}

/// Every tensor the index names is in the shard it names.
fn check_index(named: &ShardOf, index: &HashMap<String, Entry>) -> Result<()> {
    let mut missing: Vec<_> = named.keys().filter(|n| !index.contains_key(*n)).collect();
    missing.sort();
    match missing.first() {
        None => Ok(()),
        Some(name) => Err(ModelError::checkpoint(
            &named[*name],
            format!(
                "does not hold '{name}', which the index places there ({} such tensors)",
                missing.len()
            ),
        )),
    }
}

/// The float dtype most of the checkpoint's bytes are stored in.
fn source_dtype(index: &HashMap<String, Entry>) -> Result<DType> {
    let bytes = |d: Dtype| -> usize {
        index
            .values()
            .filter(|e| e.dtype == d)
            .map(|e| e.end - e.start)
            .sum()
    };
    [Dtype::BF16, Dtype::F16, Dtype::F32]
        .into_iter()
        .map(|d| (bytes(d), d))
        .filter(|(n, _)| *n > 0)
        .max_by_key(|(n, _)| *n)
        .and_then(|(_, d)| float_dtype(d))
        .ok_or_else(|| ModelError::Checkpoint {
            path: PathBuf::from("model.safetensors"),
            problem: "holds no F32, F16 or BF16 tensors".into(),
        })
}

/// Our dtype for a stored float dtype.
fn float_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// Stored bytes of dtype `from` as tensor data of dtype `to`.
fn convert(
    bytes: &[u8],
    from: Dtype,
    to: DType,
    shape: &[usize],
) -> std::result::Result<TensorData, String> {
    let Some(from) = float_dtype(from) else {
        return Err(format!(
            "is stored as {from:?}; weights must be F32, F16 or BF16"
        ));
    };
    TensorData::from_bytes_vec(bytes.to_vec(), shape, from)
        .try_cast(to)
        .map_err(|e| format!("cannot be converted to {to:?} ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An index whose shard names leave the directory is refused before any shard is read.
    #[test]
    fn shards_outside_the_directory_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = if cfg!(windows) {
            "C:\\x.safetensors"
        } else {
            "/etc/passwd"
        };
        for file in [
            "../secret.safetensors",
            "a/../../b.safetensors",
            outside,
            "",
            "./",
        ] {
            let index = serde_json::json!({"weight_map": {"model.norm.weight": file}});
            fs::write(
                tmp.path().join("model.safetensors.index.json"),
                index.to_string(),
            )
            .unwrap();
            let err = shard_files(tmp.path()).expect_err(file).to_string();
            assert!(err.contains("outside the model directory"), "{file}: {err}");
            assert_eq!(err.lines().count(), 1);
        }
        for file in [
            "model-00001-of-00002.safetensors",
            "shards/model-1.safetensors",
        ] {
            let index = serde_json::json!({"weight_map": {"model.norm.weight": file}});
            fs::write(
                tmp.path().join("model.safetensors.index.json"),
                index.to_string(),
            )
            .unwrap();
            let (_, named) = shard_files(tmp.path()).unwrap();
            assert_eq!(named.unwrap()["model.norm.weight"], tmp.path().join(file));
        }
    }
}
