#!/usr/bin/env python3
"""Summarise a cubecl kernel profile: kernels launched, their summed GPU time, and where it went.

cubecl (Burn's wgpu backend) times every kernel when its profiling logger is on. Put this
`cubecl.toml` in the directory a `moe` command runs from (run by hand, e.g. on a GPU machine):

    [profiling.logger]
    level = "basic"
    file = "prof.log"
    append = false

then `python3 scripts/cubecl_profile.py prof.log --per 64 --wall-ms 1234` prints the kernel count
and kernel time per unit of work (`--per`: decode steps, calls; `--wall-ms`: the command's own
time for the same work, so that the gap between the two is launch, transfer and host time).
"""
import argparse
import collections
import re

LINE = re.compile(r"^\|\s*([0-9.]+)(ns|µs|us|ms|s)\s*\|\s*(.+?)\s*$")
SCALE = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}


def kernels(path):
    """(name, milliseconds) of every timed kernel in the log, in launch order."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = LINE.match(line)
            if m:
                yield m.group(3), float(m.group(1)) * SCALE[m.group(2)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log")
    p.add_argument("--per", type=float, default=1.0, help="units of work in the log")
    p.add_argument("--wall-ms", type=float, help="wall time of the same work, ms")
    p.add_argument("--skip", type=int, default=0, help="leave out the first N kernels")
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()
    if a.per <= 0:
        p.error("--per must be positive")
    runs = list(kernels(a.log))[a.skip :]
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for name, ms in runs:
        parts = name.split(" | ")
        if len(parts) > 2:  # matmuls spell out every type parameter: first and last say enough
            name = f"{parts[0]} .. {parts[-1]}"
        by_name[name][0] += 1
        by_name[name][1] += ms
    total = sum(ms for _, ms in runs)
    print(f"{len(runs)} kernels, {total:.2f} ms of kernel time")
    print(f"per unit ({a.per:g}): {len(runs) / a.per:.1f} kernels, {total / a.per:.3f} ms")
    if a.wall_ms:
        print(f"wall {a.wall_ms:.2f} ms: kernels are {100 * total / a.wall_ms:.0f}% of it")
    print(f"\n{'ms':>10} {'share':>6} {'count':>7} {'us each':>9}  kernel")
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    for name, (count, ms) in ranked[: a.top]:
        share = 100 * ms / total if total else 0.0
        print(f"{ms:10.3f} {share:5.1f}% {count:7d} {1e3 * ms / count:9.1f}  {name}")


if __name__ == "__main__":
    main()
