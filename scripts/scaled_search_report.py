"""Print the markdown tables of docs/scaled_protocol.md from the committed result arrays.

    python scripts/scaled_search_report.py [--root docs/scaled_protocol]

For the chosen protocol (``<root>/results``) and every candidate of the search
(``<root>/search/<name>/results``): per task, the best test accuracy of each system (the value
the paper plots), the base system's dormant units and stable rank on the next task's data and
its average weight magnitude, and the wall time of each run from ``sweep_timing.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lop_jax.sweep import SYSTEMS


def _load(exp: Path, metric: str) -> np.ndarray | None:
    path = exp / metric / "index-0.npy"
    return np.load(path) if path.is_file() else None


def candidate_table(results: Path, timing: dict) -> str:
    """One markdown table: a row per (system, quantity), a column per task."""
    systems = [s for s in SYSTEMS if (results / s / "config.json").is_file()]
    cfg = json.loads((results / systems[0] / "config.json").read_text())
    tasks, cpt = cfg["num_tasks"], cfg["classes_per_task"]
    header = "| seed 0 | " + " | ".join(str(cpt * (t + 1)) for t in range(tasks)) + " |"
    rows = [header, "| --- " * (tasks + 1) + "|"]
    for s in systems:
        acc = _load(results / s, "test_accuracy_per_epoch")
        if acc is not None:
            best = acc.reshape(tasks, -1).max(axis=1) * 100
            rows.append(f"| {s}: best test accuracy (%) | " + " | ".join(f"{v:.1f}" for v in best) + " |")
    for s in systems:
        for metric, label, fmt in (("next_task_dormant_units_analysis", "dormant units (%)", "{:.2f}"),
                                   ("next_task_stable_rank_analysis", "stable rank (of 64)", "{:.0f}"),
                                   ("weight_magnitude_analysis", "weight magnitude", "{:.3f}")):
            v = _load(results / s, metric)
            if v is None:
                continue
            v = v * 100 if metric == "next_task_dormant_units_analysis" else v
            rows.append(f"| {s}: {label} | " + " | ".join(fmt.format(x) for x in v) + " |")
    walls = ", ".join(f"{k.split('/')[0]} {v['seconds'] / 60:.1f} min" for k, v in sorted(timing.items())
                      if v.get("finished"))
    return "\n".join(rows) + (f"\n\nWall time per run (seed 0): {walls}." if walls else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="docs/scaled_protocol")
    root = Path(p.parse_args().root)
    folders = [("configs/scaled", root)] + [(f"configs/scaled_search/{d.name}", d)
                                           for d in sorted((root / "search").iterdir()) if d.is_dir()]
    for name, folder in folders:
        timing_file = folder / "sweep_timing.json"
        timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
        if (folder / "results").is_dir():
            print(f"### {name}\n\n{candidate_table(folder / 'results', timing)}\n")


if __name__ == "__main__":
    main()
