#!/usr/bin/env python3
"""Decode and prefill speed of `moe` against Hugging Face transformers' `generate`, side by side
in one run on the same machine and threads (docs/benchmarks.md, "Generation"). Run by hand; needs
torch and transformers (not part of CI).

    python3 scripts/peer_decode.py [--moe target/release/moe] [--work /tmp/peer-decode]
        [--threads 2] [--new-tokens 32] [--contexts 16,128,1024] [--batches 1,16] [--rounds 3]

It builds a random Mixtral with transformers (d_model 512, 4 layers, 8 experts of d_ff 1024,
top-2, 8 query and 2 key/value heads, a 256-token vocabulary, float32, seed 0), saves it, imports
it with `moe import-hf`, then times, for each context length and batch size:
- transformers: `model.generate` (greedy, `min_new_tokens = max_new_tokens`, no end token) with 1
  and with 1 + N new tokens; prefill tokens/s from the first, decode tokens/s from the difference
  (N new tokens for each sequence of the batch). Each timing is the best of `--repeats`.
- moe: `moe bench --decode CKPT --json` on flex with the same contexts, batch sizes and N.
and prints one table with both and the ratios. It does so `--rounds` times, alternating which
peer goes first, then gives each of issue 15's targets (the ratios to transformers, position 1000
against position 16, batch 16 against batch 1) as a mean over the rounds with its 95% interval,
"met" or "not met" only where the whole interval lies on one side of the target (this machine's
speed drifts by 10-30% between runs, so one round decides little). The prompt ids are the same pseudo-random ids
`moe bench --decode` uses. Threads: torch.set_num_threads(--threads); moe uses every core.

It also prints the machine's ceilings, measured by torch in the same run, against which the
targets can be read:
- read bandwidth (the sum of a 512 MiB tensor) and the weight bytes a decode step reads: at
  batch 1 the active experts, at batch B the experts at least one of the B tokens routes to
  (expected E * (1 - (1 - k/E)^B) per layer with uniform routing). A step cannot beat the read
  bandwidth, and at equal efficiency (the same share of the bandwidth) batch B reaches at most
  B * bytes(1) / bytes(B) times batch 1's tokens/s;
- matmul speed (a [2048, 2048] x [2048, 2048] float32 product, the best of 5), against which
  prefill's useful FLOP/s (2 per multiply-add of the active parameters) can be read;
and what the targets would need of them: 1.5x transformers' prefill in useful FLOP/s against the
matmul ceiling, and 6x batch 1's decode at batch 16 in weight bytes read per second against the
read ceiling (each ceiling the best over the rounds).
"""

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from intervals import summary

ROOT = Path(__file__).resolve().parent.parent


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--moe", default=str(ROOT / "target/release/moe"))
    p.add_argument("--work", default="/tmp/peer-decode")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--contexts", default="16,128,1024")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args()


def build(work: Path) -> Path:
    """The random Mixtral, saved once (float32) and imported once."""
    hf, ckpt = work / "hf", work / "ckpt"
    if not (hf / "config.json").exists():
        torch.manual_seed(0)
        config = MixtralConfig(
            vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
            num_experts_per_tok=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
        MixtralForCausalLM(config).to(torch.float32).save_pretrained(hf)
    return hf


def prompt_ids(context: int, vocab: int, batch: int) -> torch.Tensor:
    """The ids `moe bench --decode` uses: (i * 7919 + 13 + row * 104729) mod vocab."""
    rows = [[(i * 7919 + 13 + r * 104729) % vocab for i in range(context)] for r in range(batch)]
    return torch.tensor(rows, dtype=torch.long)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def hf_case(model, context: int, batch: int, new_tokens: int, repeats: int) -> dict:
    ids = prompt_ids(context, model.config.vocab_size, batch)
    mask = torch.ones_like(ids)

    def run(n):
        return lambda: model.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
            pad_token_id=0,
        )

    with torch.inference_mode():
        run(2)()  # warm-up
        prefill = best_time(run(1), repeats)
        total = best_time(run(1 + new_tokens), repeats)
    decode = total - prefill
    return {
        "prefill_tokens_per_s": batch * context / prefill,
        # None where the subtraction is lost in the prefill's noise (long prefill, few steps).
        "decode_tokens_per_s": batch * new_tokens / decode if decode > 0 else None,
    }


