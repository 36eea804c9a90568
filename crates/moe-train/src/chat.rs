//! Chat templates of Hugging Face tokenizers, rendered with `minijinja` as transformers renders
//! them with Jinja2: blocks trimmed (`trim_blocks`, `lstrip_blocks`), Python string methods
//! (`strip`, `startswith`, ...), and the globals `messages`, `add_generation_prompt` (true),
//! the tokenizer's special tokens (`bos_token`, `eos_token`, ...) and `raise_exception`.

use std::fs;
use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, Error, ErrorKind, Value as Jinja};
use serde_json::Value;

use crate::error::{DataError, Result};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message from the user.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }

    fn to_jinja(&self) -> Jinja {
        Jinja::from_pairs([
            ("role", self.role.as_str()),
            ("content", self.content.as_str()),
        ])
    }
}

/// A Jinja chat template.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
}

impl ChatTemplate {
    /// The template of a tokenizer directory: `chat_template.jinja`, else the `chat_template` of
    /// `tokenizer_config.json` (a string, or a list of named templates whose `default` is
    /// taken); `None` when there is none.
    pub fn find(dir: &Path, tokenizer_config: &Value) -> Result<Option<Self>> {
        let path = dir.join("chat_template.jinja");
        if path.exists() {
            let source = fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
            return Ok(Some(Self { source }));
        }
        let source = match tokenizer_config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        Ok(source.map(|source| Self { source }))
    }

    /// Renders `messages` with a generation prompt, the special tokens `(name, text)` as
    /// globals.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        special_tokens: &[(&str, String)],
    ) -> Result<String> {
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Jinja, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        let mut context: Vec<(&str, Jinja)> = vec![
            (
                "messages",
                messages.iter().map(ChatMessage::to_jinja).collect(),
            ),
            ("add_generation_prompt", Jinja::from(true)),
        ];
        context.extend(
            special_tokens
                .iter()
                .map(|(name, text)| (*name, Jinja::from(text.as_str()))),
        );
        env.render_str(&self.source, Jinja::from_pairs(context))
            .map_err(|e| DataError::Tokenizer(format!("chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate {
            source: source.into(),
        }
    }

    #[test]
    fn renders_messages_special_tokens_and_python_methods() {
        let t = template(
            "{{ bos_token }}{% for m in messages %}\n<|{{ m.role }}|>{{ m.content.strip() }}\
             {{ eos_token }}{% endfor %}\n  {% if add_generation_prompt %}<|assistant|>{% endif %}",
        );
        let tokens = [
            ("bos_token", "<s>".to_string()),
            ("eos_token", "</s>".to_string()),
        ];
        let out = t.render(&[ChatMessage::user("  hi ")], &tokens).unwrap();
        assert_eq!(out, "<s><|user|>hi</s><|assistant|>");
    }

    #[test]
    fn raise_exception_is_an_error_and_a_missing_token_is_empty() {
        let t = template(
            "{% if messages[0].role != 'system' %}{{ raise_exception('needs a system message') }}{% endif %}",
        );
        let err = t.render(&[ChatMessage::user("x")], &[]).unwrap_err();
        assert!(err.to_string().contains("needs a system message"), "{err}");
        assert_eq!(
            template("[{{ bos_token }}]").render(&[], &[]).unwrap(),
            "[]"
        );
    }

    #[test]
    fn finds_the_template_file_before_the_config_field() {
        let tmp = tempfile::tempdir().unwrap();
        let config = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "default"},
        ]});
        let found = ChatTemplate::find(tmp.path(), &config).unwrap().unwrap();
        assert_eq!(found.render(&[], &[]).unwrap(), "default");
        std::fs::write(tmp.path().join("chat_template.jinja"), "file").unwrap();
        let found = ChatTemplate::find(tmp.path(), &config).unwrap().unwrap();
        assert_eq!(found.render(&[], &[]).unwrap(), "file");
        assert!(
            ChatTemplate::find(tmp.path().join("none").as_path(), &Value::Null)
                .unwrap()
                .is_none()
        );
    }
}
