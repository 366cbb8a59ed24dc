"""docs/speed_vs_pytorch.md's tables, printed from the benchmark JSONs committed in docs/speed/.

    python -m benchmarks.report [--root docs/speed] [--update docs/speed_vs_pytorch.md]

Without ``--update`` the tables are printed. With it, the text between each ``<!-- report: NAME -->``
and ``<!-- /report -->`` of the document is replaced by NAME's table; a marker whose JSON is not
in ``--root`` is a one-line error and the document is left as it was. Nothing here imports JAX or
PyTorch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from lop_jax.doc_markers import document_markers, update_for_command

REPO_ROOT = Path(__file__).parents[1]
DEFAULT_ROOT = REPO_ROOT / "docs" / "speed"
# the JSON files each table reads (names in --root)
STEP_FILES = ("step64.json", "step8.json")
PROTOCOL_FILES = {"cold": "protocol_cold.json", "warm": "protocol_warm.json"}
PROFILE_FILES = {"cold": "profile_cold.json", "warm": "profile_warm.json"}
BEFORE_AFTER_FILE = "before_after.json"
FIDELITY_FILE = "fidelity.json"
LAYER_FILES = ("layers64.json", "layers8.json")
# the same two benchmarks under cpu_kernels eigen_fused (the step split of the fastest kernels)
EIGEN_STEP_FILES = ("step64_eigen_fused.json", "step8_eigen_fused.json")
EIGEN_LAYER_FILES = ("layers64_eigen_fused.json", "layers8_eigen_fused.json")
# every convolution in every form the eigen kernels could compute it in (benchmarks/conv_forms.py)
FORM_FILES = ("conv_forms64.json", "conv_forms8.json")
FORM_PASSES = {"forward": "forward", "kernel_grad": "kernel gradient", "input_grad": "input gradient"}
# lop-jax's CPU kernels (the config's cpu_kernels): each benchmark's files, the default's first
KERNEL_VARIANTS = {"default": "", "eigen": "_eigen", "eigen_fused": "_eigen_fused"}
KERNEL_BENCHMARKS = {"train step, width 64, batch 90": "step64", "train step, width 8, batch 50": "step8",
                     "whole laptop-size protocol, cache warm": "protocol_warm"}
KERNEL_FILES = tuple(f"{stem}{suffix}.json" for stem in KERNEL_BENCHMARKS.values()
                     for suffix in KERNEL_VARIANTS.values())
ALL_FILES = tuple(dict.fromkeys((*STEP_FILES, *PROTOCOL_FILES.values(), *PROFILE_FILES.values(), BEFORE_AFTER_FILE,
                                 FIDELITY_FILE, *LAYER_FILES, *KERNEL_FILES, *EIGEN_LAYER_FILES, *FORM_FILES)))
BEFORE_AFTER_LABELS = {"before": "before (commit 29ef8cb, no cache)", "after_cold": "after, empty cache",
                       "after_warm": "after, cache filled by an earlier run of the config"}
RECORDED_NAMES = {"epoch_runtime": "training epochs", "test_evaluation_runtime": "test evaluation",
                  "validation_evaluation_runtime": "validation evaluation"}


def _load(root: Path, name: str) -> dict[str, Any] | None:
    path = root / name
    return json.loads(path.read_text()) if path.is_file() else None


def _load_all(root: Path, names: tuple[str, ...]) -> list[dict[str, Any]] | None:
    """Every one of ``names``, or None when one is missing (its table is then not printed)."""
    got = [_load(root, name) for name in names]
    return None if any(g is None for g in got) else got


def _walls(got: dict[str, Any], side: str) -> list[float]:
    """One side's wall time of every call of a benchmark."""
    return [c["wall"] for c in got["calls"][side]]


def _range(values: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(min(values))}–{fmt.format(max(values))}"


def device_table(root: Path) -> str | None:
    """Where and under what load each benchmark ran."""
    loaded = _load_all(root, ALL_FILES)
    if loaded is None:
        return None
    rows = []
    for name, got in zip(ALL_FILES, loaded, strict=True):
        dev = got["device"]
        load = dev.get("load_average_1_5_15_min") or []
        rows.append(f"| `{name}` | {dev['cpu']} | {dev['cores_usable']} | "
                    f"{', '.join(f'{x:.2f}' for x in load) or 'n/a'} |")
    return "\n".join(["| benchmark | CPU | cores usable | load average at the end (1, 5, 15 min) |",
                      "| --- | --- | ---: | --- |", *rows])


