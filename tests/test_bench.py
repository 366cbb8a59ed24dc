"""The side-by-side benchmarks (benchmarks/): the runners' logic without timing anything (a fake
clock and fake processes), and, where PyTorch is installed (the ``bench`` extra; CI does not
install it), the twin against lop-jax: the same network output for the same weights, the same
augmentation for the same draws, the same optimiser update, and a tiny protocol run whose arrays
are those lop-jax writes. No test here measures speed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is run from the checkout, not installed with the package
    sys.path.insert(0, str(REPO))

from benchmarks import conv_forms, fidelity, layers, op_profile, profile_run, protocol, report, timing  # noqa: E402
from lop_jax import cli, doc_markers  # noqa: E402


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ---- alternation, ratio of medians --------------------------------------------------------------
def test_alternation_swaps_the_side_that_goes_first_every_round():
    assert timing.alternation(["a", "b"], 4) == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    assert timing.alternation(["a", "b", "c"], 3) == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    with pytest.raises(ValueError):
        timing.alternation(["a", "b"], 0)


def test_alternate_calls_in_the_alternation_order_and_times_each_call_with_the_clock():
    clock, calls = FakeClock(), []
    cost = {"lop_jax": 3.0, "torch": 2.0}

    def runner(name):
        def call():
            calls.append(name)
            clock.now += cost[name] + len(calls)  # each call a different duration, known in advance
            return len(calls)
        return call

    times = timing.alternate({n: runner(n) for n in cost}, 3, clock=clock,
                             measure=lambda name, value: {"cpu": 10.0 * value})
    assert calls == ["lop_jax", "torch", "torch", "lop_jax", "lop_jax", "torch"]
    assert [c["wall"] for c in times["lop_jax"]] == [4.0, 7.0, 8.0]
    assert [c["wall"] for c in times["torch"]] == [4.0, 5.0, 8.0]
    assert [c["cpu"] for c in times["torch"]] == [20.0, 30.0, 60.0]


def test_the_ratio_is_of_the_medians_not_of_the_means():
    times = {"lop_jax": [{"wall": w, "cpu": 2 * w} for w in (1.0, 100.0, 2.0)],
             "torch": [{"wall": w, "cpu": w} for w in (4.0, 5.0, 4.0)]}
    assert timing.ratio_of_medians(times, "lop_jax", "torch") == pytest.approx(0.5)
    out = timing.summary(times, "lop_jax", "torch")
    assert out["medians"] == {"lop_jax": {"wall": 2.0, "cpu": 4.0}, "torch": {"wall": 4.0, "cpu": 4.0}}
    assert out["ratios"] == {"wall_lop_jax_over_torch": pytest.approx(0.5),
                             "cpu_lop_jax_over_torch": pytest.approx(1.0)}
    assert out["calls"] is times


def test_the_device_is_named():
    dev = timing.device_description()
    assert dev["cpu"] and dev["machine"] and dev["cores_usable"] >= 1
    assert set(dev) == {"cpu", "machine", "system", "cores_usable", "load_average_1_5_15_min", "xla_flags"}


def test_the_device_records_the_xla_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion")
    assert timing.device_description()["xla_flags"] == "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"
    monkeypatch.delenv("XLA_FLAGS")
    assert timing.device_description()["xla_flags"] == ""


# ---- the whole-process runner, with fake processes -----------------------------------------------
def _fake_run(log, clock, walls, accuracy):
    """A stand-in for ``run_process``: records the call, advances the clock, writes the one array
    the runner reads back (a 3-task, 2-epoch run), and reports a CPU time."""
    def run(argv, env, cpus):
        side = "lop_jax" if "experiments.run" in argv else "torch"
        log.append((side, list(argv), dict(env), list(cpus)))
        results = Path(argv[argv.index("--results-dir") + 1])
        folder = results / "bench_three_tasks" / "test_accuracy_per_epoch"
        folder.mkdir(parents=True)
        np.save(folder / "index-0.npy", np.arange(6, dtype=np.float32) / 10 + accuracy[side])
        (folder.parent / "epoch_runtime").mkdir()
        np.save(folder.parent / "epoch_runtime" / "index-0.npy", np.full(6, 1.5, np.float32))
        clock.now += walls[side].pop(0)
        return {"exit_code": 0, "cpu": 2.0 * clock.now, "output_tail": ""}
    return run


@pytest.mark.parametrize("cache", ["cold", "warm", "off"])
def test_the_protocol_runner_alternates_whole_processes_and_reports_the_ratios(tmp_path, monkeypatch, cache):
    monkeypatch.chdir(REPO)
    config = tmp_path / "bench.json"
    config.write_text(json.dumps({"extends": str(REPO / "configs/bench/three_tasks.json"), "epochs_per_task": 2}))
    clock, log = FakeClock(), []
    walls = {"lop_jax": [50.0, 10.0, 30.0, 20.0], "torch": [40.0, 45.0, 41.0]}
    if cache != "warm":
        walls["lop_jax"].pop(0)  # the warm cache's untimed first run takes the first one
    run = _fake_run(log, clock, walls, {"lop_jax": 0.0, "torch": 0.5})
    out = protocol.measure(str(config), "DATA", 3, [0, 1], cache, tmp_path / "work", run=run, clock=clock)
    timed = log[1:] if cache == "warm" else log
    assert [side for side, *_ in timed] == ["lop_jax", "torch", "torch", "lop_jax", "lop_jax", "torch"]
    assert out["order"] == [["lop_jax", "torch"], ["torch", "lop_jax"], ["lop_jax", "torch"]]
    assert [c["wall"] for c in out["calls"]["lop_jax"]] == [10.0, 30.0, 20.0]
    assert out["medians"]["lop_jax"]["wall"] == 20.0 and out["medians"]["torch"]["wall"] == 41.0
    assert out["ratio_wall_lop_jax_over_torch"] == pytest.approx(20.0 / 41.0)
    cpu = {side: sorted(c["cpu"] for c in out["calls"][side]) for side in ("lop_jax", "torch")}
    assert out["ratio_cpu_lop_jax_over_torch"] == pytest.approx(cpu["lop_jax"][1] / cpu["torch"][1])
    assert out["final_test_accuracy_per_task"] == {"lop_jax": [[0.1, 0.3, 0.5]] * 3, "torch": [[0.6, 0.8, 1.0]] * 3}
    assert out["recorded_seconds"] == {side: [{"epoch_runtime": 9.0}] * 3 for side in ("lop_jax", "torch")}
    for side, argv, env, cpus in log:
        assert cpus == [0, 1] and argv[argv.index("--config") + 1] == str(config)
        assert argv[argv.index("--data-dir") + 1] == "DATA" and "JAX_COMPILATION_CACHE_DIR" not in env
        if side == "torch":
            assert argv[1:3] == ["-m", "benchmarks.torch_twin"] and argv[argv.index("--threads") + 1] == "2"
            assert protocol.CACHE_ENV not in env
        else:
            assert argv[1:3] == ["-m", "experiments.run"]
    caches = [env[protocol.CACHE_ENV] for side, _, env, _ in log if side == "lop_jax"]
    if cache == "off":
        assert caches == ["off"] * 3
    elif cache == "cold":
        assert len(set(caches)) == 3  # a fresh, empty folder per call
    else:
        assert len(caches) == 4 and len(set(caches)) == 1  # filled by the untimed first run
    assert not any(p.name.startswith("call-") for p in (tmp_path / "work").iterdir())  # results removed


def test_a_failed_child_stops_the_protocol_runner(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)

    def run(argv, env, cpus):
        return {"exit_code": 2, "cpu": 0.0, "output_tail": "error: no data"}

    with pytest.raises(RuntimeError, match="lop_jax exited with 2: error: no data"):
        protocol.measure("configs/bench/three_tasks.json", "DATA", 1, [], "off", tmp_path, run=run)


def test_run_process_reports_the_exit_code_and_the_childs_cpu_time():
    got = protocol.run_process([sys.executable, "-c", "import sys; print('hi'); sys.exit(3)"], {}, [])
    assert got["exit_code"] == 3 and "hi" in got["output_tail"] and got["cpu"] > 0.0


# ---- the profile's accounting --------------------------------------------------------------------
def test_profile_stages_count_nested_time_once(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(profile_run.time, "perf_counter", clock)
    stages = profile_run.Stages()
    with stages.stage("epoch"):
        clock.now += 2.0
        with stages.stage("snapshot"):
            clock.now += 5.0
            stages.on_event("/jax/core/compile/backend_compile_duration", 1.5, fun_name="jit(f)")
        clock.now += 3.0
    assert stages.seconds == {"epoch": 5.0, "snapshot": 5.0}
    assert stages.compiles["snapshot"] == {"xla_compile": 1.5} and stages.programs["snapshot"] == {"jit(f)": 1}


# ---- the operation profile ------------------------------------------------------------------------

def test_the_operation_profile_sums_the_operations_by_kind_and_category_and_skips_the_runtimes_events():
    events = [
        {"ph": "X", "name": "convolution.3", "dur": 300.0},
        {"ph": "X", "name": "convolution", "dur": 100.0},
        {"ph": "X", "name": "transpose_copy_fusion.1", "dur": 250.0},
        {"ph": "X", "name": "multiply_add_fusion.12", "dur": 350.0},
        {"ph": "X", "name": "CommonPjRtLoadedExecutable::ExecuteHelperOnSingleDevice", "dur": 5000.0},
        {"ph": "X", "name": "$profiler.py:151 start_trace", "dur": 70.0},
        {"ph": "X", "name": "end: convolution.3", "dur": 4.0},
        {"ph": "i", "name": "copy.2", "dur": 999.0},  # not a complete event
    ]
    ops = op_profile.operation_events(events)
    assert sorted(n for n, _ in ops) == ["convolution", "convolution.3", "multiply_add_fusion.12",
                                         "transpose_copy_fusion.1"]
    out = op_profile.aggregate(ops, steps=2, wall_seconds=0.002, top=2)
    assert out["operation_ms_per_step"] == pytest.approx(0.5) and out["wall_ms_per_step"] == pytest.approx(1.0)
    assert out["busy_over_wall"] == pytest.approx(0.5) and out["operations_per_step"] == 2
    assert out["distinct_instructions"] == 4
    assert [r["kind"] for r in out["by_kind"]] == ["convolution", "multiply_add_fusion"]  # the top 2
    assert out["by_kind"][0]["count_per_step"] == 1 and out["by_kind"][0]["share"] == pytest.approx(0.4)
    cats = out["by_category"]
    assert list(cats) == ["convolution", "element-wise fusion", "copy, slice or transpose"]
    assert cats["copy, slice or transpose"]["ms_per_step"] == pytest.approx(0.125)
    assert sum(c["share"] for c in cats.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="nothing to aggregate"):
        op_profile.aggregate([], steps=2, wall_seconds=1.0, top=2)


def test_the_operation_profile_of_a_real_step_finds_its_convolutions(tmp_path):
    """jax.profiler's trace of the compiled step at the smoke scale holds the step's operations."""
    from lop_jax.config import load_config

    out = op_profile.profile_step(load_config(REPO / "configs/smoke.json"), steps=1, top=5, trace_dir=tmp_path)
    assert out["operations_per_step"] > 20 and out["wall_ms_per_step"] > 0
    assert "convolution" in out["by_category"] and len(out["by_kind"]) == 5
    assert sum(c["share"] for c in out["by_category"].values()) == pytest.approx(1.0)


# ---- experiments.run's compilation cache -----------------------------------------------------------
def test_the_compilation_cache_folder(tmp_path):
    home = {"XDG_CACHE_HOME": str(tmp_path)}
    assert cli.compilation_cache_dir(None, home) == tmp_path / "lop-jax" / "xla"
    assert cli.compilation_cache_dir(None, {**home, cli.COMPILATION_CACHE_ENV: "off"}) is None
    assert cli.compilation_cache_dir(None, {**home, cli.COMPILATION_CACHE_ENV: "0"}) is None
    assert cli.compilation_cache_dir(None, {**home, cli.COMPILATION_CACHE_ENV: "/x/y"}) == Path("/x/y")
    # a folder JAX is already configured with (JAX_COMPILATION_CACHE_DIR, the test session's) wins
    assert cli.compilation_cache_dir("/set/by/jax", {cli.COMPILATION_CACHE_ENV: "off"}) == Path("/set/by/jax")


# ---- docs/speed_vs_pytorch.md from the committed JSONs --------------------------------------------


def test_the_speed_tables_are_the_ones_the_committed_benchmarks_give(tmp_path, capsys):
    """Every speed table of docs/speed_vs_pytorch.md and the README is printed by benchmarks/report.py
    from docs/speed/, never edited by hand: the two documents hold every table, each has its JSON,
    regenerating them changes nothing."""
    shown = []
    for name in ("docs/speed_vs_pytorch.md", "README.md"):
        committed = (REPO / name).read_text()
        markers = [m for m in doc_markers.document_markers(committed) if m.startswith("speed: ")]
        assert markers, f"{name} has no speed table"
        shown += markers
        doc = tmp_path / Path(name).name
        doc.write_text(committed)
        assert report.main(["--update", str(doc)]) == 0, capsys.readouterr().err
        assert doc.read_text() == committed, f"{name}: its tables are not the committed JSONs'"
    assert sorted(set(shown)) == sorted(report.BUILDERS)  # each table at least once (one is in both)


def test_a_table_without_its_json_is_an_error_and_the_document_is_kept(tmp_path, capsys):
    root = tmp_path / "speed"
    root.mkdir()
    for name in report.STEP_FILES:
        (root / name).write_text((REPO / "docs" / "speed" / name).read_text())
    doc = tmp_path / "speed.md"
    text = "".join(f"<!-- report: {name} -->\nold\n<!-- /report -->\n" for name in ("speed: step", "speed: protocol"))
    doc.write_text(text)
    assert report.main(["--root", str(root), "--update", str(doc)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "speed: protocol" in err and "protocol_cold.json" in err
    assert doc.read_text() == text
    assert report.main(["--root", str(root)]) == 0  # printing shows what there is
    assert "## speed: step" in capsys.readouterr().out


def test_the_step_table_is_the_jsons_ratio_of_medians(tmp_path):
    root = tmp_path / "speed"
    root.mkdir()
    for width, name in zip((64, 8), report.STEP_FILES, strict=True):
        calls = {"lop_jax": [{"wall": w} for w in (2.0, 4.0, 3.0)], "torch": [{"wall": w} for w in (1.0, 2.0, 9.0)]}
        (root / name).write_text(json.dumps({
            "network_width": width, "train_batch_size": 90, "rounds": 3, "steps_per_round": 2, "calls": calls,
            "step_seconds": {"lop_jax": 3.0, "torch": 2.0}, "images_per_second": {"lop_jax": 30.0, "torch": 45.0},
            "ratio_lop_jax_over_torch": 1.5}))
    table = report.step_table(root)
    assert "| 64 | 90 | 3 × 2 | 3.000 (2.000–4.000) | 2.000 (1.000–9.000) | 30 | 45 | **1.50** |" in table


def test_the_cpu_kernels_table_gives_each_variants_ratio_and_its_ratio_to_the_default(tmp_path):
    root = tmp_path / "speed"
    root.mkdir()
    ours = {"": 3.0, "_eigen": 2.4, "_eigen_fused": 2.1}
    for stem in report.KERNEL_BENCHMARKS.values():
        for suffix, seconds in ours.items():
            flags = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion" if suffix == "_eigen_fused" else ""
            got = {"device": {"xla_flags": flags}}
            if stem.startswith("step"):
                got |= {"step_seconds": {"lop_jax": seconds, "torch": 2.0}, "ratio_lop_jax_over_torch": seconds / 2.0}
            else:
                got |= {"medians": {"lop_jax": {"wall": 10 * seconds}, "torch": {"wall": 20.0}},
                        "ratio_wall_lop_jax_over_torch": seconds / 2.0}
            (root / f"{stem}{suffix}.json").write_text(json.dumps(got))
    table = report.kernels_table(root)
    assert ("| train step, width 64, batch 90 | default | none | 3.000 s/step | 2.000 s/step | **1.50** "
            "| 1.00 |") in table
    assert ("| train step, width 8, batch 50 | eigen_fused | "
            "`--xla_backend_extra_options=xla_cpu_use_multi_output_fusion` | 2.100 s/step | 2.000 s/step | **1.05** "
            "| 0.70 |") in table
    assert "| whole laptop-size protocol, cache warm | eigen | none | 24.0 s | 20.0 s | **1.20** | 0.80 |" in table
    (root / "step8_eigen.json").unlink()
    assert report.kernels_table(root) is None


# ---- the convolutions layer by layer -----------------------------------------------------------
def _model_convolutions(width: int) -> list[tuple[str, int, int, int, int, int]]:
    """(path, input size, ci, co, kernel, stride) of every convolution lop-jax's model calls."""
    import flax.linen as nn
    import jax

    from lop_jax.model import ResNet18

    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
            m, x = context.module, args[0]
            seen.append((".".join(m.scope.path), x.shape[1], x.shape[-1], m.features, m.kernel_size[0],
                         m.strides[0]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        ResNet18(width=width).init(jax.random.key(0), jax.numpy.zeros((1, 32, 32, 3)), train=False)
    return seen


@pytest.mark.parametrize("width", [4, 8])
def test_the_layer_benchmark_lists_every_convolution_the_model_calls(width):
    listed = [(name, g["size"], g["ci"], g["co"], g["kernel"], g["stride"])
              for g in layers.conv_layers(width) for name in g["layers"]]
    assert sorted(listed) == sorted(_model_convolutions(width))
    shapes = [(g["size"], g["ci"], g["co"], g["kernel"], g["stride"]) for g in layers.conv_layers(width)]
    assert len(shapes) == len(set(shapes)) == 11  # grouped: each shape once
    stem = layers.conv_layers(width)[0]
    assert layers.forward_flops(stem, 2) == 2 * 2 * 32 * 32 * 9 * 3 * width


def _fake_layer_times(jax_walls, torch_walls, cpu_factor=(1.0, 2.0)):
    return {pass_name: {"lop_jax": [{"wall": w * k, "cpu": w * k * cpu_factor[0]} for w in jax_walls],
                        "torch": [{"wall": w * k, "cpu": w * k * cpu_factor[1]} for w in torch_walls]}
            for pass_name, k in (("forward", 1.0), ("forward_backward", 3.0))}


def test_the_layer_figures_are_medians_and_the_total_weighs_each_shape_by_its_count():
    stem, wide = layers.conv_layers(8)[:2]
    rows = []
    for layer, (jw, tw) in ((stem, ([0.001, 0.003, 0.002], [0.001, 0.001, 0.005])),
                            (wide, ([0.004, 0.006, 0.005], [0.002, 0.0025, 0.01]))):
        rows.append({**layer, **layers.summarise(_fake_layer_times(jw, tw), layer, 50)})
    f = rows[0]["forward"]
    assert f["seconds"] == {"lop_jax": 0.002, "torch": 0.001} and f["ratio_lop_jax_over_torch"] == 2.0
    assert f["cpu_over_wall"] == {"lop_jax": 1.0, "torch": 2.0}
    assert f["gflops_per_second"]["lop_jax"] == pytest.approx(layers.forward_flops(stem, 50) / 0.002 / 1e9)
    assert "gflops_per_second" not in rows[0]["forward_backward"]
    assert len(wide["layers"]) == 4
    tot = layers.totals(rows)
    assert tot["forward"]["seconds"]["lop_jax"] == pytest.approx(0.002 + 4 * 0.005)
    assert tot["forward_backward"]["seconds"]["torch"] == pytest.approx(3 * (0.001 + 4 * 0.0025))
    assert tot["forward"]["ratio_lop_jax_over_torch"] == pytest.approx(0.022 / 0.011)


def test_a_round_of_calls_lasts_at_least_the_minimum():
    assert layers.calls_per_round(0.3, 0.05) == 1
    assert layers.calls_per_round(0.001, 0.05) == 50
    assert layers.calls_per_round(0.0003, 0.05) * 0.0003 >= 0.05
    with pytest.raises(ValueError, match="took"):
        layers.calls_per_round(0.0, 0.05)


def test_the_layers_table_is_the_jsons_medians_and_totals(tmp_path):
    root = tmp_path / "speed"
    root.mkdir()
    for width, name in zip((64, 8), report.LAYER_FILES, strict=True):
        rows = [{**layer, "kernel_grad": "xla",
                 **layers.summarise(_fake_layer_times([0.002] * 3, [0.001] * 3), layer, 90)}
                for layer in layers.conv_layers(width)]
        (root / name).write_text(json.dumps({"network_width": width, "batch": 90, "layers": rows,
                                             "totals": layers.totals(rows)}))
    lines = report.layers_table(root).splitlines()
    assert "| 64, 90 | 32×32 | 64→64 | 3×3, 1 | 4 | XLA | 2.0 / 1.0 (**2.00**) | 6.0 / 3.0 (**2.00**) | 1.0 / 2.0 |" \
        in lines
    assert "| 8, 90 | **all 20 convolutions** | | | | | 40.0 / 20.0 (**2.00**) | 120.0 / 60.0 (**2.00**) | |" in lines


def _write_step_and_layers(root, step_files, layer_files, step_kernels, layer_kernels):
    """Step and layer JSONs at widths 64 and 8: steps of 3.0 / 2.0 s, convolutions of 2 / 1 ms each
    (twice that with the backward pass)."""
    for width, step_name, layer_name in zip((64, 8), step_files, layer_files, strict=True):
        (root / step_name).write_text(json.dumps({
            "network_width": width, "train_batch_size": 90, "step_seconds": {"lop_jax": 3.0, "torch": 2.0},
            "ratio_lop_jax_over_torch": 1.5, **step_kernels}))
        rows = [{**layer, "kernel_grad": "xla",
                 **layers.summarise(_fake_layer_times([0.002] * 3, [0.001] * 3), layer, 90)}
                for layer in layers.conv_layers(width)]
        (root / layer_name).write_text(json.dumps({"network_width": width, "batch": 90, "layers": rows,
                                                   "totals": layers.totals(rows), **layer_kernels}))


def test_the_eigen_step_split_is_the_eigen_steps_against_the_eigen_layers(tmp_path):
    """The eigen_fused split reads the eigen_fused files, and refuses a step and a layer benchmark
    of other kernels (the eigen step files name them by --set and the process flag)."""
    root = tmp_path / "speed"
    root.mkdir()
    fused = {"overrides": ["cpu_kernels=eigen"],
             "device": {"xla_flags": "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"}}
    _write_step_and_layers(root, report.EIGEN_STEP_FILES, report.EIGEN_LAYER_FILES, fused,
                           {"cpu_kernels": "eigen_fused"})
    split = report.BUILDERS["speed: step split eigen_fused"](root).splitlines()
    # width 64: 20 convolutions × 6 ms forward + backward on lop-jax's side, 3 ms on PyTorch's
    assert "| 64, 90 | lop-jax | 3.000 | 0.120 | 2.880 | 4 % |" in split
    assert "| 64, 90 | **lop-jax / PyTorch** | **1.50** | **2.00** | **1.48** | |" in split
    assert "| 8, 90 | **all 20 convolutions** |" in report.BUILDERS["speed: layers eigen_fused"](root)
    assert report.step_split_table(root) is None  # the default's files are not there
    _write_step_and_layers(root, report.EIGEN_STEP_FILES, report.EIGEN_LAYER_FILES, {"overrides": []},
                           {"cpu_kernels": "eigen_fused"})
    with pytest.raises(ValueError, match="cpu_kernels 'default'.*'eigen_fused'"):
        report.BUILDERS["speed: step split eigen_fused"](root)


@pytest.mark.parametrize("eigen", [False, True], ids=["default kernels", "eigen kernels"])
def test_the_layer_benchmark_times_the_same_convolution_on_both_sides(eigen):
    """Both sides of every shape compute the same output and the same gradients from the same numbers
    (the input's gradient too, except for the stem, whose input is the data), with lop-jax's default
    kernels and with the Eigen ones (``--set cpu_kernels=eigen``)."""
    _torch()
    from lop_jax.cpu_kernels import EIGEN_YNN_FUSIONS

    options = {"xla_cpu_experimental_ynn_fusion_type": EIGEN_YNN_FUSIONS} if eigen else None
    for layer in layers.conv_layers(4):
        data = layers.inputs(layer, 2, seed=0)
        jax_runs, grad = layers.lop_jax_side(layer, data, eigen, options)
        torch_runs = layers.torch_side(layer, data)
        assert grad == "xla" if eigen else grad in ("slices", "xla")
        y, grads = jax_runs["forward_backward"]()
        y_t, grads_t = torch_runs["forward_backward"]()
        assert len(grads) == len(grads_t) == (1 if layer["layers"] == ["stem_conv"] else 2)
        np.testing.assert_allclose(np.asarray(y), y_t.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(jax_runs["forward"]()), np.asarray(y))
        np.testing.assert_allclose(np.asarray(grads[-1]), grads_t[-1].numpy().transpose(2, 3, 1, 0),
                                   rtol=1e-4, atol=1e-3)
        if len(grads) == 2:
            np.testing.assert_allclose(np.asarray(grads[0]), grads_t[0].numpy().transpose(0, 2, 3, 1),
                                       rtol=1e-4, atol=1e-4)


def test_the_fidelity_table_pairs_the_seeds(tmp_path):
    root = tmp_path / "speed"
    root.mkdir()
    acc = {"lop_jax": {"0": [0.5, 0.3], "1": [0.7, 0.1]}, "torch": {"0": [0.4, 0.3], "1": [0.6, 0.3]}}
    (root / report.FIDELITY_FILE).write_text(json.dumps({"indices": [0, 1], "final_test_accuracy_per_task": acc}))
    rows = report.fidelity_table(root).splitlines()
    assert rows[2] == "| 1 | 0.600 ± 0.100 | 0.500 ± 0.100 | 0.100 ± 0.000 | 2 of 2 |"
    assert rows[3] == "| 2 | 0.200 ± 0.100 | 0.300 ± 0.000 | -0.100 ± 0.100 | 0 of 2 |"
    assert fidelity.final_per_task(np.arange(6.0), 3) == [2.0, 5.0]


# ---- the twin against lop-jax (PyTorch installed) ----------------------------------------------------
def _torch():
    return pytest.importorskip("torch", reason="PyTorch is in the bench extra only")


def _copy_weights(twin, params, batch_stats):
    """lop-jax's parameters (HWIO kernels, (in, out) head) into the twin (OIHW, (out, in))."""
    torch = _torch()

    def conv(mod, p):
        mod.weight.copy_(torch.from_numpy(np.array(p["kernel"]).transpose(3, 2, 0, 1)))
        mod.bias.copy_(torch.from_numpy(np.array(p["bias"])))

    def bn(mod, p, s):
        mod.weight.copy_(torch.from_numpy(np.array(p["scale"])))
        mod.bias.copy_(torch.from_numpy(np.array(p["bias"])))
        mod.running_mean.copy_(torch.from_numpy(np.array(s["mean"])))
        mod.running_var.copy_(torch.from_numpy(np.array(s["var"])))

    with torch.no_grad():
        conv(twin.stem[0], params["stem_conv"])
        bn(twin.stem[1], params["stem_bn"], batch_stats["stem_bn"])
        for b, block in enumerate(twin.blocks):
            p, s = params[f"block{b}"], batch_stats[f"block{b}"]
            conv(block.conv1, p["conv1"])
            bn(block.bn1, p["bn1"], s["bn1"])
            conv(block.conv2, p["conv2"])
            bn(block.bn2, p["bn2"], s["bn2"])
            assert (block.shortcut is not None) == ("shortcut_conv" in p)
            if block.shortcut is not None:
                conv(block.shortcut[0], p["shortcut_conv"])
                bn(block.shortcut[1], p["shortcut_bn"], s["shortcut_bn"])
        twin.fc.weight.copy_(torch.from_numpy(np.array(params["fc"]["kernel"]).T))
        twin.fc.bias.copy_(torch.from_numpy(np.array(params["fc"]["bias"])))


def test_the_twin_is_lop_jaxs_network():
    torch = _torch()
    import jax

    from benchmarks import torch_twin
    from lop_jax.model import ResNet18, count_params, init_model

    width = 4
    model = ResNet18(width=width)
    params, batch_stats = init_model(model, jax.random.PRNGKey(0))
    # non-trivial running statistics, so that evaluation mode is compared too
    batch_stats = jax.tree_util.tree_map(lambda x: x * 0.7 + 0.1, batch_stats)
    twin = torch_twin.ResNet18(width)
    assert sum(p.numel() for p in twin.parameters()) == count_params(params)
    _copy_weights(twin, params, batch_stats)
    x = np.random.default_rng(0).normal(size=(6, 32, 32, 3)).astype(np.float32)
    for train in (False, True):
        out = model.apply({"params": params, "batch_stats": batch_stats}, x, train=train, mutable=["batch_stats"])[0]
        twin.train(train)
        with torch.no_grad():
            got = twin(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
        np.testing.assert_allclose(got, np.asarray(out), rtol=1e-4, atol=1e-4)


def test_the_twins_initial_law_matches_lop_jaxs():
    torch = _torch()
    from benchmarks import torch_twin

    twin = torch_twin.ResNet18(16)
    torch_twin.init_weights(twin, torch.Generator().manual_seed(0))
    w = twin.blocks[7].conv2.weight.detach()  # 128 -> 128, 3x3: fan_in 1,152
    assert float(w.std()) == pytest.approx((2.0 / (128 * 9)) ** 0.5, rel=0.02)
    assert float(twin.fc.weight.detach().std()) == pytest.approx((1.0 / 128) ** 0.5, rel=0.05)
    assert all(float(m.bias.abs().max()) == 0.0 for m in twin.modules() if isinstance(m, torch.nn.Conv2d))


def test_the_twins_augmentation_is_lop_jaxs_for_the_same_draws():
    torch = _torch()
    import jax.numpy as jnp

    from benchmarks import torch_twin
    from lop_jax import augment

    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    flips = np.array([True, False] * 4)
    offsets = rng.integers(0, 9, (8, 2)).astype(np.int32)
    degrees = np.array([0.0, 15.0, 7.3, 1.1, 12.9, 3.3, 0.4, 9.9], np.float32)
    want = augment.rotate(augment.crop(augment.flip(augment.normalize(raw), jnp.asarray(flips)), jnp.asarray(offsets)),
                          jnp.asarray(degrees))
    got = torch_twin.flip_crop_rotate(torch_twin.normalize(raw), torch.from_numpy(flips),
                                      torch.from_numpy(offsets.astype(np.int64)), torch.from_numpy(degrees))
    got = got.permute(0, 2, 3, 1).numpy()
    want = np.asarray(want)
    np.testing.assert_allclose(got[:1], want[:1], rtol=1e-6, atol=1e-6)  # 0 degrees: flip and crop alone
    # nearest-neighbour rotation: a pixel centre that lands on a rounding tie may go either way
    same = np.isclose(got, want, rtol=1e-6, atol=1e-6).all(axis=-1)
    assert same.mean() > 0.995


def test_the_twins_sgd_is_lop_jaxs_optimiser():
    torch = _torch()
    import jax.numpy as jnp

    from benchmarks import torch_twin
    from lop_jax.config import Config
    from lop_jax.train import make_optimizer

    cfg = Config(weight_decay=0.01, momentum=0.9)
    w0 = np.array([1.0, -2.0, 0.5], np.float32)
    grads = [np.array([0.3, 0.1, -0.2], np.float32), np.array([-0.5, 0.4, 0.0], np.float32)]
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch_twin.make_optimizer(torch.nn.ParameterList([p]), cfg)
    tx = make_optimizer(cfg)
    w, state = jnp.asarray(w0), None
    state = tx.init(w)
    for lr, g in zip((0.1, 0.02), grads, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        updates, state = tx.update(jnp.asarray(g), state, w)
        w = w - lr * updates
    np.testing.assert_allclose(p.detach().numpy(), np.asarray(w), rtol=1e-6, atol=1e-7)


def test_the_twin_runs_a_tiny_protocol_and_writes_lop_jaxs_arrays(tmp_path, monkeypatch):
    _torch()
    from benchmarks import torch_twin
    from lop_jax.config import load_config
    from lop_jax.records import RunResults

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"extends": str(REPO / "configs/smoke.json"), "results_dir": str(tmp_path / "r"),
                                  "experiment_name": "tiny", "checkpoint_every_epochs": 1, "checkpoints_to_keep": 2}))
    assert torch_twin.main(["--config", str(config), "--threads", "1"]) == 0
    cfg = load_config(config)
    folder = tmp_path / "r" / "tiny"
    expected = RunResults(cfg, 0, np.arange(20)).arrays
    written = {p.parent.name: np.load(p) for p in folder.glob("*/index-0.npy")}
    assert set(written) == set(expected)
    for name, array in expected.items():
        assert written[name].shape == array.shape and written[name].dtype == array.dtype, name
    assert sorted(written["class_order"]) == list(range(20))
    for name in ("test_accuracy_per_epoch", "validation_accuracy_per_epoch"):
        assert np.all((written[name] >= 0) & (written[name] <= 1)) and np.mean(written[name]) > 0, name
    losses = written["train_loss_per_checkpoint"]
    assert np.all(np.isfinite(losses)) and np.all(losses > 0)
    assert np.all(written["epoch_runtime"] > 0)
    snapshots = sorted(p.name for p in (folder / "model_parameters" / "index-0").iterdir())
    assert snapshots == ["epoch-0.pt", "epoch-2.pt", "epoch-4.pt"]
    assert sorted(p.name for p in (folder / "checkpoints" / "index-0").iterdir()) == ["epoch-3.pt", "epoch-4.pt"]


def test_the_twin_learns_the_class_order_it_is_given(tmp_path, monkeypatch):
    _torch()
    from benchmarks import torch_twin

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"extends": str(REPO / "configs/smoke.json"), "results_dir": str(tmp_path / "r"),
                                  "epochs_per_task": 1, "experiment_name": "tiny"}))
    order = np.arange(20)[::-1].copy()
    np.save(tmp_path / "order.npy", order)
    args = ["--config", str(config), "--threads", "1", "--class-order", str(tmp_path / "order.npy")]
    assert torch_twin.main(args) == 0
    assert np.array_equal(np.load(tmp_path / "r" / "tiny" / "class_order" / "index-0.npy"), order)
    np.save(tmp_path / "bad.npy", np.zeros(20, np.int64))
    assert torch_twin.main(["--config", str(config), "--class-order", str(tmp_path / "bad.npy")]) == 2


