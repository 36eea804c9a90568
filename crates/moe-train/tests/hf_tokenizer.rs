//! The Hugging Face tokenizer against transformers: the fixture under
//! `tests/fixtures/hf-tokenizer` and the ids, decoded text and chat prompt that transformers gives
//! for it, written by `scripts/hf_tokenizer_fixture.py`.

use std::fs;
use std::path::{Path, PathBuf};

use moe_train::HfTokenizer;
use moe_train::chat::ChatMessage;
use moe_train::hf_tokenizer::{HF_TOKENIZER_DIR, carry, copy_files, for_checkpoint};
use moe_train::tokenizer::Tokenizer;
use serde_json::{Value, json};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-tokenizer")
}

fn expected() -> Value {
    serde_json::from_str(&fs::read_to_string(fixture().join("expected.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn ids_and_text_equal_transformers() {
    let t = HfTokenizer::from_dir(&fixture()).unwrap();
    let e = expected();
    assert_eq!(t.vocab_size(), e["vocab_size"].as_u64().unwrap() as usize);
    assert_eq!(t.eos_ids(), ids(&e["eos"]));
    let encodings = e["encodings"].as_array().unwrap();
    assert!(
        encodings
            .iter()
            .any(|c| !c["text"].as_str().unwrap().is_ascii())
    );
    for case in encodings {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(t.try_encode(text).unwrap(), want, "{text:?}");
        assert_eq!(Tokenizer::encode(&t, text), want, "{text:?}");
        assert_eq!(
            t.decode(&want),
            case["decoded"].as_str().unwrap(),
            "{text:?}"
        );
    }
}

#[test]
fn chat_prompt_equals_transformers() {
    let t = HfTokenizer::from_dir(&fixture()).unwrap();
    let chat = &expected()["chat"];
    let messages: Vec<ChatMessage> = chat["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect();
    assert_eq!(
        t.render_chat(&messages).unwrap(),
        chat["rendered"].as_str().unwrap()
    );
    assert_eq!(t.encode_chat(&messages).unwrap(), ids(&chat["ids"]));
    // The template's raise_exception ends in an error naming its message.
    let system = ChatMessage {
        role: "system".into(),
        content: "x".into(),
    };
    let err = t.render_chat(&[system]).unwrap_err().to_string();
    assert!(err.contains("no system messages"), "{err}");
}

/// Copies the fixture's tokenizer files into a fresh directory.
fn copy_of_fixture() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_files(&fixture(), tmp.path()).unwrap();
    tmp
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    fs::write(path, v.to_string()).unwrap();
}

#[test]
fn special_tokens_come_from_the_post_processor_only() {
    for (name, case) in expected()["variants"].as_object().unwrap() {
        let tmp = copy_of_fixture();
        if case["drop_post_processor"].as_bool().unwrap() {
            edit_json(&tmp.path().join("tokenizer.json"), |t| {
                t["post_processor"] = Value::Null;
            });
        }
        edit_json(&tmp.path().join("tokenizer_config.json"), |c| {
            for (k, v) in case["tokenizer_config"].as_object().unwrap() {
                c[k] = v.clone();
            }
        });
        let t = HfTokenizer::from_dir(tmp.path()).unwrap();
        let text = case["text"].as_str().unwrap();
        assert_eq!(t.try_encode(text).unwrap(), ids(&case["ids"]), "{name}");
    }
}

#[test]
fn eos_ids_come_from_generation_config_then_config_then_the_eos_token() {
    let tmp = copy_of_fixture();
    let dir = tmp.path();
    let eos = |dir: &Path| HfTokenizer::from_dir(dir).unwrap().eos_ids().to_vec();
    assert_eq!(eos(dir), [1], "tokenizer_config.json's eos_token");
    fs::write(
        dir.join("config.json"),
        json!({"eos_token_id": 7}).to_string(),
    )
    .unwrap();
    assert_eq!(eos(dir), [7]);
    let generation = dir.join("generation_config.json");
    fs::write(&generation, json!({"eos_token_id": [1, 5, 9]}).to_string()).unwrap();
    assert_eq!(eos(dir), [1, 5, 9]);
    fs::write(&generation, json!({"eos_token_id": "x"}).to_string()).unwrap();
    let err = HfTokenizer::from_dir(dir).unwrap_err().to_string();
    assert!(
        err.contains("generation_config.json") && err.contains("eos_token_id"),
        "{err}"
    );
    // Copying writes the model config's EOS as a generation config, as transformers derives one.
    fs::remove_file(&generation).unwrap();
    let copy = tempfile::tempdir().unwrap();
    let copied = copy_files(dir, copy.path()).unwrap();
    assert!(
        copied.contains(&"generation_config.json".to_string()),
        "{copied:?}"
    );
    assert_eq!(eos(copy.path()), [7]);
}

#[test]
fn bad_files_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let err = HfTokenizer::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    fs::write(tmp.path().join("tokenizer.json"), "{not json").unwrap();
    let err = HfTokenizer::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json") && !err.contains('\n'),
        "{err}"
    );
    let tmp = copy_of_fixture();
    fs::remove_file(tmp.path().join("chat_template.jinja")).unwrap();
    let t = HfTokenizer::from_dir(tmp.path()).unwrap();
    let err = t
        .render_chat(&[ChatMessage::user("hi")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no chat template"), "{err}");
}

/// A checkpoint's tokenizer files travel to the checkpoint made from it (upcycle, merge), and
/// the new checkpoint loads the same tokenizer; a checkpoint without them carries nothing.
#[test]
fn tokenizer_files_are_carried_between_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let (from, to, bare) = (
        tmp.path().join("from"),
        tmp.path().join("to"),
        tmp.path().join("bare"),
    );
    copy_files(&fixture(), &from.join(HF_TOKENIZER_DIR)).unwrap();
    fs::create_dir_all(&to).unwrap();
    fs::create_dir_all(&bare).unwrap();
    assert!(carry(&from, &to).unwrap());
    let (a, b) = (
        for_checkpoint(&from, None).unwrap(),
        for_checkpoint(&to, None).unwrap(),
    );
    let text = expected()["encodings"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(a.encode(&text), b.encode(&text));
    assert_eq!(
        b.vocab_size(),
        expected()["vocab_size"].as_u64().unwrap() as usize
    );
    assert_eq!(b.spec()["kind"], "hf");

    assert!(!carry(&bare, &to.join("nested")).unwrap());
    assert_eq!(
        for_checkpoint(&bare, None).unwrap().vocab_size(),
        258,
        "bytes"
    );
}
