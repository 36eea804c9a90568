//! Corpora (built-in or a user directory) as token streams per domain, and batching.

use std::fs;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::corpus::{BUILTIN_DOMAINS, TRAIN, VALID, World};
use crate::error::{DataError, Result};
use crate::tokenizer::Tokenizer;

/// One domain's token streams.
#[derive(Debug, Clone)]
pub struct Domain {
    /// Domain name (the built-in name, or the user's sub-directory or file name).
    pub name: String,
    /// Training tokens, documents separated by end-of-document tokens.
    pub train: Vec<u32>,
    /// Validation tokens.
    pub valid: Vec<u32>,
    /// Where each validation document starts in `valid` (ascending, the first at 0).
    pub valid_docs: Vec<usize>,
}

impl Domain {
    /// The validation document that token `pos` of `valid` belongs to.
    pub fn valid_doc(&self, pos: usize) -> usize {
        self.valid_docs
            .partition_point(|&s| s <= pos)
            .saturating_sub(1)
    }
}

/// A multi-domain corpus.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// The domains, in a fixed order (their index is the domain label).
    pub domains: Vec<Domain>,
}

/// The token stream of documents, each followed by end-of-document, and where each starts.
fn join(docs: &[String], tokenizer: &dyn Tokenizer) -> (Vec<u32>, Vec<usize>) {
    let mut out = Vec::new();
    let mut starts = Vec::with_capacity(docs.len());
    for d in docs {
        starts.push(out.len());
        out.extend(tokenizer.encode(d));
        out.push(tokenizer.eos());
    }
    (out, starts)
}