def step_table(root: Path) -> str | None:
    """(a): seconds per train step on each side, images per second, the ratio of medians."""
    loaded = _load_all(root, STEP_FILES)
    if loaded is None:
        return None
    rows = []
    for got in loaded:
        per = {side: _walls(got, side) for side in ("lop_jax", "torch")}
        rows.append(f"| {got['network_width']} | {got['train_batch_size']} | {got['rounds']} × "
                    f"{got['steps_per_round']} | {got['step_seconds']['lop_jax']:.3f} ({_range(per['lop_jax'])}) | "
                    f"{got['step_seconds']['torch']:.3f} ({_range(per['torch'])}) | "
                    f"{got['images_per_second']['lop_jax']:.0f} | {got['images_per_second']['torch']:.0f} | "
                    f"**{got['ratio_lop_jax_over_torch']:.2f}** |")
    return "\n".join([
        "| width | batch | rounds × steps | lop-jax s/step (rounds' range) | PyTorch s/step (rounds' range) "
        "| lop-jax img/s | PyTorch img/s | **lop-jax / PyTorch** |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |", *rows])


def protocol_table(root: Path) -> str | None:
    """(b): whole processes, wall and CPU time, medians and ratios, per cache mode."""
    loaded = _load_all(root, tuple(PROTOCOL_FILES.values()))
    if loaded is None:
        return None
    rows = []
    for mode, got in zip(PROTOCOL_FILES, loaded, strict=True):
        med = got["medians"]
        walls = {side: _walls(got, side) for side in ("lop_jax", "torch")}
        rows.append(f"| {mode} | {got['repeats']} "
                    f"| {med['lop_jax']['wall']:.1f} s ({_range(walls['lop_jax'], '{:.1f}')}) "
                    f"| {med['torch']['wall']:.1f} s ({_range(walls['torch'], '{:.1f}')}) "
                    f"| **{got['ratio_wall_lop_jax_over_torch']:.2f}** | {med['lop_jax']['cpu']:.1f} s "
                    f"| {med['torch']['cpu']:.1f} s | **{got['ratio_cpu_lop_jax_over_torch']:.2f}** |")
    return "\n".join([
        "| lop-jax's compilation cache | pairs | lop-jax wall (range) | PyTorch wall (range) | **ratio wall** "
        "| lop-jax CPU | PyTorch CPU | **ratio CPU** |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows])


def recorded_table(root: Path) -> str | None:
    """Each side's own recorded training and evaluation seconds in the protocol runs (medians)."""
    loaded = _load_all(root, tuple(PROTOCOL_FILES.values()))
    if loaded is None:
        return None
    rows = []
    for mode, got in zip(PROTOCOL_FILES, loaded, strict=True):
        for side, label in (("lop_jax", f"lop-jax, {mode} cache"), ("torch", f"PyTorch (beside lop-jax {mode})")):
            calls = got["recorded_seconds"][side]
            cells = [f"{statistics.median(c[key] for c in calls):.1f} s" for key in RECORDED_NAMES]
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(["| side | " + " | ".join(RECORDED_NAMES.values()) + " |",
                      "| --- | " + " | ".join("---:" for _ in RECORDED_NAMES) + " |", *rows])


def _mean_se(values: list[float]) -> str:
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} ± {se:.3f}"


def fidelity_table(root: Path) -> str | None:
    """Final test accuracy of each task on both sides over the same seeds and classes, and the paired
    difference (mean ± standard error over the seeds)."""
    got = _load(root, FIDELITY_FILE)
    if got is None:
        return None
    acc = got["final_test_accuracy_per_task"]
    seeds = [str(i) for i in got["indices"]]
    n_tasks = len(acc["lop_jax"][seeds[0]])
    lines = ["| task | lop-jax | PyTorch twin | lop-jax − PyTorch (paired) | seeds where lop-jax is higher |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for t in range(n_tasks):
        ours, theirs = [acc["lop_jax"][i][t] for i in seeds], [acc["torch"][i][t] for i in seeds]
        diff = [a - b for a, b in zip(ours, theirs, strict=True)]
        lines.append(f"| {t + 1} | {_mean_se(ours)} | {_mean_se(theirs)} | {_mean_se(diff)} "
                     f"| {sum(d > 0 for d in diff)} of {len(diff)} |")
    return "\n".join([*lines, "", f"Seeds (run indices): {', '.join(seeds)}; mean ± standard error over them."])


def profile_table(root: Path) -> str | None:
    """lop-jax's run broken down by stage, cold and warm compilation cache side by side."""
    loaded = _load_all(root, tuple(PROFILE_FILES.values()))
    if loaded is None:
        return None
    got = dict(zip(PROFILE_FILES, loaded, strict=True))
    names = sorted({n for v in got.values() for n in v["rows"]},
                   key=lambda n: -max(v["rows"].get(n, {"seconds": 0.0})["seconds"] for v in got.values()))
    lines = ["| stage | cold: seconds | share | warm: seconds | share |", "| --- | ---: | ---: | ---: | ---: |"]
    for n in names:
        cells = []
        for v in got.values():
            s = v["rows"].get(n, {"seconds": 0.0})["seconds"]
            cells += [f"{s:.2f}", f"{100 * s / v['total_seconds']:.1f} %"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    totals = [f"**{v['total_seconds']:.1f}**" for v in got.values()]
    lines.append(f"| **total, process start to end** | {totals[0]} | | {totals[1]} | |")
    lines.append("| compilation, all stages | " + " | ".join(f"{v['compile_seconds']:.1f} | "
                                                          f"{100 * v['compile_seconds'] / v['total_seconds']:.1f} %"
                                                          for v in got.values()) + " |")
    lines.append("| checkpoint writes on the writer thread (beside the loop) | " + " | ".join(
        f"{v['checkpoint_writes_on_writer_thread_seconds']:.2f} | " for v in got.values()) + " |")
    return "\n".join(lines)


def before_after_table(root: Path) -> str | None:
    """This checkout against the commit before the speed changes, whole processes, alternating."""
    got = _load(root, BEFORE_AFTER_FILE)
    if got is None:
        return None
    lines = ["| variant | wall (median; calls) | CPU (median) | wall / before | CPU / before |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, med in got["medians"].items():
        walls = ", ".join(f"{c['wall']:.1f}" for c in got["calls"][name])
        ratio = got["ratios_to_before"][name]
        lines.append(f"| {BEFORE_AFTER_LABELS.get(name, name)} | {med['wall']:.1f} s ({walls}) | {med['cpu']:.1f} s "
                     f"| **{ratio['wall']:.2f}** | **{ratio['cpu']:.2f}** |")
    return "\n".join(lines)


def _pair(seconds: dict[str, float]) -> str:
    """'lop-jax / PyTorch ms (ratio)' of one pass."""
    return (f"{1e3 * seconds['lop_jax']:.1f} / {1e3 * seconds['torch']:.1f} "
            f"(**{seconds['lop_jax'] / seconds['torch']:.2f}**)")


def layers_table(root: Path, files: tuple[str, ...] = LAYER_FILES) -> str | None:
    """Every distinct convolution of the network, both sides: medians, ratios, cores kept busy; and
    the network's convolutions in all (each shape × its count); from the layer benchmarks ``files``."""
    loaded = _load_all(root, files)
    if loaded is None:
        return None
    lines = ["| width, batch | input | channels | kernel, stride | count | lop-jax kernel gradient "
             "| forward ms, lop-jax / PyTorch | forward + backward ms, lop-jax / PyTorch "
             "| cores busy (forward + backward), lop-jax / PyTorch |",
             "| --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for got in loaded:
        where = f"{got['network_width']}, {got['batch']}"
        for row in got["layers"]:
            busy = row["forward_backward"]["cpu_over_wall"]
            lines.append(f"| {where} | {row['size']}×{row['size']} | {row['ci']}→{row['co']} "
                         f"| {row['kernel']}×{row['kernel']}, {row['stride']} | {len(row['layers'])} "
                         f"| {'tap sum' if row['kernel_grad'] == 'slices' else 'XLA'} "
                         f"| {_pair(row['forward']['seconds'])} | {_pair(row['forward_backward']['seconds'])} "
                         f"| {busy['lop_jax']:.1f} / {busy['torch']:.1f} |")
        total = got["totals"]
        count = sum(len(row["layers"]) for row in got["layers"])
        lines.append(f"| {where} | **all {count} convolutions** | | | | "
                     f"| {_pair(total['forward']['seconds'])} | {_pair(total['forward_backward']['seconds'])} | |")
    return "\n".join(lines)


def forms_table(root: Path) -> str | None:
    """Per convolution and pass, each candidate form's milliseconds, the eigen mode's pick in bold;
    per width, the network's convolutions as picked, as the eigen kernels chose before, and with
    the fastest candidate of every pass."""
    loaded = _load_all(root, FORM_FILES)
    if loaded is None:
        return None
    lines = ["| width, batch | input | channels | kernel, stride | count | "
             + " | ".join(f"{label} ms" for label in FORM_PASSES.values()) + " |",
             "| --- | --- | --- | --- | ---: | --- | --- | --- |"]
    for got in loaded:
        where = f"{got['network_width']}, {got['batch']}"
        for row in got["layers"]:
            cells = []
            for pass_name in FORM_PASSES:
                p = row["passes"].get(pass_name)
                cells.append("(not needed)" if p is None else ", ".join(
                    f"**{name} {1e3 * sec:.2f}**" if name == p["picked"] else f"{name} {1e3 * sec:.2f}"
                    for name, sec in p["seconds"].items()))
            lines.append(f"| {where} | {row['size']}×{row['size']} | {row['ci']}→{row['co']} "
                         f"| {row['kernel']}×{row['kernel']}, {row['stride']} | {len(row['layers'])} | "
                         + " | ".join(cells) + " |")
        count = sum(len(row["layers"]) for row in got["layers"])
        for key, label in (("picked", "as the eigen mode picks"), ("earlier", "the eigen kernels' earlier choice"),
                           ("fastest", "the fastest of every pass")):
            cells = [f"{1e3 * got['totals'][pass_name][key]:.1f}" for pass_name in FORM_PASSES]
            lines.append(f"| {where} | **all {count} convolutions, {label}** | | | "
                         f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def _kernels(got: dict[str, Any]) -> str:
    """The cpu_kernels a step or layer benchmark ran: recorded, or named by its --set overrides
    (the Eigen kernels by hand: ``cpu_kernels=eigen`` with the multi-output fusion flag set makes
    ``eigen_fused``), else the default."""
    kernels = got.get("cpu_kernels", "default")
    for override in got.get("overrides", []):
        key, _, value = override.partition("=")
        if key == "cpu_kernels":
            kernels = value
    flags = got.get("device", {}).get("xla_flags", got.get("xla_flags", ""))
    return "eigen_fused" if kernels == "eigen" and "xla_cpu_use_multi_output_fusion" in flags else kernels


def step_split_table(root: Path, step_files: tuple[str, ...] = STEP_FILES,
                     layer_files: tuple[str, ...] = LAYER_FILES) -> str | None:
    """Per width, each side's train step split into its convolutions (the layer benchmark's total,
    forward + backward) and the rest (the step's median minus that); the step benchmarks
    ``step_files`` against the layer benchmarks ``layer_files``, which must name the same kernels."""
    steps, convs = _load_all(root, step_files), _load_all(root, layer_files)
    if steps is None or convs is None:
        return None
    lines = ["| width, batch | side | train step s | its convolutions s | the rest s | convolutions' share |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    by_width = {got["network_width"]: got for got in convs}
    for step in steps:
        width = step["network_width"]
        if width not in by_width:
            raise ValueError(f"no layer benchmark at width {width} in {root} ({', '.join(layer_files)})")
        if _kernels(step) != _kernels(by_width[width]):
            raise ValueError(f"width {width}: the step benchmark ran cpu_kernels {_kernels(step)!r}, "
                             f"the layer benchmark {_kernels(by_width[width])!r}")
        conv = by_width[width]["totals"]["forward_backward"]["seconds"]
        rest = {}
        for side, label in (("lop_jax", "lop-jax"), ("torch", "PyTorch")):
            total = step["step_seconds"][side]
            rest[side] = total - conv[side]
            lines.append(f"| {width}, {step['train_batch_size']} | {label} | {total:.3f} | {conv[side]:.3f} "
                         f"| {rest[side]:.3f} | {100 * conv[side] / total:.0f} % |")
        lines.append(f"| {width}, {step['train_batch_size']} | **lop-jax / PyTorch** "
                     f"| **{step['ratio_lop_jax_over_torch']:.2f}** "
                     f"| **{conv['lop_jax'] / conv['torch']:.2f}** | **{rest['lop_jax'] / rest['torch']:.2f}** | |")
    return "\n".join(lines)


def kernels_table(root: Path) -> str | None:
    """Each benchmark under lop-jax's default CPU kernels and the Eigen ones, against PyTorch."""
    loaded = _load_all(root, KERNEL_FILES)
    if loaded is None:
        return None
    got = dict(zip(KERNEL_FILES, loaded, strict=True))
    rows = []
    for label, stem in KERNEL_BENCHMARKS.items():
        base = None
        for variant, suffix in KERNEL_VARIANTS.items():
            g = got[f"{stem}{suffix}.json"]
            if "step_seconds" in g:
                ours, theirs, ratio = g["step_seconds"]["lop_jax"], g["step_seconds"]["torch"], g[
                    "ratio_lop_jax_over_torch"]
                cells = f"{ours:.3f} s/step | {theirs:.3f} s/step"
            else:
                ours, theirs = g["medians"]["lop_jax"]["wall"], g["medians"]["torch"]["wall"]
                ratio = g["ratio_wall_lop_jax_over_torch"]
                cells = f"{ours:.1f} s | {theirs:.1f} s"
            base = ratio if base is None else base
            flags = g["device"].get("xla_flags", "")
            rows.append(f"| {label} | {variant} | {f'`{flags}`' if flags else 'none'} | {cells} | **{ratio:.2f}** "
                        f"| {ratio / base:.2f} |")
    return "\n".join([
        "| benchmark | lop-jax's CPU kernels | XLA_FLAGS of the benchmark process | lop-jax | PyTorch "
        "| **lop-jax / PyTorch** "
        "| that ratio over the default's |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |", *rows])


def summary_table(root: Path) -> str | None:
    """The README's four ratios: the step at both widths, the protocol with both caches."""
    loaded = _load_all(root, (*STEP_FILES, *PROTOCOL_FILES.values()))
    if loaded is None:
        return None
    steps = loaded[:len(STEP_FILES)]
    runs = dict(zip(PROTOCOL_FILES, loaded[len(STEP_FILES):], strict=True))
    cpu = steps[0]["device"]["cpu"]
    lines = [f"| lop-jax / PyTorch on {cpu}, 2 cores | wall | CPU |", "| --- | ---: | ---: |"]
    for got in steps:
        lines.append(f"| train step, width {got['network_width']}, batch {got['train_batch_size']} "
                     f"| {got['ratio_lop_jax_over_torch']:.2f} | |")
    for mode, got in runs.items():
        lines.append(f"| whole laptop-size protocol, compilation cache {mode} "
                     f"| {got['ratio_wall_lop_jax_over_torch']:.2f} | {got['ratio_cpu_lop_jax_over_torch']:.2f} |")
    return "\n".join(lines)


BUILDERS = {"speed: device": device_table, "speed: step": step_table, "speed: protocol": protocol_table,
            "speed: recorded seconds": recorded_table, "speed: fidelity": fidelity_table,
            "speed: profile": profile_table, "speed: before after": before_after_table,
            "speed: summary": summary_table, "speed: layers": layers_table,
            "speed: step split": step_split_table, "speed: cpu kernels": kernels_table,
            "speed: layers eigen_fused": lambda root: layers_table(root, EIGEN_LAYER_FILES),
            "speed: eigen forms": forms_table,
            "speed: step split eigen_fused": lambda root: step_split_table(root, EIGEN_STEP_FILES, EIGEN_LAYER_FILES)}

JSON_OF = {"speed: device": ALL_FILES, "speed: before after": (BEFORE_AFTER_FILE,),
           "speed: summary": (*STEP_FILES, *PROTOCOL_FILES.values()),
           "speed: step": STEP_FILES, "speed: protocol": tuple(PROTOCOL_FILES.values()),
           "speed: recorded seconds": tuple(PROTOCOL_FILES.values()),
           "speed: fidelity": (FIDELITY_FILE,), "speed: profile": tuple(PROFILE_FILES.values()),
           "speed: layers": LAYER_FILES, "speed: step split": (*STEP_FILES, *LAYER_FILES),
           "speed: cpu kernels": KERNEL_FILES, "speed: layers eigen_fused": EIGEN_LAYER_FILES,
           "speed: eigen forms": FORM_FILES,
           "speed: step split eigen_fused": (*EIGEN_STEP_FILES, *EIGEN_LAYER_FILES)}


def tables(root: Path) -> dict[str, str]:
    """Every table whose JSON files are in ``root``, by marker name."""
    out = {}
    for name, build in BUILDERS.items():
        text = build(root)
        if text is not None:
            out[name] = text
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="the folder of the benchmark JSONs")
    p.add_argument("--update", type=Path, help="the document whose report markers to regenerate")
    args = p.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"error: no benchmark folder {root}", file=sys.stderr)
        return 2
    found = tables(root)
    if args.update is None:
        for name, text in found.items():
            print(f"## {name}\n\n{text}\n")
        return 0
    if not args.update.is_file():
        print(f"error: no document {args.update}", file=sys.stderr)
        return 2
    missing = [n for n in document_markers(args.update.read_text()) if n not in found]
    if missing:
        print(f"error: {args.update}: marker '<!-- report: {missing[0]} -->' has no benchmark JSON in {root} "
              f"(it reads {', '.join(JSON_OF[missing[0]])})", file=sys.stderr)
        return 2
    return update_for_command(args.update, found)


if __name__ == "__main__":
    sys.exit(main())
