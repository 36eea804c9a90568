#!/usr/bin/env python3
"""Makes the Hugging Face reference fixtures of crates/moe-model/tests/hf_families.rs.

Run by hand (not in CI), with transformers 5 and torch installed:

    python3 scripts/hf_fixtures.py [OUT_DIR]

For each family it builds a tiny random model with transformers (hidden 64, 2-4 layers, 4-8
experts, vocabulary 256), perturbs every norm weight and bias so that a missing term shows,
saves it with save_pretrained (float32), and writes `reference.json` next to it: the prompt,
the logits of the prompt and 24 greedy tokens (`eos_token_id=None`), and the smallest gap
between the best and second-best logit over the greedy steps (a tie would make the tokens
fragile). transformers 5 holds MoE experts fused (`mlp.experts.gate_up_proj`) but save_pretrained writes
each family's original key layout (Mixtral: `block_sparse_moe.experts.N.w1/w2/w3`);
`mixtral-fused` is the Mixtral fixture saved from the state dict in the fused layout, checked to
load back into transformers with the same logits.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    GraniteMoeConfig,
    GraniteMoeForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "crates/moe-model/tests/fixtures/hf"
PROMPT = [1, 17, 200, 42, 99, 3, 128, 255, 64, 7]
NEW_TOKENS = 24

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    initializer_range=0.15,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

FAMILIES = {
    # head_dim other than hidden / heads, k = 3.
    "mixtral": (
        MixtralForCausalLM,
        MixtralConfig(
            **COMMON,
            num_hidden_layers=2,
            head_dim=24,
            intermediate_size=16,
            num_local_experts=8,
            num_experts_per_tok=3,
            sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    # q/k norm over the whole projection; no top-k renormalisation.
    "olmoe": (
        OlmoeForCausalLM,
        OlmoeConfig(
            **COMMON,
            num_hidden_layers=2,
            intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
    ),
    # Per-head q/k norm, renormalised top-k, MoE every second layer, head_dim 12, k = 3.
    "qwen3_moe": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig(
            **COMMON,
            num_hidden_layers=4,
            head_dim=12,
            intermediate_size=32,
            moe_intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            decoder_sparse_step=2,
            mlp_only_layers=[],
            use_sliding_window=False,
        ),
    ),
    # q/k/v biases, gated shared expert, no renormalisation, a dense layer among MoE ones.
    "qwen2_moe": (
        Qwen2MoeForCausalLM,
        Qwen2MoeConfig(
            **COMMON,
            num_hidden_layers=3,
            intermediate_size=32,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            use_sliding_window=False,
        ),
    ),
    # Embedding, residual, attention and logits multipliers.
    "granitemoe": (
        GraniteMoeForCausalLM,
        GraniteMoeConfig(
            **COMMON,
            num_hidden_layers=2,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            embedding_multiplier=3.0,
            residual_multiplier=0.6,
            attention_multiplier=0.2,
            logits_scaling=2.5,
        ),
        {"tie_word_embeddings": True},
    ),
}


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Norm weights start at 1 and biases at 0, where a missing term would not show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def reference(model: torch.nn.Module) -> dict:
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = model(ids).logits[0]
        out = model.generate(
            ids,
            do_sample=False,
            min_new_tokens=NEW_TOKENS,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=None,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    top2 = [s[0].topk(2).values for s in out.scores]
    gaps = [float(v[0] - v[1]) for v in top2]
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "prompt": PROMPT,
        "logits": logits.tolist(),
        "tokens": out.sequences[0, len(PROMPT):].tolist(),
        "min_greedy_gap": min(gaps),
    }


def keys(dir: Path) -> list[str]:
    with safe_open(dir / "model.safetensors", "pt") as f:
        return sorted(f.keys())


def fused_copy(model: torch.nn.Module, src: Path, dst: Path, ref: dict) -> None:
    """The model's own (in-memory) transformers-5 key layout, saved as it stands: fused experts
    `mlp.experts.gate_up_proj` [E, 2F, D] / `down_proj` [E, D, F] and the router `mlp.gate`.
    save_pretrained converts these back to the original per-expert layout; checkpoints written
    from the state dict (or by other tools) keep them. Checked to load back into transformers
    with the same logits."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    back = type(model).from_pretrained(dst).eval()
    again = reference(back)
    diff = max(
        abs(a - b)
        for ra, rb in zip(again["logits"], ref["logits"])
        for a, b in zip(ra, rb)
    )
    assert diff == 0.0 and again["tokens"] == ref["tokens"], diff
    (dst / "reference.json").write_text(json.dumps(again))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for i, (family, (cls, config, *overrides)) in enumerate(FAMILIES.items()):
        for override in overrides:
            for key, value in override.items():
                setattr(config, key, value)
        torch.manual_seed(1000 + i)
        model = cls(config).eval()
        perturb(model, 2000 + i)
        dir = OUT / family
        shutil.rmtree(dir, ignore_errors=True)
        model.save_pretrained(dir, safe_serialization=True)
        ref = reference(model)
        (dir / "reference.json").write_text(json.dumps(ref))
        size = sum(p.stat().st_size for p in dir.iterdir())
        print(f"{family}: {size / 1024:.0f} KiB, min greedy gap {ref['min_greedy_gap']:.2e}")
        print("   ", [k for k in keys(dir) if ".layers.0." in k or ".layers." not in k])
        if family == "mixtral":
            fused = OUT / "mixtral-fused"
            shutil.rmtree(fused, ignore_errors=True)
            fused_copy(model, dir, fused, ref)
            print("mixtral-fused:", [k for k in keys(fused) if ".layers.0.mlp" in k])


if __name__ == "__main__":
    main()
