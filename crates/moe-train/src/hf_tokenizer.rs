//! Hugging Face tokenizers: a `tokenizer.json` run by the `tokenizers` crate, with the EOS ids
//! and special tokens of the files around it, behind the [`Tokenizer`] trait.
//!
//! Encoding runs the tokenizer's own normaliser, pre-tokeniser, model and post-processor, as
//! transformers' `tokenizer(text)` does by default (`add_special_tokens=True`): BOS and EOS appear
//! only if the post-processor adds them (transformers 5's generic tokenizer ignores the
//! `add_bos_token` / `add_eos_token` flags of `tokenizer_config.json`, and so does this one; the
//! fixture test checks both). Truncation and padding saved in `tokenizer.json` are switched off,
//! as transformers does when neither is asked for.
//!
//! A checkpoint keeps these files under their Hugging Face names in its [`HF_TOKENIZER_DIR`]
//! directory, apart from the project's own `tokenizer.json` spec.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::{DataError, Result};
use crate::tokenizer::Tokenizer;

/// The checkpoint directory that holds a Hugging Face tokenizer's files.
pub const HF_TOKENIZER_DIR: &str = "hf-tokenizer";

/// The Hugging Face files that make up a tokenizer, as `moe import-hf` copies them.
pub const HF_TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];

/// The names of special tokens passed to chat templates when the tokenizer defines them.
const SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
];

/// A Hugging Face tokenizer with its EOS ids, special tokens and chat template.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    eos: Vec<u32>,
    special_tokens: Vec<(&'static str, String)>,
    chat_template: Option<ChatTemplate>,
    dir: PathBuf,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("dir", &self.dir)
            .field("vocab_size", &self.vocab_size())
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl HfTokenizer {
    /// Loads the tokenizer of a Hugging Face directory (or a checkpoint's [`HF_TOKENIZER_DIR`]):
    /// `tokenizer.json` (required), `tokenizer_config.json` and `special_tokens_map.json`
    /// (special tokens, chat template), `chat_template.jinja`, and the EOS ids of
    /// `generation_config.json`, else `config.json`, else the `eos_token` of the tokenizer
    /// config.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let mut inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| bad(&path, e))?;
        inner.with_truncation(None).map_err(|e| bad(&path, e))?;
        inner.with_padding(None);
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let map = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or(Value::Null);
        let special_tokens: Vec<(&'static str, String)> = SPECIAL_TOKENS
            .iter()
            .filter_map(|&name| {
                let token = token_text(config.get(name)).or_else(|| token_text(map.get(name)))?;
                Some((name, token))
            })
            .collect();
        let eos = match eos_ids(dir)? {
            Some(ids) => ids,
            None => special_tokens
                .iter()
                .filter(|(name, _)| *name == "eos_token")
                .filter_map(|(_, token)| inner.token_to_id(token))
                .collect(),
        };
        let chat_template = ChatTemplate::find(dir, &config)?;
        Ok(Self {
            inner,
            eos,
            special_tokens,
            chat_template,
            dir: dir.to_path_buf(),
        })
    }

    /// Token ids of a text, with the special tokens the post-processor adds.
    pub fn try_encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Token ids of a conversation rendered by the chat template, as transformers'
    /// `apply_chat_template(messages, add_generation_prompt=True, tokenize=True)`: the template
    /// writes the special tokens itself, so the post-processor adds none.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.encode_with(&self.render_chat(messages)?, false)
    }

    /// A conversation rendered by the chat template, ready for the assistant's reply.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            DataError::Tokenizer(format!(
                "{}: no chat template (neither chat_template.jinja nor a chat_template in \
                 tokenizer_config.json)",
                self.dir.display()
            ))
        })?;
        template.render(messages, &self.special_tokens)
    }

    /// Every id that ends generation (possibly none).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| DataError::Tokenizer(format!("cannot encode: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }
}

impl Tokenizer for HfTokenizer {
    /// Token ids of a text; panics only where `tokenizers` fails, which it does not without
    /// truncation or padding.
    fn encode(&self, text: &str) -> Vec<u32> {
        self.try_encode(text)
            .unwrap_or_else(|e| panic!("{}: {e}", self.dir.display()))
    }

