//! Errors of data loading and training.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong reading data, training or evaluating.
#[derive(Debug, Error)]
pub enum DataError {
    /// A corpus file or directory that cannot be used.
    #[error("{}: {problem}", path.display())]
    Corpus {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A tokenizer description that cannot be used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A training configuration that cannot work.
    #[error("invalid training config: {0}")]
    Config(String),
    /// A domain name the corpus does not have.
    #[error("unknown domain '{name}'; the corpus has {known}")]
    UnknownDomain {
        /// The name asked for.
        name: String,
        /// The corpus's domains, comma-separated.
        known: String,
    },
    /// A set of branches that cannot be trained.
    #[error("cannot branch: {0}")]
    Branch(String),
    /// The loss became NaN or infinite.
    #[error("loss is {value} at step {step}; stopped, the last good checkpoint is kept")]
    NonFinite {
        /// The step that produced it.
        step: usize,
        /// The value.
        value: f32,
    },
    /// Training was interrupted (the last checkpoint was saved).
    #[error("interrupted at step {0}; checkpoint saved, continue with --resume")]
    Interrupted(usize),
    /// A run directory that cannot be used.
    #[error("{}: {problem}", path.display())]
    Run {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A device failed during a data-parallel step (its worker's message).
    #[error("data-parallel step failed: {0}")]
    Device(String),
    /// A bug: a panic caught at a thread boundary (a branch), reported instead of propagated.
    #[error("internal error: {0}")]
    Internal(String),
    /// A model, checkpoint or import error.
    #[error(transparent)]
    Model(#[from] moe_model::ModelError),
    /// A file that could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl DataError {
    /// An I/O error at a path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// A bad corpus file.
    pub fn corpus(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Self::Corpus {
            path: path.into(),
            problem: problem.into(),
        }
    }

    /// A bad run directory.
    pub fn run(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Self::Run {
            path: path.into(),
            problem: problem.into(),
        }
    }
}

/// The text of a panic's payload (a `String` or a `&str`, as `panic!` makes them).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic")
}

/// Result with [`DataError`].
pub type Result<T> = std::result::Result<T, DataError>;
