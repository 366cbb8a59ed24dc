"""Config: the reference's files, named errors, --set parsing and the step-size schedule (semantics §1, §4)."""

import dataclasses
import json

import pytest
from conftest import REPO_ROOT

from lop_jax.config import Config, ConfigError, load_config, make_config, parse_override

# The reference's own cfg/continual_backpropagation.json, byte for byte (comments, spacing, 0.00001).
REFERENCE_CBP_JSON = """{
  "_model_description_": "Continual backpropagation algorithm",

  "_comment_1_": "Data paths; change data_path and results_dir to your convenience",
  "data_path": "",
  "results_dir": "",
  "experiment_name":  "continual_backpropagation",
  "num_workers":  12,

  "_comment_2_": "Learner Parameters",
  "stepsize":  0.1,
  "weight_decay": 0.0005,
  "momentum": 0.9,
\x20\x20
  "_comment_3_": "Shrink and perturb parameters",
  "noise_std": 0.0,

  "_comment_4_": "Continual Backprop Parameters",
  "use_cbp": true,
  "replacement_rate": 0.00001,
  "utility_function": "contribution",
  "maturity_threshold": 1000,

  "_comment_5_": "Network resetting parameters",
  "reset_head": false,
  "reset_network": false,
  "early_stopping": true
}
"""

PAPER_CONFIGS = ("base_deep_learning_system", "continual_backpropagation", "head_resetting",
                 "retrained_network", "shrink_and_perturb")


def test_reference_config_loads_unchanged(tmp_path):
    path = tmp_path / "continual_backpropagation.json"
    path.write_text(REFERENCE_CBP_JSON)
    cfg = load_config(path)
    assert cfg.use_cbp is True
    assert cfg.replacement_rate == pytest.approx(1e-5, rel=1e-12)
    assert cfg.utility_function == "contribution"
    assert cfg.maturity_threshold == 1000
    assert cfg.early_stopping is True and cfg.reset_head is False and cfg.reset_network is False
    assert cfg.stepsize == 0.1 and cfg.weight_decay == 0.0005 and cfg.momentum == 0.9 and cfg.noise_std == 0.0
    assert cfg.num_workers == 12
    assert cfg.experiment_name == "continual_backpropagation"
    # the scale keys default to the paper's protocol
    assert (cfg.num_tasks, cfg.classes_per_task, cfg.epochs_per_task) == (20, 5, 200)
    assert (cfg.train_images_per_class, cfg.val_images_per_class, cfg.test_images_per_class) == (450, 50, 100)
    assert (cfg.train_batch_size, cfg.test_batch_size, cfg.val_batch_size) == (90, 100, 50)
    assert cfg.network_width == 64 and cfg.running_avg_window == 25
    assert cfg.num_epochs == 4000 and cfg.num_classes == 100
    assert [cfg.steps_per_epoch(t) for t in (0, 1, 19)] == [25, 50, 500]
    # comments are kept aside, not treated as keys
    assert "_comment_4_" not in cfg.to_dict()


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_match_spec_table(name):
    cfg = load_config(REPO_ROOT / "configs" / f"{name}.json")
    assert cfg.experiment_name == name
    assert cfg.early_stopping is True
    assert (cfg.stepsize, cfg.weight_decay, cfg.momentum) == (0.1, 0.0005, 0.9)
    assert (cfg.num_tasks, cfg.classes_per_task, cfg.epochs_per_task, cfg.network_width) == (20, 5, 200, 64)
    assert cfg.data_source == "cifar100" and cfg.augment_test is True
    assert cfg.use_cbp == (name == "continual_backpropagation")
    assert cfg.reset_head == (name == "head_resetting")
    assert cfg.reset_network == (name == "retrained_network")
    assert cfg.noise_std == (1e-5 if name == "shrink_and_perturb" else 0.0)
    if cfg.use_cbp:
        assert (cfg.replacement_rate, cfg.utility_function, cfg.maturity_threshold) == (1e-5, "contribution", 1000)
        assert cfg.cbp_decay_rate == 0.99


def test_defaults_are_the_base_system_and_experiment_name_defaults_to_file_stem(tmp_path):
    assert Config() == make_config({})
    path = tmp_path / "my_run.json"
    path.write_text(json.dumps({"stepsize": 0.05}))
    cfg = load_config(path)
    assert cfg.experiment_name == "my_run" and cfg.stepsize == 0.05
    # overrides win over the file
    cfg = load_config(path, {"stepsize": 0.2, "experiment_name": "other"})
    assert cfg.stepsize == 0.2 and cfg.experiment_name == "other"


def test_config_is_frozen():
    cfg = make_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.stepsize = 1.0


