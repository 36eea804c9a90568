#!/usr/bin/env python3
"""The MoE layer alone against Hugging Face transformers' `MixtralSparseMoeBlock` on PyTorch CPU,
side by side in one run (docs/benchmarks.md, "The MoE layer against transformers"). Run by hand;
needs torch and transformers (not part of CI).

    python3 scripts/peer_moe_layer.py [--moe target/release/moe] [--threads 2] [--repeats 9]

Cases (forward, inference, 2048 tokens of d_model 512, top-2, float32):
- E=8, d_ff 1024: `moe bench` case `moe_top2_fwd`;
- E=64, d_ff 512: `moe bench` case `moe_e64_top2_fwd`.
transformers: the block with random weights, `torch.inference_mode()`, the median of --repeats
timed calls after two warm-up calls, each on a fresh N(0, 1) input. moe: `moe bench --json` on
flex (median call of its own, also on fresh inputs). Prints tokens/s of both and the ratio.
"""

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

ROOT = Path(__file__).resolve().parent.parent
TOKENS, D_MODEL = 2048, 512
CASES = [("moe_top2_fwd", 8, 1024), ("moe_e64_top2_fwd", 64, 512)]


def hf_tokens_per_s(experts: int, d_ff: int, repeats: int) -> float:
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=D_MODEL, intermediate_size=d_ff, num_local_experts=experts,
                           num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(config).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            x = torch.randn(1, TOKENS, D_MODEL)
            start = time.perf_counter()
            out = block(x)
            out = out[0] if isinstance(out, tuple) else out
            float(out.sum())
            if i >= 2:
                times.append(time.perf_counter() - start)
    return TOKENS / statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--moe", default=str(ROOT / "target/release/moe"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    peer = {name: hf_tokens_per_s(e, f, a.repeats) for name, e, f in CASES}
    out = subprocess.run([a.moe, "bench", "--json"], check=True, capture_output=True, text=True)
    ours = {c["name"]: c["tokens_per_s"] for c in json.loads(out.stdout)["cases"]}
    print(f"torch {torch.__version__} with {a.threads} threads; moe on flex; {TOKENS} tokens")
    print(f"{'case':<20} {'moe tok/s':>10} {'HF tok/s':>10} {'ratio':>6}")
    for name, e, f in CASES:
        print(f"{name:<20} {ours[name]:>10.0f} {peer[name]:>10.0f} {ours[name] / peer[name]:>6.2f}"
              f"   (E={e}, d_ff {f})")


if __name__ == "__main__":
    main()