    fn decode(&self, tokens: &[u32]) -> String {
        self.inner
            .decode(tokens, true)
            .unwrap_or_else(|e| format!("<cannot decode: {e}>"))
    }

    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The first EOS id; a tokenizer without one answers `u32::MAX`, which no model produces.
    fn eos(&self) -> u32 {
        self.eos.first().copied().unwrap_or(u32::MAX)
    }

    fn eos_ids(&self) -> Vec<u32> {
        self.eos.clone()
    }

    fn spec(&self) -> Value {
        json!({"kind": "hf", "dir": HF_TOKENIZER_DIR, "vocab_size": self.vocab_size()})
    }

    fn files(&self) -> Option<&Path> {
        Some(&self.dir)
    }
}

/// The tokenizer of checkpoint `dir`: its Hugging Face tokenizer when it carries one (in
/// [`HF_TOKENIZER_DIR`]), else the one its saved description `spec` names (bytes without one).
pub fn for_checkpoint(dir: &Path, spec: Option<&Value>) -> Result<Box<dyn Tokenizer>> {
    let hf = dir.join(HF_TOKENIZER_DIR);
    if hf.join("tokenizer.json").is_file() {
        return Ok(Box::new(HfTokenizer::from_dir(&hf)?));
    }
    crate::tokenizer::from_spec(spec)
}

/// Copies the tokenizer files checkpoint `from` carries (its [`HF_TOKENIZER_DIR`]) into the
/// checkpoint being written in `to`; returns whether there were any.
pub fn carry(from: &Path, to: &Path) -> Result<bool> {
    let src = from.join(HF_TOKENIZER_DIR);
    if !src.join("tokenizer.json").is_file() {
        return Ok(false);
    }
    copy_files(&src, &to.join(HF_TOKENIZER_DIR))?;
    Ok(true)
}

/// Copies the Hugging Face tokenizer files present in `from` into `to` (created), and returns
/// their names. Without a `generation_config.json`, the `eos_token_id` of `from/config.json` is
/// written as one, as transformers derives a generation config from the model config.
pub fn copy_files(from: &Path, to: &Path) -> Result<Vec<String>> {
    fs::create_dir_all(to).map_err(|e| DataError::io(to, e))?;
    let mut copied = Vec::new();
    for name in HF_TOKENIZER_FILES {
        let src = from.join(name);
        if src.is_file() {
            fs::copy(&src, to.join(name)).map_err(|e| DataError::io(&src, e))?;
            copied.push(name.to_string());
        }
    }
    let generation = to.join("generation_config.json");
    if !generation.exists()
        && let Some(config) = read_json(&from.join("config.json"))?
        && let Some(eos) = config.get("eos_token_id").filter(|v| !v.is_null())
    {
        let text = serde_json::to_string_pretty(&json!({"eos_token_id": eos}))
            .expect("JSON values serialise");
        fs::write(&generation, text).map_err(|e| DataError::io(&generation, e))?;
        copied.push("generation_config.json".to_string());
    }
    Ok(copied)
}

/// The EOS ids of `generation_config.json`, else of `config.json` (`eos_token_id`, an integer or
/// a list); `None` when neither names any.
fn eos_ids(dir: &Path) -> Result<Option<Vec<u32>>> {
    for name in ["generation_config.json", "config.json"] {
        let path = dir.join(name);
        let Some(json) = read_json(&path)? else {
            continue;
        };
        let ids = match json.get("eos_token_id") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(list)) => list.iter().map(as_id).collect::<Option<Vec<u32>>>(),
            Some(one) => as_id(one).map(|id| vec![id]),
        };
        return ids
            .map(Some)
            .ok_or_else(|| bad(&path, "eos_token_id must be an id or a list of ids"));
    }
    Ok(None)
}

fn as_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|id| u32::try_from(id).ok())
}

/// A special token as tokenizer configs write it: a string or an `AddedToken` object.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A JSON file, or `None` when it does not exist.
pub(crate) fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| bad(path, format!("malformed JSON: {e}")))
}

fn bad(path: &Path, problem: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer(format!("{}: {problem}", path.display()))
}
