#!/usr/bin/env python3
"""Decode and prefill speed of `moe` against Hugging Face transformers' `generate`, side by side
in one run on the same machine and threads (docs/benchmarks.md, "Generation"). Run by hand; needs
torch and transformers (not part of CI).

    python3 scripts/peer_decode.py [--moe target/release/moe] [--work /tmp/peer-decode]
        [--threads 2] [--new-tokens 32] [--contexts 16,128,1024] [--batches 1,16]

It builds a random Mixtral with transformers (d_model 512, 4 layers, 8 experts of d_ff 1024,
top-2, 8 query and 2 key/value heads, a 256-token vocabulary, float32, seed 0), saves it, imports
it with `moe import-hf`, then times, for each context length and batch size:
- transformers: `model.generate` (greedy, `min_new_tokens = max_new_tokens`, no end token) with 1
  and with 1 + N new tokens; prefill tokens/s from the first, decode tokens/s from the difference
  (N new tokens for each sequence of the batch). Each timing is the best of `--repeats`.
- moe: `moe bench --decode CKPT --json` on flex with the same contexts, batch sizes and N.
and prints one table with both and the ratios. The prompt ids are the same pseudo-random ids
`moe bench --decode` uses. Threads: torch.set_num_threads(--threads); moe uses every core.
"""

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

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
    decode = max(total - prefill, 1e-9)
    return {
        "prefill_tokens_per_s": batch * context / prefill,
        "decode_tokens_per_s": batch * new_tokens / decode,
    }


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
    peer = {}
    for b in batches:
        for c in contexts:
            peer[(b, c)] = hf_case(model, c, b, a.new_tokens, a.repeats)
            print(f"transformers batch {b} context {c}: {peer[(b, c)]}", flush=True)

    out = subprocess.run(
        [a.moe, "bench", "--decode", str(ckpt), "--json", "--new-tokens", str(a.new_tokens),
         "--context", a.contexts, "--batch", a.batches],
        check=True, capture_output=True, text=True,
    )
    ours = {(c["batch"], c["context"]): c for c in json.loads(out.stdout)["cases"]}

    print(f"\ntorch {torch.__version__} with {a.threads} threads; moe on flex")
    print(f"{'batch':>5} {'context':>7} | {'prefill tok/s: moe':>18} {'HF':>8} {'ratio':>6} | "
          f"{'decode tok/s: moe':>17} {'HF':>8} {'ratio':>6}")
    rows = []
    for (b, c), p in peer.items():
        m = ours[(b, c)]
        pre = m["prefill_tokens_per_s"] / p["prefill_tokens_per_s"]
        dec = m["decode_tokens_per_s"] / p["decode_tokens_per_s"]
        print(f"{b:>5} {c:>7} | {m['prefill_tokens_per_s']:>18.1f} {p['prefill_tokens_per_s']:>8.1f}"
              f" {pre:>6.2f} | {m['decode_tokens_per_s']:>17.1f} {p['decode_tokens_per_s']:>8.1f}"
              f" {dec:>6.2f}")
        rows.append({"batch": b, "context": c, "moe": m, "transformers": p,
                     "prefill_ratio": pre, "decode_ratio": dec})
    (work / "peer_decode.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
