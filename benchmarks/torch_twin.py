"""The PyTorch twin of lop-jax's base deep-learning system, the yardstick of the side-by-side benchmarks.

    python -m benchmarks.torch_twin --config configs/bench/three_tasks.json --data-dir D \
        [--results-dir R] [--experiment-index 0] [--threads 2] [--class-order ORDER.npy]

The same experiment as ``python -m experiments.run`` for a config of the base system, written as a
plain PyTorch program: the CIFAR ResNet-18 of ``lop_jax.model`` (widths, biases, PyTorch's
BatchNorm, N(0, 2/fan_in) convolutions and N(0, 1/fan_in) head, the 100-logit head masked to the
active classes), ``torch.optim.SGD`` with the config's momentum and (coupled) weight decay, the
normalisation and the flip → reflect-pad crop → rotation augmentation of ``lop_jax.augment``, and
the protocol: class-incremental tasks at the config's images per class, the step-size schedule of
``Config.stepsize_at``, test and validation evaluation every epoch, the best-validation copy
restored at each task's end when the config does early stopping, the network saved at epoch 0
and at each task's end, a checkpoint (network, optimiser, results so far) at the config's cadence,
and the result arrays written as ``<results_dir>/<experiment_name>/<metric>/index-<N>.npy``.

The data is read by ``lop_jax.data`` (which needs no JAX), so both sides train on the same images
in the same split. Random draws (class order, shuffles, augmentations, initial weights) come from a
``torch.Generator`` seeded with the index: the same distributions as lop-jax's, not the same
numbers. Only the base system is implemented; a config asking for CBP, noise, resets or other
methods is refused.
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lop_jax.augment import MAX_DEGREES, MEAN, PAD, STD
from lop_jax.config import Config, ConfigError, load_config
from lop_jax.data import CifarData, load_data
from lop_jax.errors import LopJaxError

NUM_OUTPUTS = 100
EXIT_OK, EXIT_REFUSED = 0, 2


# ---- the network --------------------------------------------------------------------------------
def _conv(cin: int, cout: int, kernel: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=1 if kernel == 3 else 0, bias=True)


class BasicBlock(nn.Module):
    """conv3x3 → BN → ReLU → conv3x3 → BN → + shortcut → ReLU (all convs with bias)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, cout, 3, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv(cout, cout, 3, 1), nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem (no max-pool), 4 stages of 2 blocks (1, 2, 4, 8 × width), pooled Linear head."""

    def __init__(self, width: int = 64, num_outputs: int = NUM_OUTPUTS):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, width, 3, 1), nn.BatchNorm2d(width), nn.ReLU())
        blocks, cin = [], width
        for b in range(8):
            stage = b // 2
            cout = width * 2 ** stage
            blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and b % 2 == 0 else 1))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.fc(torch.mean(h, dim=(2, 3)))


def init_weights(model: nn.Module, generator: torch.Generator) -> None:
    """lop-jax's initial law (semantics §3): convolutions N(0, 2/fan_in), the head N(0, 1/fan_in),
    every bias 0, BatchNorm scale 1 and shift 0."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                gain = 2.0 if isinstance(m, nn.Conv2d) else 1.0
                m.weight.normal_(0.0, math.sqrt(gain / fan_in), generator=generator)
                m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()


