#!/usr/bin/env python3
"""Makes the Hugging Face tokenizer fixtures (run by hand, not in CI).

Needs `tokenizers`, `transformers`, `torch` and `safetensors` (see docs/ or
/work/shared/docs/hf-fixtures.md for a venv recipe):

    python scripts/hf_tokenizer_fixture.py

Writes:
- crates/moe-train/tests/fixtures/hf-tokenizer/: a small byte-level BPE `tokenizer.json`
  trained here (NFC normaliser, byte-level pre-tokeniser, a post-processor that adds BOS),
  wrapped by transformers' PreTrainedTokenizerFast with BOS/EOS and a chat template, and
  `expected.json`: transformers' ids (`tokenizer(text)["input_ids"]`) and decoded text of several
  strings, non-ASCII included, and the rendered chat prompt with its ids.
- crates/moe-cli/tests/fixtures/hf-mixtral-eos/: a tiny random Mixtral over that vocabulary in
  the per-expert (w1/w2/w3) safetensors layout, the same tokenizer files, and a
  `generation_config.json` whose EOS list holds the tokenizer's EOS and a token that greedy
  decoding of the prompt produces; `expected.json` has the tokens transformers generates with
  that EOS list and with the tokenizer's EOS alone.
"""

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / "crates/moe-train/tests/fixtures/hf-tokenizer"
MODEL_DIR = ROOT / "crates/moe-cli/tests/fixtures/hf-mixtral-eos"
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "fn main() { let x = 1 + 2; println!(\"{x}\"); }",
    "12 + 30 = 42; 7 * 6 = 42; 100 - 58 = 42",
    "El veloz murciélago hindú comía feliz cardillo y kiwi.",
    "La cigüeña tocaba el saxofón detrás del palenque de paja.",
    "Déjà vu: a café in Zürich serves crème brûlée and naïve piñatas.",
    "日本語のテキストも少しあります。🚀 emoji too.",
    "def add(a, b):\n    return a + b\n",
] * 20

STRINGS = [
    "Hello world",
    "The lazy dog jumps over the quick brown fox.",
    "déjà vu ñandú",
    "Cafe\u0301 vs Café",  # NFD and NFC: the normaliser makes them one
    "日本語 🚀",
    "  two leading spaces\nand\ttabs",
    "<s> literal special tokens </s>",
    "fn f(x: u32) -> u32 { x * 2 }",
    "",
]

CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'].strip() }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHAT = [{"role": "user", "content": "  ¿Cuánto es 12 + 30?  "}]
PROMPT = "The quick brown"


def train_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


# Changes to the saved files and the ids transformers then gives for STRINGS[0]: special tokens
# come from tokenizer.json's post-processor only (none without one); transformers 5's generic
# tokenizer ignores add_bos_token / add_eos_token in tokenizer_config.json.
VARIANTS = {
    "no_post_processor": (True, {}),
    "no_post_processor_add_bos_eos": (True, {"add_bos_token": True, "add_eos_token": True}),
    "add_eos_only": (False, {"add_eos_token": True}),
}


def variant_ids(drop_post_processor, config_changes):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in TOKENIZER_FILES:
            if (TOKENIZER_DIR / name).exists():
                shutil.copy(TOKENIZER_DIR / name, tmp / name)
        if drop_post_processor:
            tok = json.loads((tmp / "tokenizer.json").read_text())
            tok["post_processor"] = None
            (tmp / "tokenizer.json").write_text(json.dumps(tok))
        config = json.loads((tmp / "tokenizer_config.json").read_text())
        config.update(config_changes)
        (tmp / "tokenizer_config.json").write_text(json.dumps(config))
        return PreTrainedTokenizerFast.from_pretrained(tmp)(STRINGS[0])["input_ids"]


def write_json(path, value):
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n")


