"""The scaling rule of the laptop protocol: what a smaller protocol must change so that every force
that acts once per SGD step does, over a task, what it does over a task of the paper.

A scaled protocol keeps the paper's algorithm and changes its sizes (tasks, epochs, images per
class, batch, width). Its training set grows by the same 5 classes per task, so the number of
steps in task t is the paper's times one ratio ``r`` (``step_ratio``), the same in every task.
Quantities counted in epochs need no rule beyond "the same share of a task": the step-size
milestones (60/120/160 of 200 epochs, ``Config.stepsize_at``) and early stopping (the best
validation epoch of each task). Quantities counted in steps are scaled by ``r`` so that their
total over a task equals the paper's (``scaled_step_values``):

- weight decay: each step multiplies the weights by (1 − lr·wd), so a task shrinks them by
  exp(−wd · Σ lr); the schedule has the same shape in epochs, so Σ lr over a task is r times
  the paper's and ``weight_decay / r`` keeps the task's shrink;
- shrink and perturb's noise: independent per step, so its variance over a task is σ²·steps and
  ``noise_std / √r`` keeps it;
- CBP's replacement rate (replacements per unit per step): ``replacement_rate / r × w``, with
  ``w`` = paper width / scaled width (``width_ratio``), keeps the expected units replaced per
  layer per task equal to the paper's. The step ratio alone (``w = 1``, the same replacements
  per unit per task) is the derivation's first answer, but it was measured to leave CBP with 19 %
  dormant units at width 8; the width factor is therefore a measured choice, not a derived one
  (docs/scaled_protocol.md, search candidates p5–p7);
- CBP's maturity threshold (steps a new unit is protected): ``round(maturity_threshold · r)``
  keeps the protected share of a task.

The plasticity methods beyond the paper's follow the same rule for their step-counted options
(``METHOD_STEP_OPTIONS``, ``scaled_method_spec``): a period in steps × r (ReDo's ``every``), a
force applied every step ÷ r (L2 Init's ``strength``), an independent per-step noise ÷ √r (UPGD's
``noise_std``) and a running average over steps keeps its time constant's share of a task,
1 − β → (1 − β) / r (UPGD's ``beta_utility``).

docs/scaled_protocol.md derives the rule and reports what it gives.
"""

from __future__ import annotations

import math
from typing import Any

from lop_jax.config import Config

STEP_SCALED_KEYS = ("weight_decay", "noise_std", "replacement_rate", "maturity_threshold")


def steps_in_task(cfg: Config, task: int) -> int:
    """SGD steps of task ``task`` (0-based): steps per epoch on the classes seen so far × epochs."""
    return cfg.steps_per_epoch(task) * cfg.epochs_per_task


def step_ratio(scaled: Config, paper: Config) -> float:
    """Steps of a scaled task / steps of the paper's task.

    Both protocols add ``classes_per_task`` classes per task and use whole batches only (config
    validation), so task t has (t + 1) times the steps of the first task in both, and the ratio
    of the first tasks is the ratio of every task.
    """
    return steps_in_task(scaled, 0) / steps_in_task(paper, 0)


def width_ratio(scaled: Config, paper: Config) -> float:
    """Paper width / scaled width: how many of the paper's units one scaled unit stands for."""
    return paper.network_width / scaled.network_width


def scaled_step_values(paper: Config, ratio: float, widths: float = 1.0) -> dict[str, Any]:
    """The step-counted keys of ``paper`` for a protocol with ``ratio`` × the paper's steps per task
    and a network ``widths`` times narrower (``width_ratio``; it scales CBP's rate only)."""
    if not ratio > 0:
        raise ValueError(f"the step ratio must be > 0, got {ratio}")
    if not widths > 0:
        raise ValueError(f"the width ratio must be > 0, got {widths}")
    return {
        "weight_decay": paper.weight_decay / ratio,
        "noise_std": paper.noise_std / math.sqrt(ratio),
        "replacement_rate": paper.replacement_rate / ratio * widths,
        "maturity_threshold": round(paper.maturity_threshold * ratio),
    }


# method name → option → how it counts steps: a period ("steps"), a per-step force ("force"), an
# independent per-step noise ("noise") or the weight β of a running average over steps ("average")
METHOD_STEP_OPTIONS: dict[str, dict[str, str]] = {
    "redo": {"every": "steps"},
    "l2_init": {"strength": "force"},
    "upgd": {"noise_std": "noise", "beta_utility": "average"},
}


def scaled_method_spec(spec: dict[str, Any], ratio: float) -> dict[str, Any]:
    """A ``methods`` entry of a paper config with its step-counted options scaled for ``ratio``."""
    if not ratio > 0:
        raise ValueError(f"the step ratio must be > 0, got {ratio}")
    out = dict(spec)
    for option, kind in METHOD_STEP_OPTIONS.get(spec["name"], {}).items():
        if option not in out:
            continue
        value = out[option]
        if kind == "steps":
            out[option] = max(1, round(value * ratio))
        elif kind == "force":
            out[option] = value / ratio
        elif kind == "noise":
            out[option] = value / math.sqrt(ratio)
        else:
            if (1.0 - value) / ratio >= 1:
                raise ValueError(f"{spec['name']}.{option} = {value}: a running average this short cannot be "
                                 f"scaled by {ratio}")
            out[option] = 1.0 - (1.0 - value) / ratio
    return out