def ceilings(config, batches: list[int], threads: int) -> dict:
    """Read bandwidth, matmul speed and the weight bytes of a decode step (float32)."""
    torch.set_num_threads(threads)
    big = torch.ones(128 * 1024 * 1024)  # 512 MiB
    big.sum()
    read = best_time(lambda: big.sum(), 5)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    mm = best_time(lambda: a @ b, 5)
    d, f, e, k = config.hidden_size, config.intermediate_size, config.num_local_experts, \
        config.num_experts_per_tok
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    attn = d * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    expert, layers = 3 * d * f, config.num_hidden_layers

    def step_bytes(batch):
        experts = e * (1 - (1 - k / e) ** batch)
        return 4 * (layers * (attn + d * e + experts * expert) + d * config.vocab_size)

    return {
        "read_gb_per_s": big.numel() * 4 / read / 1e9,
        "matmul_gflop_per_s": 2 * 2048 ** 3 / mm / 1e9,
        "active_flop_per_token": 2 * (layers * (attn + d * e + k * expert) + d * config.vocab_size),
        "step_bytes": {b: step_bytes(b) for b in batches},
        "batch_bound": {b: b * step_bytes(1) / step_bytes(b) for b in batches},
    }


def moe_cases(a, ckpt: Path) -> dict:
    """One `moe bench --decode` run of every case, by (batch, context)."""
    out = subprocess.run(
        [a.moe, "bench", "--decode", str(ckpt), "--json", "--new-tokens", str(a.new_tokens),
         "--context", a.contexts, "--batch", a.batches],
        check=True, capture_output=True, text=True,
    )
    return {(c["batch"], c["context"]): c for c in json.loads(out.stdout)["cases"]}


def print_round(peer: dict, ours: dict):
    print(f"{'batch':>5} {'context':>7} | {'prefill tok/s: moe':>18} {'HF':>8} {'ratio':>6} | "
          f"{'decode tok/s: moe':>17} {'HF':>8} {'ratio':>6}")
    for (b, c), p in peer.items():
        m = ours[(b, c)]
        pre = m["prefill_tokens_per_s"] / p["prefill_tokens_per_s"]
        hf_dec = p["decode_tokens_per_s"]
        shown = (f"{hf_dec:>8.1f} {m['decode_tokens_per_s'] / hf_dec:>6.2f}" if hf_dec
                 else f"{'n/a':>8} {'n/a':>6}")
        print(f"{b:>5} {c:>7} | {m['prefill_tokens_per_s']:>18.1f} {p['prefill_tokens_per_s']:>8.1f}"
              f" {pre:>6.2f} | {m['decode_tokens_per_s']:>17.1f} {shown}", flush=True)


def targets(peer: dict, ours: dict, contexts: list[int], batches: list[int]) -> dict:
    """The issue's targets as measured in one round: name -> (value, target)."""
    out = {}
    for (b, c), p in peer.items():
        m = ours[(b, c)]
        out[f"prefill ratio, batch {b}, context {c}"] = (
            m["prefill_tokens_per_s"] / p["prefill_tokens_per_s"], 1.5)
        if b == 1 and p["decode_tokens_per_s"]:
            out[f"decode ratio, batch 1, context {c}"] = (
                m["decode_tokens_per_s"] / p["decode_tokens_per_s"], 3.0)
    if 1 in batches and {16, 1024} <= set(contexts):
        out["moe decode, position 1000 / position 16, batch 1"] = (
            ours[(1, 1024)]["decode_tokens_per_s"] / ours[(1, 16)]["decode_tokens_per_s"], 0.9)
    for b in [b for b in batches if b > 1 and 1 in batches]:
        for c in contexts:
            out[f"moe decode, batch {b} / batch 1, context {c}"] = (
                ours[(b, c)]["decode_tokens_per_s"] / ours[(1, c)]["decode_tokens_per_s"], 6.0)
    return out