impl Corpus {
    /// The built-in corpus of corpus seed `seed`: about `train_bytes` of training text per
    /// domain and a tenth of that for validation (see [`crate::corpus`]).
    pub fn builtin(seed: u64, train_bytes: usize, tokenizer: &dyn Tokenizer) -> Self {
        let world = World::new(seed);
        let domains = BUILTIN_DOMAINS
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let (valid, valid_docs) =
                    join(&world.text(i, VALID, seed, train_bytes / 10), tokenizer);
                Domain {
                    name: name.to_string(),
                    train: join(&world.text(i, TRAIN, seed, train_bytes), tokenizer).0,
                    valid,
                    valid_docs,
                }
            })
            .collect();
        Self { domains }
    }

    /// A user corpus: each sub-directory of `dir` (all files in it) or each file directly in
    /// `dir` is one domain of UTF-8 text. The last `valid_fraction` of each domain's text
    /// (at a line boundary) is its validation split.
    pub fn from_dir(dir: &Path, valid_fraction: f64, tokenizer: &dyn Tokenizer) -> Result<Self> {
        let meta = fs::metadata(dir).map_err(|e| DataError::io(dir, e))?;
        if !meta.is_dir() {
            return Err(DataError::corpus(
                dir,
                "is a file; --data takes a directory with one sub-directory or file per domain",
            ));
        }
        let mut entries = sorted_entries(dir)?;
        entries.retain(|p| !is_hidden(p));
        if entries.is_empty() {
            return Err(DataError::corpus(
                dir,
                "is empty: no domains (sub-directories or files) found",
            ));
        }
        let mut domains = Vec::new();
        for entry in entries {
            let name = entry
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let text = if entry.is_dir() {
                let files: Vec<PathBuf> = sorted_entries(&entry)?
                    .into_iter()
                    .filter(|p| p.is_file() && !is_hidden(p))
                    .collect();
                if files.is_empty() {
                    return Err(DataError::corpus(&entry, "domain directory holds no files"));
                }
                files
                    .iter()
                    .map(|f| read_text(f))
                    .collect::<Result<Vec<_>>>()?
                    .join("\n")
            } else {
                read_text(&entry)?
            };
            let cut = split_point(&text, valid_fraction);
            let (valid, valid_docs) = join(&[text[cut..].to_string()], tokenizer);
            domains.push(Domain {
                name,
                train: join(&[text[..cut].to_string()], tokenizer).0,
                valid,
                valid_docs,
            });
        }
        Ok(Self { domains })
    }

    /// Domain names.
    pub fn names(&self) -> Vec<String> {
        self.domains.iter().map(|d| d.name.clone()).collect()
    }

    /// The corpus restricted to the named domains, in the given order; an unknown name is an
    /// error that lists the known ones.
    pub fn select(&self, names: &[String]) -> Result<Self> {
        let domains = names
            .iter()
            .map(|name| {
                self.domains
                    .iter()
                    .find(|d| &d.name == name)
                    .cloned()
                    .ok_or_else(|| DataError::UnknownDomain {
                        name: name.clone(),
                        known: self.names().join(", "),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { domains })
    }

    /// Checks every domain has room for a window of `window` tokens in both splits.
    pub fn check_window(&self, window: usize) -> Result<()> {
        for d in &self.domains {
            let shortest = d.train.len().min(d.valid.len());
            if shortest <= window {
                return Err(DataError::corpus(
                    &d.name,
                    format!(
                        "domain has {shortest} tokens in a split, fewer than one window of {} (seq_len + 1); add text or lower --seq-len",
                        window + 1
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| DataError::io(dir, err)))
        .collect::<Result<_>>()?;
    v.sort();
    Ok(v)
}

/// Reads a UTF-8 text file; empty, binary or non-UTF-8 files are errors naming the file.
fn read_text(path: &Path) -> Result<String> {
    let bytes = fs::read(path).map_err(|e| DataError::io(path, e))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(DataError::corpus(path, "is empty"));
    }
    if bytes.contains(&0) {
        return Err(DataError::corpus(
            path,
            "looks binary (contains NUL bytes), expected UTF-8 text",
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        DataError::corpus(
            path,
            format!(
                "is not valid UTF-8 text (byte {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// Where validation text starts: after the last `1 - fraction` share, moved to a line start.
fn split_point(text: &str, fraction: f64) -> usize {
    let target = ((text.len() as f64) * (1.0 - fraction)) as usize;
    let mut cut = target.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].rfind('\n').map_or(cut, |i| i + 1).max(cut / 2)
}

/// A batch of windows: inputs and next-token targets, with each row's domain.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Input tokens `[batch, seq]`.
    pub inputs: Tensor<2, Int>,
    /// Target tokens `[batch, seq]` (inputs shifted by one).
    pub targets: Tensor<2, Int>,
    /// Domain label of each row (for reports; never fed to the model).
    pub domains: Vec<usize>,
}

/// Builds a batch from windows `(domain, start)` of the chosen split.
pub fn batch_from_windows(
    corpus: &Corpus,
    windows: &[(usize, usize)],
    seq_len: usize,
    valid: bool,
    device: &Device,
) -> Batch {
    let mut inputs = Vec::with_capacity(windows.len() * seq_len);
    let mut targets = Vec::with_capacity(windows.len() * seq_len);
    for &(d, start) in windows {
        let stream = if valid {
            &corpus.domains[d].valid
        } else {
            &corpus.domains[d].train
        };
        let w = &stream[start..start + seq_len + 1];
        inputs.extend(w[..seq_len].iter().map(|&t| i64::from(t)));
        targets.extend(w[1..].iter().map(|&t| i64::from(t)));
    }
    let b = windows.len();
    Batch {
        inputs: Tensor::<1, Int>::from_ints(inputs.as_slice(), device).reshape([b, seq_len]),
        targets: Tensor::<1, Int>::from_ints(targets.as_slice(), device).reshape([b, seq_len]),
        domains: windows.iter().map(|w| w.0).collect(),
    }
}

/// Random training windows for `step`, a pure function of (seed, step) so a resumed run sees the
/// same data. Rows cycle through the domains so every batch mixes them.
pub fn train_windows(
    corpus: &Corpus,
    seed: u64,
    step: usize,
    batch_size: usize,
    seq_len: usize,
) -> Vec<(usize, usize)> {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ step as u64);
    let n = corpus.domains.len();
    let offset = rng.random_range(0..n);
    (0..batch_size)
        .map(|i| {
            let d = (offset + i) % n;
            let len = corpus.domains[d].train.len();
            (d, rng.random_range(0..len - seq_len))
        })
        .collect()
}

/// Up to `per_domain` non-overlapping validation windows of one domain, evenly spread.
pub fn valid_windows(
    corpus: &Corpus,
    domain: usize,
    per_domain: usize,
    seq_len: usize,
) -> Vec<(usize, usize)> {
    spread_windows(
        domain,
        corpus.domains[domain].valid.len(),
        per_domain,
        seq_len,
    )
}

/// Up to `per_domain` non-overlapping windows `(domain, start)` of `seq_len` tokens (plus the
/// target) over a stream of `len` tokens, evenly spread.
pub fn spread_windows(
    domain: usize,
    len: usize,
    per_domain: usize,
    seq_len: usize,
) -> Vec<(usize, usize)> {
    let available = (len - 1) / seq_len;
    let n = available.min(per_domain).max(1);
    let stride = (len - seq_len - 1) / n.max(1);
    (0..n)
        .map(|i| (domain, i * stride.max(1)))
        .filter(|w| w.1 + seq_len < len)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::ByteTokenizer;

    #[test]
    fn builtin_corpus_is_deterministic_and_batches_mix_domains() {
        let a = Corpus::builtin(3, 20_000, &ByteTokenizer);
        let b = Corpus::builtin(3, 20_000, &ByteTokenizer);
        assert_eq!(a.names(), vec!["code", "arithmetic", "english", "spanish"]);
        for (x, y) in a.domains.iter().zip(&b.domains) {
            assert_eq!(x.train, y.train);
            assert_eq!(x.valid, y.valid);
        }
        let w = train_windows(&a, 1, 5, 8, 64);
        assert_eq!(w, train_windows(&a, 1, 5, 8, 64), "same step, same data");
        assert_ne!(w, train_windows(&a, 1, 6, 8, 64));
        let mut seen: Vec<usize> = w.iter().map(|x| x.0).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 4);
        let batch = batch_from_windows(&a, &w, 64, false, &Device::flex());
        assert_eq!(batch.inputs.dims(), [8, 64]);
        let (i, t) = (
            batch.inputs.into_data().try_into_vec_as::<i64>().unwrap(),
            batch.targets.into_data().try_into_vec_as::<i64>().unwrap(),
        );
        assert_eq!(&i[1..64], &t[..63], "targets are inputs shifted by one");
    }

    #[test]
    fn user_corpora_load_per_domain_and_reject_bad_files() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir(root.join("poems")).unwrap();
        std::fs::write(root.join("poems/a.txt"), "roses are red\n".repeat(50)).unwrap();
        std::fs::write(root.join("poems/b.txt"), "violets are blue\n".repeat(50)).unwrap();
        std::fs::write(root.join("logs.txt"), "ERROR disk full\n".repeat(80)).unwrap();
        let c = Corpus::from_dir(root, 0.1, &ByteTokenizer).unwrap();
        assert_eq!(c.names(), vec!["logs", "poems"]);
        assert!(
            c.domains
                .iter()
                .all(|d| !d.valid.is_empty() && d.train.len() > d.valid.len())
        );

        std::fs::write(root.join("empty.txt"), "").unwrap();
        let err = Corpus::from_dir(root, 0.1, &ByteTokenizer)
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty.txt") && err.contains("empty"), "{err}");
        std::fs::write(root.join("empty.txt"), [0u8, 159, 146, 150]).unwrap();
        let err = Corpus::from_dir(root, 0.1, &ByteTokenizer)
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty.txt") && err.contains("binary"), "{err}");
        std::fs::write(root.join("empty.txt"), [b'a', 0xff, 0xfe]).unwrap();
        let err = Corpus::from_dir(root, 0.1, &ByteTokenizer)
            .unwrap_err()
            .to_string();
        assert!(err.contains("UTF-8"), "{err}");

        let none = tempfile::tempdir().unwrap();
        assert!(
            Corpus::from_dir(none.path(), 0.1, &ByteTokenizer)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        assert!(Corpus::from_dir(&root.join("logs.txt"), 0.1, &ByteTokenizer).is_err());
    }

    #[test]
    fn validation_positions_map_to_their_documents() {
        let c = Corpus::builtin(1, 20_000, &ByteTokenizer);
        let d = &c.domains[2];
        assert_eq!(d.valid_docs[0], 0);
        assert!(d.valid_docs.len() > 2);
        for (i, &start) in d.valid_docs.iter().enumerate().skip(1) {
            assert_eq!(d.valid_doc(start), i);
            assert_eq!(d.valid_doc(start - 1), i - 1);
            assert_eq!(
                d.valid[start - 1],
                ByteTokenizer.eos(),
                "a document ends before"
            );
        }
        let last = d.valid.len() - 1;
        assert_eq!(d.valid_doc(last), d.valid_docs.len() - 1);
    }

    #[test]
    fn short_domains_are_refused_for_long_windows() {
        let c = Corpus::builtin(1, 2_000, &ByteTokenizer);
        assert!(c.check_window(64).is_ok());
        assert!(
            c.check_window(5_000)
                .unwrap_err()
                .to_string()
                .contains("seq-len")
        );
    }
}