def test_the_twin_refuses_what_it_does_not_implement(tmp_path, capsys):
    _torch()
    from benchmarks import torch_twin

    code = torch_twin.main(["--config", str(REPO / "configs/continual_backpropagation.json"),
                            "--results-dir", str(tmp_path)])
    assert code == 2 and "base deep-learning system only" in capsys.readouterr().err and not any(tmp_path.iterdir())


# ---- the eigen kernels' forms of each convolution ----------------------------------------------
def test_every_form_of_a_pass_computes_the_same_numbers():
    """The candidates the forms benchmark times are the same pass: each form's forward, kernel
    gradient and input gradient agree with XLA's within float32 rounding, for every convolution of
    the network (at width 4, 2 images), compiled with the eigen kernels' options."""
    from lop_jax.cpu_kernels import EIGEN_YNN_FUSIONS

    options = {"xla_cpu_experimental_ynn_fusion_type": EIGEN_YNN_FUSIONS}
    seen = set()
    for layer in layers.conv_layers(4):
        runs = conv_forms.candidates(layer, layers.inputs(layer, 2, seed=0), options)
        assert ("input_grad" in runs) == (layer["layers"] != ["stem_conv"])
        for pass_name, by_form in runs.items():
            want = np.asarray(by_form["xla"]())
            for name, run in by_form.items():
                got = np.asarray(run())
                assert got.shape == want.shape, (layer, pass_name, name)
                assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (layer, pass_name, name)
                seen.add(name)
    assert seen == {"xla", "patches", "pairs", "slices", "taps"}


