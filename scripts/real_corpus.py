#!/usr/bin/env python3
"""Assembles a corpus of real text from files on this machine, one file per domain, for
`moe train --data DIR`: Rust sources and Markdown documentation from the cargo registry,
Python's standard library, and C headers from /usr/include.

Files are taken in sorted path order, at most --per-file bytes of each (so that no single large
file dominates), until a domain has --bytes bytes. `moe` keeps the last tenth of each domain as
validation text, so validation comes from other files than training (the last files in order).
Exact duplicate files (licence texts, vendored copies) are kept once.

    python3 scripts/real_corpus.py --out /tmp/realtext
"""
import argparse
import glob
import hashlib
import os


def collect(patterns, limit, per_file):
    paths = sorted({p for pat in patterns for p in glob.glob(os.path.expanduser(pat), recursive=True)})
    seen, parts, total = set(), [], 0
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read(per_file)
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.sha256(data).digest()
        if digest in seen or len(text.strip()) < 200:
            continue
        seen.add(digest)
        # A cut file ends at its last whole line.
        if len(data) == per_file:
            text = text[: text.rfind("\n") + 1]
        parts.append(text)
        total += len(text.encode())
        if total >= limit:
            break
    return "".join(parts), len(parts)


DOMAINS = {
    "rust": ["~/.cargo/registry/src/*/*/src/**/*.rs"],
    "markdown": ["~/.cargo/registry/src/*/*/*.md", "~/.cargo/registry/src/*/*/docs/**/*.md"],
    "python": ["/root/.pyenv/versions/3.11.7/lib/python3.11/*.py",
               "/root/.pyenv/versions/3.11.7/lib/python3.11/*/*.py",
               "/usr/lib/python3/dist-packages/**/*.py"],
    "c": ["/usr/include/**/*.h"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--bytes", type=int, default=4_000_000)
    ap.add_argument("--per-file", type=int, default=16_000)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for name, patterns in DOMAINS.items():
        text, files = collect(patterns, a.bytes, a.per_file)
        with open(os.path.join(a.out, name + ".txt"), "w") as f:
            f.write(text)
        print(f"{name}: {len(text.encode())} bytes from {files} files")


if __name__ == "__main__":
    main()
