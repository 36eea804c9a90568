#!/usr/bin/env python3
"""The MoE layer alone against Hugging Face transformers' `MixtralSparseMoeBlock` on PyTorch CPU,
side by side in one run (docs/benchmarks.md, "The MoE layer against transformers"). Run by hand;
needs torch and transformers (not part of CI).

    python3 scripts/peer_moe_layer.py [--moe target/release/moe] [--threads 2] [--repeats 9]
        [--rounds 3]

Cases (forward, inference, 2048 tokens of d_model 512, top-2, float32):
- E=8, d_ff 1024: `moe bench` case `moe_top2_fwd`;
- E=64, d_ff 512: `moe bench` case `moe_e64_top2_fwd`.
transformers: the block with random weights, `torch.inference_mode()`, the median of --repeats
timed calls after two warm-up calls, each on a fresh N(0, 1) input. moe: `moe bench --json` on
flex (median call of its own, also on fresh inputs). Prints tokens/s of both and the ratio, for
each of `--rounds` rounds (alternating which peer goes first), then each case's ratio as a mean
over the rounds with its 95% interval against the target of 1.2x ("met" or "not met" only where
the whole interval lies on one side of it).
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

from intervals import summary

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


def matmul_gflop_per_s() -> float:
    """torch's own `[2048, 2048]` float32 product, the best of 5: the ceiling a layer of large
    matmuls can approach on this machine and these threads."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048 ** 3 / min(times) / 1e9


def flop_per_token(experts: int, d_ff: int) -> int:
    """2 per multiply-add: the router, then the 2 experts' three projections."""
    return 2 * (D_MODEL * experts + 2 * 3 * D_MODEL * d_ff)


def moe_tokens_per_s(moe: str) -> dict:
    names = ",".join(name for name, _, _ in CASES)
    out = subprocess.run([moe, "bench", "--json", "--cases", names], check=True,
                         capture_output=True, text=True)
    return {c["name"]: c["tokens_per_s"] for c in json.loads(out.stdout)["cases"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--moe", default=str(ROOT / "target/release/moe"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ratios = {name: [] for name, _, _ in CASES}
    peers, ceiling = {name: [] for name, _, _ in CASES}, 0.0
    for i in range(a.rounds):
        if i % 2:
            ours = moe_tokens_per_s(a.moe)
        peer = {name: hf_tokens_per_s(e, f, a.repeats) for name, e, f in CASES}
        if i % 2 == 0:
            ours = moe_tokens_per_s(a.moe)
        ceiling = max(ceiling, matmul_gflop_per_s())
        print(f"round {i + 1} of {a.rounds}: torch {torch.__version__} with {a.threads} threads; "
              f"moe on flex; {TOKENS} tokens")
        print(f"{'case':<20} {'moe tok/s':>10} {'HF tok/s':>10} {'ratio':>6}")
        for name, e, f in CASES:
            ratios[name].append(ours[name] / peer[name])
            peers[name].append(peer[name])
            print(f"{name:<20} {ours[name]:>10.0f} {peer[name]:>10.0f} "
                  f"{ours[name] / peer[name]:>6.2f}   (E={e}, d_ff {f})", flush=True)
    print(f"\nratio over {a.rounds} round(s): mean ± 95% interval (per round min-max)")
    for name, e, f in CASES:
        print(f"  {name:<20} {summary(ratios[name], 1.2)}")
    print(f"\nceiling: torch's [2048, 2048] matmul, {ceiling:.1f} GFLOP/s (the best of the rounds)")
    for name, e, f in CASES:
        hf = statistics.fmean(peers[name]) * flop_per_token(e, f) / 1e9
        print(f"  {name:<20} HF {hf:.1f} GFLOP/s; 1.2x HF needs {1.2 * hf:.1f} "
              f"({1.2 * hf / ceiling:.0%} of the ceiling)")


if __name__ == "__main__":
    main()