def print_ceilings(roof: dict, rounds: list[dict], threads: int):
    """The machine's ceilings, and what each unmet-looking target would need of them."""
    read, mm = roof["read_gb_per_s"], roof["matmul_gflop_per_s"]
    flop = roof["active_flop_per_token"] / 1e9
    print(f"\nceilings (torch, {threads} threads, the best of each round): read {read:.1f} GB/s, "
          f"matmul {mm:.1f} GFLOP/s; {flop * 1e3:.1f} MFLOP per token")
    for b in sorted(roof["step_bytes"]):
        ceiling = b * read * 1e9 / roof["step_bytes"][b]
        print(f"  batch {b:>2}: a decode step reads {roof['step_bytes'][b] / 1e6:.1f} MB of "
              f"weights: at most {ceiling:.0f} tokens/s at the read bandwidth; at equal "
              f"efficiency, batch {b} / batch 1 tokens/s is at most {roof['batch_bound'][b]:.2f}x")
    mean = statistics.fmean
    for (b, c) in rounds[0]["transformers"]:
        hf = mean([r["transformers"][(b, c)]["prefill_tokens_per_s"] for r in rounds]) * flop
        ours = mean([r["moe"][(b, c)]["prefill_tokens_per_s"] for r in rounds]) * flop
        line = (f"  batch {b:>2} context {c:>4}: prefill useful GFLOP/s moe {ours:.1f}, HF {hf:.1f};"
                f" 1.5x HF needs {1.5 * hf:.1f} ({1.5 * hf / mm:.0%} of the matmul ceiling)")
        if b == 1:
            dec = mean([r["moe"][(1, c)]["decode_tokens_per_s"] for r in rounds])
            line += f"; batch-1 decode reads weights at {dec * roof['step_bytes'][1] / 1e9:.1f} GB/s"
        print(line)
    for b in sorted(roof["step_bytes"]):
        if b == 1:
            continue
        for c in sorted({c for (_, c) in rounds[0]["moe"]}):
            one = mean([r["moe"][(1, c)]["decode_tokens_per_s"] for r in rounds])
            need = 6 * one * roof["step_bytes"][b] / b / 1e9
            print(f"  batch {b:>2} context {c:>4}: 6x batch 1 ({6 * one:.0f} tokens/s) would read "
                  f"weights at {need:.1f} GB/s ({need / read:.0%} of the read ceiling)")


def main():
    a = parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    hf = build(work)
    ckpt = work / "ckpt"
    if not (ckpt / "model.bpk").exists() and not ckpt.exists():
        subprocess.run([a.moe, "import-hf", str(hf), "--out", str(ckpt)], check=True)
    contexts = [int(c) for c in a.contexts.split(",")]
    batches = [int(b) for b in a.batches.split(",")]

    torch.set_num_threads(a.threads)
    model = MixtralForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    rounds, roofs = [], []
    for i in range(a.rounds):
        # Alternate which peer runs first, so that a drift of the machine within a round
        # favours neither.
        if i % 2:
            ours = moe_cases(a, ckpt)
        peer = {(b, c): hf_case(model, c, b, a.new_tokens, a.repeats)
                for b in batches for c in contexts}
        if i % 2 == 0:
            ours = moe_cases(a, ckpt)
        roofs.append(ceilings(model.config, sorted(set(batches) | {1}), a.threads))
        print(f"\nround {i + 1} of {a.rounds}: torch {torch.__version__} with {a.threads} "
              "threads; moe on flex")
        print_round(peer, ours)
        rounds.append({"transformers": peer, "moe": ours,
                       "targets": targets(peer, ours, contexts, batches)})

    print(f"\ntargets over {a.rounds} round(s): mean ± 95% interval (per round min-max); met or "
          "not met where the interval lies wholly on one side of the target")
    names = rounds[0]["targets"]
    for name in names:
        xs = [r["targets"][name][0] for r in rounds if name in r["targets"]]
        print(f"  {name:<48} {summary(xs, names[name][1])}")
    roof = {k: max(r[k] for r in roofs) for k in ("read_gb_per_s", "matmul_gflop_per_s")}
    roof.update({k: roofs[0][k] for k in ("active_flop_per_token", "step_bytes", "batch_bound")})
    print_ceilings(roof, rounds, a.threads)
    def key(cases: dict) -> dict:
        return {f"{b},{c}": v for (b, c), v in cases.items()}

    (work / "peer_decode.json").write_text(json.dumps({
        "rounds": [{"transformers": key(r["transformers"]), "moe": key(r["moe"]),
                    "targets": r["targets"]} for r in rounds],
        "ceilings": roofs}, indent=1))


if __name__ == "__main__":
    main()
