"""What a run will do, before it starts: the figures ``--dry-run`` prints."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from lop_jax.config import Config
from lop_jax.model import count_params, feature_layers
from lop_jax.train import make_model


@dataclass(frozen=True)
class Plan:
    """The size of a run: tasks, epochs, steps, images, parameters and feature units."""

    tasks: int
    epochs: int
    steps: int
    training_images: int
    trainable_parameters: int
    feature_units: int

    def lines(self) -> list[str]:
        return [f"tasks: {self.tasks}", f"epochs: {self.epochs}", f"training steps: {self.steps:,}",
                f"training images in all: {self.training_images:,}",
                f"trainable parameters: {self.trainable_parameters:,}",
                f"hidden feature units (CBP / dormant analysis): {self.feature_units:,}"]


def make_plan(cfg: Config) -> Plan:
    """The plan of a run of ``cfg`` (the network's shapes only: nothing is initialised or compiled)."""
    steps = sum(cfg.steps_per_epoch(t) * cfg.epochs_per_task for t in range(cfg.num_tasks))
    shapes = jax.eval_shape(lambda: make_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                                          train=False))
    return Plan(tasks=cfg.num_tasks, epochs=cfg.num_epochs, steps=steps,
                training_images=steps * cfg.train_batch_size,
                trainable_parameters=count_params(shapes["params"]),
                feature_units=sum(f.channels for f in feature_layers(cfg.network_width)))