# ---- the input pipeline -------------------------------------------------------------------------
def normalize(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC images → float32 NCHW, scaled to [0, 1] then per-channel standardised."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    x = (x - torch.tensor(MEAN)) / torch.tensor(STD)
    return x.permute(0, 3, 1, 2).contiguous()


def flip_crop_rotate(x: torch.Tensor, flip: torch.Tensor, offsets: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """The three augmentations with their draws given: flip the images whose ``flip`` is true,
    reflect-pad by 4 and take the 32×32 window at ``offsets`` [B, 2] (row, col), rotate by
    ``degrees`` counter-clockwise about the centre (nearest neighbour on pixel centres, 0 outside),
    as ``lop_jax.augment``; on a normalised NCHW batch."""
    b, c, h, w = x.shape
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (PAD, PAD, PAD, PAD), mode="reflect")
    rows = (offsets[:, 0:1] + torch.arange(h))[:, :, None]  # [B, H, 1]
    cols = (offsets[:, 1:2] + torch.arange(w))[:, None, :]  # [B, 1, W]
    x = padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # [B, C, H, W]
    theta = torch.deg2rad(degrees.float())[:, None, None]
    ys = torch.arange(h, dtype=torch.float32) - (h - 1) / 2.0
    xs = torch.arange(w, dtype=torch.float32) - (w - 1) / 2.0
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    x_in = torch.round(torch.cos(theta) * xx - torch.sin(theta) * yy + (w - 1) / 2.0).long()
    y_in = torch.round(torch.sin(theta) * xx + torch.cos(theta) * yy + (h - 1) / 2.0).long()
    valid = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)
    idx = (y_in.clamp(0, h - 1) * w + x_in.clamp(0, w - 1)).reshape(b, 1, h * w).expand(b, c, h * w)
    out = torch.gather(x.reshape(b, c, h * w), 2, idx).reshape(b, c, h, w)
    return torch.where(valid[:, None], out, torch.zeros((), dtype=x.dtype))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip (p = 0.5) → reflect-pad 4 and random 32×32 crop → rotate U[0°, 15°], the draws from ``generator``."""
    b = x.shape[0]
    flip = torch.rand(b, generator=generator) < 0.5
    offsets = torch.randint(0, 2 * PAD + 1, (b, 2), generator=generator)
    return flip_crop_rotate(x, flip, offsets, torch.rand(b, generator=generator) * MAX_DEGREES)


# ---- one step, one evaluation -------------------------------------------------------------------
def masked_loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor,
                             mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy over the active logits only (the others set to -inf)."""
    masked = logits.masked_fill(~mask, float("-inf"))
    loss = F.cross_entropy(masked, labels)
    return loss, (masked.argmax(dim=1) == labels).float().mean()


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.SGD:
    """PyTorch SGD as the reference uses it: coupled weight decay on every parameter, momentum."""
    return torch.optim.SGD(model.parameters(), lr=cfg.stepsize, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, labels: torch.Tensor,
               mask: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a normalised batch: augment, forward in training mode, masked loss,
    backward, update. Returns the (detached) loss and accuracy."""
    model.train()
    logits = model(augment(x, generator))
    loss, acc = masked_loss_and_accuracy(logits, labels, mask)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), acc


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
             batch: int) -> tuple[float, float]:
    """Loss and accuracy with BatchNorm in evaluation mode: the mean over batches of the per-batch
    means (the reference's averaging)."""
    model.eval()
    losses, accs = [], []
    for start in range(0, x.shape[0], batch):
        loss, acc = masked_loss_and_accuracy(model(x[start:start + batch]), labels[start:start + batch], mask)
        losses.append(loss)
        accs.append(acc)
    return float(torch.stack(losses).mean()), float(torch.stack(accs).mean())


# ---- the protocol -------------------------------------------------------------------------------
def check_supported(cfg: Config) -> None:
    """The twin implements the base deep-learning system only."""
    others = {"use_cbp": cfg.use_cbp, "noise_std": cfg.noise_std != 0.0, "reset_head": cfg.reset_head,
              "reset_network": cfg.reset_network, "methods": bool(cfg.methods),
              "precision": cfg.precision != "float32", "activation": cfg.activation != "relu"}
    asked = [key for key, on in others.items() if on]
    if asked:
        raise ConfigError(f"the PyTorch twin implements the base deep-learning system only; the config sets "
                          f"{', '.join(asked)}")


class _Split:
    """The images of the run's classes, normalised once: per class k of the order, rows k*n .. k*n+n-1."""

    def __init__(self, images: np.ndarray, order: np.ndarray):
        per_class = images.shape[1]
        self.per_class = per_class
        self.x = normalize(images[order].reshape(-1, *images.shape[2:]))
        self.labels = torch.from_numpy(np.repeat(order, per_class).astype(np.int64))

    def active(self, n_active: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = n_active * self.per_class
        return self.x[:n], self.labels[:n]


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)


def _save_torch(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.write_bytes(buf.getvalue())


def run(cfg: Config, index: int, data: CifarData, threads: int | None = None,
        class_order: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Train run ``index`` of ``cfg`` on ``data``; write its arrays, snapshots and checkpoints under
    ``<results_dir>/<experiment_name>`` and return the arrays. ``class_order`` (a permutation of the
    data's classes, e.g. a lop-jax run's ``class_order`` array) replaces the one drawn from the index,
    so that both implementations can learn the same classes."""
    check_supported(cfg)
    if threads is not None:
        torch.set_num_threads(threads)
    if cfg.num_classes > data.num_classes:
        raise ConfigError(f"config key 'num_tasks': the run needs {cfg.num_classes} classes, "
                          f"the data has {data.num_classes}")
    folder = Path(cfg.results_dir or "results") / cfg.experiment_name
    gen = torch.Generator().manual_seed(index)
    order = torch.randperm(data.num_classes, generator=gen).numpy()
    if class_order is not None:
        if sorted(np.asarray(class_order).tolist()) != list(range(data.num_classes)):
            raise ConfigError(f"--class-order: expected a permutation of the {data.num_classes} classes")
        order = np.asarray(class_order, np.int64)
    used = order[:cfg.num_classes]
    train, val, test = _Split(data.train, used), _Split(data.val, used), _Split(data.test, used)
    model = ResNet18(cfg.network_width)
    init_weights(model, gen)
    opt = make_optimizer(model, cfg)
    arrays = {name: np.zeros(cfg.num_epochs, np.float32) for name in (
        "test_loss_per_epoch", "test_accuracy_per_epoch", "test_evaluation_runtime", "validation_loss_per_epoch",
        "validation_accuracy_per_epoch", "validation_evaluation_runtime", "epoch_runtime")}
    arrays.update({name: np.zeros(cfg.train_summaries, np.float32)
                   for name in ("train_loss_per_checkpoint", "train_accuracy_per_checkpoint")})
    arrays["class_order"] = order.astype(np.int64)
    running, summary_pos, kept = np.zeros(2, np.float32), 0, []
    _save_torch(folder / "model_parameters" / f"index-{index}" / "epoch-0.pt", model.state_dict())
    best, best_acc = None, 0.0
    for epoch in range(cfg.num_epochs):
        task = epoch // cfg.epochs_per_task
        n_active = cfg.active_classes(task)
        mask = torch.zeros(NUM_OUTPUTS, dtype=torch.bool)
        mask[torch.from_numpy(used[:n_active])] = True
        for group in opt.param_groups:
            group["lr"] = cfg.stepsize_at(epoch)
        x, labels = train.active(n_active)
        t0 = time.perf_counter()
        perm = torch.randperm(x.shape[0], generator=gen)
        steps = x.shape[0] // cfg.train_batch_size
        out = [train_step(model, opt, x[i], labels[i], mask, gen)
               for i in perm[:steps * cfg.train_batch_size].reshape(steps, cfg.train_batch_size)]
        losses = torch.stack([o[0] for o in out]).numpy()
        accs = torch.stack([o[1] for o in out]).numpy()
        t1 = time.perf_counter()
        test_loss, test_acc = evaluate(model, *test.active(n_active), mask, cfg.test_batch_size)
        t2 = time.perf_counter()
        val_loss, val_acc = evaluate(model, *val.active(n_active), mask, cfg.val_batch_size)
        if val_acc > best_acc:
            best, best_acc = copy.deepcopy(model.state_dict()), val_acc
        t3 = time.perf_counter()
        for step, (loss, acc) in enumerate(zip(losses, accs, strict=True)):
            running += np.array([loss, acc], np.float32)
            if (step + 1) % cfg.running_avg_window == 0:
                arrays["train_loss_per_checkpoint"][summary_pos] = running[0] / np.float32(cfg.running_avg_window)
                arrays["train_accuracy_per_checkpoint"][summary_pos] = running[1] / np.float32(cfg.running_avg_window)
                summary_pos += 1
                running[:] = 0
        for name, value in (("test_loss_per_epoch", test_loss), ("test_accuracy_per_epoch", test_acc),
                            ("validation_loss_per_epoch", val_loss), ("validation_accuracy_per_epoch", val_acc),
                            ("epoch_runtime", t1 - t0), ("test_evaluation_runtime", t2 - t1),
                            ("validation_evaluation_runtime", t3 - t2)):
            arrays[name][epoch] = value
        done = epoch + 1
        task_end = done % cfg.epochs_per_task == 0
        if task_end:
            if cfg.early_stopping and best is not None:
                model.load_state_dict(best)
            best, best_acc = None, 0.0
            _save_torch(folder / "model_parameters" / f"index-{index}" / f"epoch-{done}.pt", model.state_dict())
        every = cfg.checkpoint_every_epochs
        if task_end or done == cfg.num_epochs or (every and done % every == 0):
            path = folder / "checkpoints" / f"index-{index}" / f"epoch-{done}.pt"
            _save_torch(path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                               "generator": gen.get_state(), "arrays": arrays, "running": running,
                               "epochs_done": done})
            kept.append(path)
            while len(kept) > cfg.checkpoints_to_keep:
                kept.pop(0).unlink()
    for name, array in arrays.items():
        _save_npy(folder / name / f"index-{index}.npy", array)
    return arrays


def main(argv: list[str] | None = None) -> int:
    """Run the twin from the command line; a refused config or data is one line on stderr, exit 2."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.torch_twin", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--data-dir", default=None, help="override the config's data_path")
    p.add_argument("--results-dir", default=None, help="override the config's results_dir")
    p.add_argument("--experiment-index", type=int, default=0)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count(), help="torch.set_num_threads (default: the CPUs this process may use)")
    p.add_argument("--class-order", default=None, help="an .npy permutation of the classes to use instead of the "
                   "index's (e.g. a lop-jax run's class_order/index-<N>.npy)")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("data_path", args.data_dir), ("results_dir", args.results_dir)) if v is not None}
    try:
        cfg = load_config(args.config, overrides)
        check_supported(cfg)
        order = None if args.class_order is None else np.load(args.class_order)
        run(cfg, args.experiment_index, load_data(cfg), args.threads, order)
    except (LopJaxError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
