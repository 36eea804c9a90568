#!/usr/bin/env python3
"""Writes a random Hugging Face Mixtral checkpoint of a chosen size, sharded, in bf16, for
measuring the memory of `moe import-hf` (docs/memory.md). Run by hand; needs numpy only.

    python3 scripts/make_big_hf.py OUT_DIR [--layers 8] [--experts 16] [--d-model 1024]
        [--d-ff 2816] [--vocab 32000] [--layers-per-shard 2] [--seed 0]

The defaults give about 1.2B parameters, 2.4 GB in bf16, in 4 shards plus one for the
embedding and head. Values are N(0, 0.02) rounded to bf16 (the upper 16 bits of the f32).
Written with a minimal safetensors writer (8-byte header length, JSON header, raw bytes).
"""

import argparse
import json
import os
import struct

import numpy as np


def bf16(rng, shape):
    """N(0, 0.02) values as bf16 bit patterns (round to nearest even from f32)."""
    x = (rng.standard_normal(size=shape, dtype=np.float32) * 0.02).view(np.uint32)
    rounded = x + 0x7FFF + ((x >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def write_safetensors(path, tensors):
    """tensors: list of (name, uint16 array holding bf16 bits)."""
    header, offset = {}, 0
    for name, array in tensors:
        n = array.nbytes
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, array in tensors:
            f.write(array.tobytes())


def layer_tensors(rng, i, a):
    d, f, e = a.d_model, a.d_ff, a.experts
    heads, kv, hd = a.d_model // 64, a.d_model // 256, 64
    p = f"model.layers.{i}"
    out = [
        (f"{p}.self_attn.q_proj.weight", bf16(rng, (heads * hd, d))),
        (f"{p}.self_attn.k_proj.weight", bf16(rng, (kv * hd, d))),
        (f"{p}.self_attn.v_proj.weight", bf16(rng, (kv * hd, d))),
        (f"{p}.self_attn.o_proj.weight", bf16(rng, (d, heads * hd))),
        (f"{p}.input_layernorm.weight", np.full((d,), 0x3F80, np.uint16)),
        (f"{p}.post_attention_layernorm.weight", np.full((d,), 0x3F80, np.uint16)),
        (f"{p}.block_sparse_moe.gate.weight", bf16(rng, (e, d))),
    ]
    for j in range(e):
        q = f"{p}.block_sparse_moe.experts.{j}"
        out += [
            (f"{q}.w1.weight", bf16(rng, (f, d))),
            (f"{q}.w2.weight", bf16(rng, (d, f))),
            (f"{q}.w3.weight", bf16(rng, (f, d))),
        ]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--layers-per-shard", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    shards = [list(range(s, min(s + a.layers_per_shard, a.layers))) for s in range(0, a.layers, a.layers_per_shard)]
    total = len(shards) + 1
    weight_map, size = {}, 0
    for k, layers in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
        tensors = [t for i in layers for t in layer_tensors(rng, i, a)]
        write_safetensors(os.path.join(a.out, name), tensors)
        for n, array in tensors:
            weight_map[n] = name
            size += array.nbytes
        print(f"wrote {name}", flush=True)
    name = f"model-{total:05d}-of-{total:05d}.safetensors"
    d = a.d_model
    tensors = [
        ("model.embed_tokens.weight", bf16(rng, (a.vocab, d))),
        ("model.norm.weight", np.full((d,), 0x3F80, np.uint16)),
        ("lm_head.weight", bf16(rng, (a.vocab, d))),
    ]
    write_safetensors(os.path.join(a.out, name), tensors)
    for n, array in tensors:
        weight_map[n] = name
        size += array.nbytes
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": size}, "weight_map": weight_map}, f, indent=1)
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": a.vocab,
        "hidden_size": d,
        "intermediate_size": a.d_ff,
        "num_hidden_layers": a.layers,
        "num_attention_heads": d // 64,
        "num_key_value_heads": d // 256,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "sliding_window": None,
        "num_local_experts": a.experts,
        "num_experts_per_tok": a.top_k,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    print(f"{a.out}: {size / 1e9:.2f} GB of bf16 weights in {total} shards")


if __name__ == "__main__":
    main()
