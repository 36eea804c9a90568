#!/usr/bin/env python3
"""Routing specialisation over seeds (docs/results.md, "Routing specialisation"): reads each
`seed-N/report.json` of an MoE run group (`moe train --seeds N --out GROUP`) and prints, for the
trained routers and each random-router control, the mean over seeds and its 95% Student's t
interval of NMI, NMI as a share of its reachable maximum and I(domain; expert | current token),
then the per-seed ratios of the trained routers' conditional MI to each control's, overall and,
where the reports carry the controls' per-layer figures (`layers_conditional_mi`), per MoE layer.

    python3 scripts/routing_summary.py runs/moe
"""

import json
import sys
from pathlib import Path

from intervals import interval


def main():
    group = Path(sys.argv[1])
    reports = sorted((p for p in group.glob("seed-*/report.json")
                      if p.parent.name[5:].isdigit()), key=lambda p: int(p.parent.name[5:]))
    if not reports:
        sys.exit(f"error: no seed-N/report.json under {group}")
    rows = {"trained routers": {"nmi": [], "nmi_of_max": [], "conditional_mi": []}}
    ratios = {}
    layer_ratios = {}
    for path in reports:
        r = json.loads(path.read_text())
        trained = rows["trained routers"]
        trained["nmi"].append(r["mean_nmi"])
        trained["nmi_of_max"].append(r["mean_nmi_of_max"])
        trained["conditional_mi"].append(r["mean_conditional_mi"])
        for c in r["controls"]:
            row = rows.setdefault(c["name"], {"nmi": [], "nmi_of_max": [], "conditional_mi": []})
            for key in row:
                row[key].append(c[key]["mean"])
            if c["conditional_mi"]["mean"] > 0:
                ratios.setdefault(c["name"], []).append(
                    r["mean_conditional_mi"] / c["conditional_mi"]["mean"])
            # Both lists hold the MoE layers in order; `layer` is the layer's index in the model.
            for table, control in zip(r["tables"], c.get("layers_conditional_mi") or []):
                if control > 0:
                    layer_ratios.setdefault(c["name"], {}).setdefault(table["layer"], []).append(
                        table["conditional_mi"] / control)
    print(f"{len(reports)} seeds: {', '.join(p.parent.name for p in reports)}")
    print(f"{'routing':<34} {'NMI':>16} {'NMI / max':>16} {'cond. MI (nats)':>16}")
    for name, row in rows.items():
        cells = [interval(row[k]) for k in ("nmi", "nmi_of_max", "conditional_mi")]
        print(f"{name:<34} " + " ".join(f"{m:>8.3f} ± {h:.3f}" for m, h in cells))
    for name, xs in ratios.items():
        m, h = interval(xs)
        print(f"trained / {name}: conditional MI ratio {m:.2f} ± {h:.2f} "
              f"(per seed {min(xs):.2f}-{max(xs):.2f})")
        for layer, ys in sorted(layer_ratios.get(name, {}).items()):
            m, h = interval(ys)
            print(f"  layer {layer}: {m:.2f} ± {h:.2f} over {len(ys)} seeds "
                  f"(per seed {min(ys):.2f}-{max(ys):.2f})")


if __name__ == "__main__":
    main()
