//! Tokenizers. The default is byte-level: token i < 256 is the byte i, followed by special tokens.

use serde_json::{Value, json};

use crate::error::{DataError, Result};

/// Turns text into token ids and back. Implement it to bring another tokenizer (e.g. BPE).
pub trait Tokenizer: Send + Sync {
    /// Token ids of a text.
    fn encode(&self, text: &str) -> Vec<u32>;
    /// Text of token ids (special tokens omitted, invalid UTF-8 replaced).
    fn decode(&self, tokens: &[u32]) -> String;
    /// Vocabulary size, special tokens included.
    fn vocab_size(&self) -> usize;
    /// End-of-document token.
    fn eos(&self) -> u32;
    /// Every id that ends generation (by default the end-of-document token).
    fn eos_ids(&self) -> Vec<u32> {
        vec![self.eos()]
    }
    /// The description saved as `tokenizer.json` in checkpoints.
    fn spec(&self) -> Value;
    /// The directory of files a checkpoint must carry for this tokenizer to load again (a
    /// Hugging Face tokenizer's), if any.
    fn files(&self) -> Option<&std::path::Path> {
        None
    }
}

/// Byte-level tokenizer: ids 0..=255 are the UTF-8 bytes of the text;
/// [`ByteTokenizer::EOS`] (256) ends a document and [`ByteTokenizer::PAD`] (257) pads a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// End of document.
    pub const EOS: u32 = 256;
    /// Padding.
    pub const PAD: u32 = 257;
}

impl Tokenizer for ByteTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    fn decode(&self, tokens: &[u32]) -> String {
        let bytes: Vec<u8> = tokens
            .iter()
            .filter(|&&t| t < 256)
            .map(|&t| t as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn vocab_size(&self) -> usize {
        258
    }

    fn eos(&self) -> u32 {
        Self::EOS
    }

    fn spec(&self) -> Value {
        json!({"kind": "bytes", "vocab_size": 258, "special_tokens": {"<eos>": Self::EOS, "<pad>": Self::PAD}})
    }
}

/// Rebuilds a tokenizer from its saved description; `None` (a checkpoint without one, such as an
/// imported model) means bytes.
pub fn from_spec(spec: Option<&Value>) -> Result<Box<dyn Tokenizer>> {
    match spec.map(|s| s.get("kind").and_then(Value::as_str)) {
        None | Some(Some("bytes")) => Ok(Box::new(ByteTokenizer)),
        Some(Some("hf")) => Err(DataError::Tokenizer(format!(
            "a Hugging Face tokenizer is loaded from its files in the checkpoint's {}/ directory",
            crate::hf_tokenizer::HF_TOKENIZER_DIR
        ))),
        Some(kind) => Err(DataError::Tokenizer(format!(
            "unknown tokenizer kind {kind:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_any_text() {
        let t = ByteTokenizer;
        for text in [
            "",
            "hello",
            "déjà vu ñandú",
            "fn main() { 1 + 2 }\n",
            "日本語 🚀",
        ] {
            let ids = t.encode(text);
            assert_eq!(ids.len(), text.len());
            assert!(ids.iter().all(|&i| i < 256));
            assert_eq!(t.decode(&ids), text);
        }
        let mut with_eos = t.encode("ab");
        with_eos.push(ByteTokenizer::EOS);
        assert_eq!(t.decode(&with_eos), "ab");
    }

    #[test]
    fn spec_round_trips() {
        let spec = ByteTokenizer.spec();
        assert_eq!(from_spec(Some(&spec)).unwrap().vocab_size(), 258);
        assert_eq!(from_spec(None).unwrap().encode("A"), vec![65]);
        assert!(from_spec(Some(&json!({"kind": "bpe"}))).is_err());
    }
}