def tokenizer_fixture(hf):
    if TOKENIZER_DIR.exists():
        shutil.rmtree(TOKENIZER_DIR)
    TOKENIZER_DIR.mkdir(parents=True)
    hf.save_pretrained(TOKENIZER_DIR)
    # Reload from disk, as a user would, so the expected values come from the saved files.
    hf = PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR)
    encodings = []
    for text in STRINGS:
        ids = hf(text)["input_ids"]
        encodings.append(
            {"text": text, "ids": ids, "decoded": hf.decode(ids, skip_special_tokens=True)}
        )
    rendered = hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    chat_ids = hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    if not isinstance(chat_ids, list):  # transformers 5 returns a BatchEncoding
        chat_ids = chat_ids["input_ids"]
    write_json(
        TOKENIZER_DIR / "expected.json",
        {
            "vocab_size": len(hf),
            "eos": [hf.eos_token_id],
            "encodings": encodings,
            "chat": {"messages": CHAT, "rendered": rendered, "ids": chat_ids},
            "variants": {
                name: {
                    "drop_post_processor": drop,
                    "tokenizer_config": changes,
                    "text": STRINGS[0],
                    "ids": variant_ids(drop, changes),
                }
                for name, (drop, changes) in VARIANTS.items()
            },
        },
    )
    return hf


def legacy_mixtral_tensors(model, config):
    """The state dict in the per-expert layout (block_sparse_moe.experts.N.w1/w2/w3)."""
    out = {}
    f = config.intermediate_size
    for name, value in model.state_dict().items():
        value = value.detach().contiguous()
        if ".mlp.experts.gate_up_proj" in name:  # [E, 2F, D], gate rows then up rows
            prefix = name.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.w1.weight"] = value[e, :f].contiguous()
                out[f"{prefix}.{e}.w3.weight"] = value[e, f:].contiguous()
        elif ".mlp.experts.down_proj" in name:  # [E, D, F]
            prefix = name.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts")
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.w2.weight"] = value[e].contiguous()
        elif ".mlp.gate." in name:
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = value
        elif ".block_sparse_moe." in name or ".mlp." not in name:
            out[name] = value
        else:
            raise SystemExit(f"unexpected tensor {name}")
    return out


def model_fixture(hf):
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(hf),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        initializer_range=0.5,
        tie_word_embeddings=False,
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
    )
    model = MixtralForCausalLM(config).eval()
    # Nothing inherited from the model config: each run names its EOS ids.
    model.generation_config = GenerationConfig()
    prompt = torch.tensor([hf(PROMPT)["input_ids"]])
    n = prompt.shape[1]

    def greedy(eos):
        # An explicit mask: generate would otherwise mask every pad id, here BOS and EOS too.
        config = GenerationConfig(
            max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=hf.eos_token_id
        )
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
        return out[0, n:].tolist()

    # Greedy decoding is the arg-max of a plain forward at every step.
    free = greedy(None)
    with torch.no_grad():
        logits = model(torch.tensor([prompt[0].tolist() + free])).logits[0]
    assert logits[n - 1 : -1].argmax(-1).tolist() == free
    # With the tokenizer's EOS only, then with a second EOS: a token greedy decoding reaches
    # after a few steps, at its first occurrence, before any tokenizer EOS.
    tokens = greedy([hf.eos_token_id])
    first = min(3, len(tokens) - 2)
    stop = next(i for i in range(first, len(tokens) - 1) if tokens[i] not in tokens[:i])
    eos = [hf.eos_token_id, tokens[stop]]
    stopped = greedy(eos)
    assert stopped == tokens[: stop + 1], (stopped, tokens)

    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    MODEL_DIR.mkdir(parents=True)
    config_json = config.to_dict()
    config_json["architectures"] = ["MixtralForCausalLM"]
    write_json(MODEL_DIR / "config.json", config_json)
    save_file(legacy_mixtral_tensors(model, config), MODEL_DIR / "model.safetensors")
    write_json(MODEL_DIR / "generation_config.json", {"eos_token_id": eos})
    for name in TOKENIZER_FILES:
        if (TOKENIZER_DIR / name).exists():
            shutil.copy(TOKENIZER_DIR / name, MODEL_DIR / name)
    write_json(
        MODEL_DIR / "expected.json",
        {
            "prompt": PROMPT,
            "prompt_ids": prompt[0].tolist(),
            "eos": eos,
            "greedy_with_tokenizer_eos": tokens,
            "greedy_with_eos": stopped,
        },
    )


def main():
    hf = tokenizer_fixture(train_tokenizer())
    model_fixture(hf)
    for d in (TOKENIZER_DIR, MODEL_DIR):
        size = sum(p.stat().st_size for p in d.iterdir())
        print(f"{d.relative_to(ROOT)}: {size} bytes")


if __name__ == "__main__":
    main()
