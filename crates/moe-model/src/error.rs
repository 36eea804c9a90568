//! Errors of model configuration, checkpoints and imports.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong building, saving, loading or importing a model.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A model configuration that cannot work.
    #[error("invalid model config: {0}")]
    Config(String),
    /// The MoE layer's configuration is invalid.
    #[error("invalid MoE config: {0}")]
    Moe(#[from] moe_core::ConfigError),
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file that does not parse or does not fit its schema.
    #[error("{}: malformed JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A checkpoint or weight file that is damaged, foreign or does not fit its config.
    #[error("{}: {problem}", path.display())]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A generation request the model cannot serve.
    #[error("{0}")]
    Generation(String),
}

impl ModelError {
    /// An I/O error at a path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// A damaged or mismatched file.
    pub fn checkpoint(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Self::Checkpoint {
            path: path.into(),
            problem: problem.into(),
        }
    }
}

/// Result with [`ModelError`].
pub type Result<T> = std::result::Result<T, ModelError>;