def _error(values):
    with pytest.raises(ConfigError) as info:
        make_config(values)
    msg = str(info.value)
    assert "\n" not in msg, "config errors are one line"
    return msg


def test_unknown_key_is_named():
    assert "stepsize_typo" in _error({"stepsize_typo": 0.1})
    assert "nonsense" in _error({"stepsize": 0.1, "nonsense": 1})


@pytest.mark.parametrize("key,value", [
    ("stepsize", "fast"),
    ("stepsize", True),
    ("use_cbp", 1),
    ("use_cbp", "true"),
    ("early_stopping", 0),
    ("num_tasks", 2.5),
    ("num_tasks", "20"),
    ("num_tasks", True),
    ("experiment_name", 3),
    ("network_width", None),
])
def test_wrong_type_is_named(key, value):
    assert key in _error({key: value})


def test_int_is_accepted_for_a_float_key():
    cfg = make_config({"stepsize": 1, "noise_std": 0})
    assert cfg.stepsize == 1.0 and isinstance(cfg.stepsize, float)


@pytest.mark.parametrize("values,keys", [
    ({"num_tasks": 21}, ("num_tasks", "classes_per_task")),
    ({"num_tasks": 10, "classes_per_task": 11}, ("num_tasks", "classes_per_task")),
    ({"train_images_per_class": 451}, ("train_images_per_class", "val_images_per_class")),
    ({"train_images_per_class": 400, "val_images_per_class": 101}, ("train_images_per_class",
                                                                    "val_images_per_class")),
    ({"test_images_per_class": 101}, ("test_images_per_class",)),
    ({"train_batch_size": 7}, ("train_batch_size",)),
    ({"train_batch_size": 100}, ("train_batch_size",)),
    ({"network_width": 0}, ("network_width",)),
    ({"epochs_per_task": 0}, ("epochs_per_task",)),
    ({"stepsize": 0.0}, ("stepsize",)),
    ({"stepsize": -0.1}, ("stepsize",)),
    ({"momentum": 1.0}, ("momentum",)),
    ({"weight_decay": -1e-4}, ("weight_decay",)),
    ({"noise_std": -1.0}, ("noise_std",)),
    ({"data_source": "imagenet"}, ("data_source",)),
    ({"utility_function": "random"}, ("utility_function",)),
    ({"use_cbp": True, "replacement_rate": 0.0, "maturity_threshold": 10}, ("replacement_rate",)),
])
def test_impossible_value_is_named(values, keys):
    msg = _error(values)
    assert any(k in msg for k in keys), msg


def test_valid_small_batch_sizes_pass():
    # 5 classes × 20 images = 100, divisible by 25: fine even though 20 is not
    cfg = make_config({"train_images_per_class": 20, "train_batch_size": 25, "network_width": 2})
    assert cfg.steps_per_epoch(0) == 4 and cfg.steps_per_epoch(1) == 8


@pytest.mark.parametrize("text,expected", [
    ("use_cbp=true", ("use_cbp", True)),
    ("early_stopping=false", ("early_stopping", False)),
    ("stepsize=0.1", ("stepsize", 0.1)),
    ("num_tasks=3", ("num_tasks", 3)),
    ('experiment_name="name"', ("experiment_name", "name")),
    ("experiment_name=bare", ("experiment_name", "bare")),
    ("data_path=/tmp/x=y", ("data_path", "/tmp/x=y")),
    ("replacement_rate=1e-5", ("replacement_rate", 1e-5)),
])
def test_parse_override(text, expected):
    key, value = parse_override(text)
    assert (key, value) == expected
    assert type(value) is type(expected[1])


def test_parse_override_without_equals_is_an_error():
    with pytest.raises(ConfigError):
        parse_override("use_cbp")


def test_override_types_are_checked_like_file_values():
    key, value = parse_override("num_tasks=2.5")
    with pytest.raises(ConfigError, match="num_tasks"):
        load_config(None, {key: value})
    key, value = parse_override("use_cbp=1")
    with pytest.raises(ConfigError, match="use_cbp"):
        load_config(None, {key: value})


def test_cpu_kernels_is_checked():
    assert make_config({}).cpu_kernels == "default"
    assert make_config({"cpu_kernels": "eigen"}).cpu_kernels == "eigen"
    with pytest.raises(ConfigError, match="cpu_kernels"):
        make_config({"cpu_kernels": "onednn"})


def test_stepsize_schedule_paper():
    cfg = make_config({})
    expected = {0: 0.1, 59: 0.1, 60: 0.02, 119: 0.02, 120: 0.004, 159: 0.004, 160: 0.0008, 199: 0.0008,
                200: 0.1, 259: 0.1, 260: 0.02, 3999: 0.0008}
    for epoch, lr in expected.items():
        assert cfg.stepsize_at(epoch) == pytest.approx(lr, rel=1e-9, abs=0), epoch