def test_the_forms_totals_weigh_the_picked_the_earlier_and_the_fastest_form():
    stem, narrow = layers.conv_layers(8)[:2]  # 1 stem, 4 narrow layers

    def row(layer, seconds, picked):
        times = {p: {n: [{"wall": t, "cpu": t}] * 3 for n, t in by.items()} for p, by in seconds.items()}
        return {**layer, "earlier": conv_forms.earlier_choice(layer),
                "passes": conv_forms.summarise_layer(times, picked)}

    rows = [row(stem, {"forward": {"xla": 3.0, "patches": 1.0}, "kernel_grad": {"xla": 1.0, "patches": 2.0}},
                {"forward": "patches", "kernel_grad": "patches"}),
            row(narrow, {"forward": {"xla": 2.0, "pairs": 1.0}, "kernel_grad": {"xla": 1.0, "slices": 3.0},
                         "input_grad": {"xla": 2.0, "taps": 4.0}},
                {"forward": "pairs", "kernel_grad": "xla", "input_grad": "xla"})]
    assert rows[0]["passes"]["kernel_grad"]["fastest"] == "xla"
    tot = conv_forms.totals(rows)
    assert tot["forward"] == {"picked": 1.0 + 4 * 1.0, "earlier": 3.0 + 4 * 2.0, "fastest": 5.0}
    assert tot["kernel_grad"] == {"picked": 2.0 + 4.0, "earlier": 1.0 + 4.0, "fastest": 5.0}
    assert tot["input_grad"] == {"picked": 8.0, "earlier": 8.0, "fastest": 8.0}  # the stem has none
    assert tot["all"]["picked"] == 5.0 + 6.0 + 8.0
