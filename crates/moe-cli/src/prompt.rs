//! The prompt of `moe generate` and `moe logits`: text, a chat message, or raw ids, turned into
//! token ids by the checkpoint's tokenizer.

use std::path::Path;

use anyhow::bail;
use clap::Args;
use moe_model::checkpoint::Checkpoint;
use moe_train::chat::ChatMessage;
use moe_train::hf_tokenizer::HF_TOKENIZER_DIR;
use moe_train::tokenizer::from_spec;
use moe_train::{ByteTokenizer, HfTokenizer, Tokenizer};

/// Where the prompt comes from.
#[derive(Args, Debug)]
pub struct PromptArgs {
    /// Text to continue.
    #[arg(long, required_unless_present_any = ["ids", "prompts"], conflicts_with_all = ["ids", "prompts"])]
    prompt: Option<String>,
    /// Raw token ids instead of text, comma-separated (e.g. 1,2,3).
    #[arg(long, value_delimiter = ',', conflicts_with = "prompts")]
    ids: Option<Vec<u32>>,
    /// A file of prompts, one per line, continued together as one batch (generate only).
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<std::path::PathBuf>,
    /// Send --prompt as a user message through the tokenizer's chat template.
    #[arg(long, conflicts_with = "ids")]
    chat: bool,
}

impl PromptArgs {
    /// The text to print before generated text: the prompt unless it went through a chat
    /// template or was given as ids.
    pub fn echo(&self) -> &str {
        match &self.prompt {
            Some(text) if !self.chat => text,
            _ => "",
        }
    }
}

/// The tokenizer a checkpoint runs with.
pub enum Codec {
    /// The Hugging Face tokenizer stored with the checkpoint.
    Hf(Box<HfTokenizer>),
    /// The project's tokenizer named by the checkpoint's spec, or bytes.
    Own(Box<dyn Tokenizer>),
    /// None: the checkpoint takes raw ids only.
    Ids,
}

impl Codec {
    /// The checkpoint's Hugging Face tokenizer, else its own spec, else bytes when the vocabulary
    /// covers them (the byte tokenizer's 258 ids), else none.
    pub fn for_checkpoint(ckpt: &Checkpoint) -> anyhow::Result<Self> {
        let hf = ckpt.dir.join(HF_TOKENIZER_DIR);
        if hf.join("tokenizer.json").exists() {
            return Ok(Self::Hf(Box::new(HfTokenizer::from_dir(&hf)?)));
        }
        let bytes = ByteTokenizer.vocab_size() <= ckpt.model.config.vocab_size;
        Ok(match &ckpt.tokenizer {
            Some(spec) => Self::Own(from_spec(Some(spec))?),
            None if bytes => Self::Own(Box::new(ByteTokenizer)),
            None => Self::Ids,
        })
    }

    /// The prompt's token ids, every one checked against the model's vocabulary.
    pub fn tokens(
        &self,
        args: &PromptArgs,
        vocab_size: usize,
        dir: &Path,
    ) -> anyhow::Result<Vec<u32>> {
        let tokens = match (&args.ids, &args.prompt) {
            (Some(ids), _) => ids.clone(),
            (None, Some(text)) => self.encode(text, args.chat, vocab_size, dir)?,
            (None, None) if args.prompts.is_some() => {
                bail!("--prompts runs a batch of prompts, which only generate does")
            }
            (None, None) => bail!("give a prompt: --prompt TEXT or --ids 1,2,3"),
        };
        if tokens.is_empty() {
            bail!("the prompt is empty");
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
            bail!("token id {bad} is outside the model's vocabulary of {vocab_size}");
        }
        Ok(tokens)
    }

    /// The prompts of a `--prompts` file, one per line, each encoded (through the chat template
    /// with `--chat`) and checked as a single prompt is.
    pub fn batch(
        &self,
        args: &PromptArgs,
        vocab_size: usize,
        dir: &Path,
    ) -> anyhow::Result<Vec<(String, Vec<u32>)>> {
        let Some(path) = &args.prompts else {
            bail!("no --prompts file was given");
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() {
            bail!("{} holds no prompt", path.display());
        }
        lines
            .iter()
            .enumerate()
            .map(|(i, line)| {
                let at = || format!("{} line {}", path.display(), i + 1);
                if line.is_empty() {
                    bail!("{}: the prompt is empty", at());
                }
                let tokens = self.encode(line, args.chat, vocab_size, dir)?;
                if tokens.is_empty() {
                    bail!("{}: the prompt is empty", at());
                }
                if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
                    bail!(
                        "{}: token id {bad} is outside the model's vocabulary of {vocab_size}",
                        at()
                    );
                }
                let echo = if args.chat {
                    String::new()
                } else {
                    line.to_string()
                };
                Ok((echo, tokens))
            })
            .collect()
    }

    fn encode(
        &self,
        text: &str,
        chat: bool,
        vocab_size: usize,
        dir: &Path,
    ) -> anyhow::Result<Vec<u32>> {
        Ok(match (self, chat) {
            (Self::Hf(t), true) => t.encode_chat(&[ChatMessage::user(text)])?,
            (Self::Hf(t), false) => t.try_encode(text)?,
            (_, true) => bail!(
                "{}: --chat needs a Hugging Face tokenizer with a chat template, and this \
                 checkpoint has none",
                dir.display()
            ),
            (Self::Own(t), false) => t.encode(text),
            (Self::Ids, false) => bail!(
                "{}: no tokenizer, and the vocabulary of {vocab_size} does not cover bytes; give \
                 token ids with --ids 1,2,3",
                dir.display()
            ),
        })
    }

    /// The ids that end generation, those inside the vocabulary.
    pub fn eos(&self, vocab_size: usize) -> Vec<u32> {
        let ids = match self {
            Self::Hf(t) => t.eos_ids().to_vec(),
            Self::Own(t) => t.eos_ids(),
            Self::Ids => Vec::new(),
        };
        ids.into_iter()
            .filter(|&id| (id as usize) < vocab_size)
            .collect()
    }

    /// Text of token ids; without a tokenizer, the ids separated by spaces.
    pub fn decode(&self, tokens: &[u32]) -> String {
        match self {
            Self::Hf(t) => t.decode(tokens),
            Self::Own(t) => t.decode(tokens),
            Self::Ids => tokens
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}