def test_stepsize_schedule_scales_with_epochs_per_task():
    cfg = make_config({"epochs_per_task": 20, "stepsize": 0.05})
    got = [cfg.stepsize_at(e) for e in range(40)]
    one_task = [0.05] * 6 + [0.01] * 6 + [0.002] * 4 + [0.0004] * 4
    assert got == pytest.approx(one_task * 2, rel=1e-9, abs=0)


def test_first_epoch_of_every_task_uses_base_stepsize():
    for e in (1, 2, 3, 4, 5, 20, 200):
        cfg = make_config({"epochs_per_task": e})
        assert cfg.stepsize_at(0) == cfg.stepsize, e
        assert cfg.stepsize_at(e) == cfg.stepsize, e
    # epochs_per_task 2: scaled milestones (0, 1, 1); the reference's branch chain picks ×0.04 at epoch 1
    two = make_config({"epochs_per_task": 2})
    assert [two.stepsize_at(e) for e in range(4)] == [0.1, 0.004, 0.1, 0.004]


def test_train_summaries():
    cfg = make_config({})
    # 25·t steps per epoch, one summary every 25 steps: t summaries per epoch of task t
    assert cfg.train_summaries == sum(t * 200 for t in range(1, 21))
    small = make_config({"num_tasks": 2, "epochs_per_task": 2, "train_images_per_class": 20,
                         "train_batch_size": 25, "running_avg_window": 2})
    # steps per epoch 4 then 8 → 2 and 4 summaries per epoch
    assert small.train_summaries == 2 * 2 + 4 * 2


def test_extends_composes_files_in_order_with_the_files_own_keys_last(tmp_path):
    (tmp_path / "system.json").write_text(json.dumps({"use_cbp": True, "replacement_rate": 1e-5,
                                                      "maturity_threshold": 1000, "weight_decay": 5e-4}))
    (tmp_path / "scale.json").write_text(json.dumps({"num_tasks": 3, "weight_decay": 2e-3,
                                                     "_why_num_tasks_": "a comment travels too"}))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "cbp.json").write_text(json.dumps({"extends": ["../system.json", "../scale.json"],
                                                           "replacement_rate": 4e-5}))
    cfg = load_config(tmp_path / "sub" / "cbp.json")
    assert (cfg.use_cbp, cfg.maturity_threshold, cfg.num_tasks) == (True, 1000, 3)
    assert cfg.weight_decay == 2e-3  # the later file wins
    assert cfg.replacement_rate == 4e-5  # the file's own key wins over both
    assert cfg.experiment_name == "cbp"  # the file's own name, as for a plain file
    assert cfg._comments["_why_num_tasks_"] == "a comment travels too"
    assert "extends" not in cfg.to_dict()


@pytest.mark.parametrize("extends, message", [
    ("missing.json", "config file not found"),
    (3, "'extends' must be a file name or a list of file names"),
    ("a.json", "'extends' forms a cycle"),
])
def test_bad_extends_is_a_one_line_error(tmp_path, extends, message):
    (tmp_path / "a.json").write_text(json.dumps({"extends": "b.json"}))
    (tmp_path / "b.json").write_text(json.dumps({"extends": extends}))
    with pytest.raises(ConfigError, match=message) as err:
        load_config(tmp_path / "a.json")
    assert "\n" not in str(err.value)


def test_a_list_of_files_composes_a_system_with_a_scale():
    composed = load_config([REPO_ROOT / "configs" / "continual_backpropagation.json",
                            REPO_ROOT / "configs" / "scales" / "smoke.json"], {"results_dir": "r"})
    paper = load_config(REPO_ROOT / "configs" / "continual_backpropagation.json")
    smoke = load_config(REPO_ROOT / "configs" / "smoke.json")
    assert composed.experiment_name == "continual_backpropagation"
    assert (composed.use_cbp, composed.replacement_rate, composed.utility_function) == (True, 1e-5, "contribution")
    assert (composed.num_tasks, composed.network_width, composed.data_source) == (smoke.num_tasks, smoke.network_width,
                                                                                  "embedded")
    assert composed.results_dir == "r" and paper.num_tasks == 20


def test_smoke_and_quick_are_the_base_system_at_a_scale():
    for name in ("smoke", "quick"):
        cfg = load_config(REPO_ROOT / "configs" / f"{name}.json")
        at_scale = load_config([REPO_ROOT / "configs" / "base_deep_learning_system.json",
                                REPO_ROOT / "configs" / "scales" / f"{name}.json"], {"experiment_name": name})
        assert cfg == at_scale
