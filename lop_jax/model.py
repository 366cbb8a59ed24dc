"""ResNet-18, CIFAR variant, exactly as the reference builds it (semantics §3).

Parameters and BatchNorm statistics are plain nested dicts:

    params["stem_conv"]["kernel"|"bias"], params["stem_bn"]["scale"|"bias"],
    params["block<b>"]["conv1"|"conv2"|"shortcut_conv"]["kernel"|"bias"],
    params["block<b>"]["bn1"|"bn2"|"shortcut_bn"]["scale"|"bias"],
    params["fc"]["kernel"|"bias"]
    batch_stats[...]["mean"|"var"]   (same BatchNorm paths)

for b = 0..7 (blocks 2b and 2b+1 form stage b//2). Conv kernels are HWIO (output channel
last), the Linear kernel is (in, out). ``feature_layers`` names, for each of the 17 hidden
feature layers of semantics §7, the weight layer producing it, its BatchNorm and the next layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lop_jax.conv import conv_fn

NUM_OUTPUTS = 100
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
LINEAR_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
TORCH_PAD = ((1, 1), (1, 1))

Params = dict[str, Any]


class BatchNorm(nn.Module):
    """PyTorch-convention BatchNorm: momentum 0.1, eps 1e-5, unbiased running variance.

    Flax's own BatchNorm stores the biased batch variance; the reference (PyTorch) stores
    the unbiased one, which changes every evaluation, so we implement the PyTorch rule.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            xf = x.astype(jnp.float32)
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            if not self.is_initializing():
                n = xf.size // channels
                m = self.momentum
                ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
                ra_var.value = (1.0 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        inv = jax.lax.rsqrt(var + self.epsilon) * scale
        return ((x - mean.astype(x.dtype)) * inv.astype(x.dtype) + bias.astype(x.dtype))


ACTIVATIONS = ("relu", "crelu")


def crelu(x: jax.Array) -> jax.Array:
    """Concatenated ReLU (Shang et al., 2016; Abbas et al., 2023): [relu(x), relu(-x)] along the
    channels, so that a unit's input is never cut off on both sides."""
    return jnp.concatenate([nn.relu(x), nn.relu(-x)], axis=-1)


def activation_fn(activation: str):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return nn.relu if activation == "relu" else crelu


def produced_channels(channels: int, activation: str) -> int:
    """Output channels of the conv feeding a ``channels``-wide activation: half of them under CReLU,
    which doubles them, so every feature map keeps the ReLU network's width."""
    return channels // 2 if activation == "crelu" else channels


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any, conv_grad: str = "auto") -> nn.Conv:
    """A conv layer; ``conv_grad`` picks how its kernel gradient is computed (``lop_jax.conv.conv_fn``):
    ``xla`` (XLA's own), ``slices`` (a sum of per-tap matmuls), ``auto`` (``slices`` on the CPU backend
    for the layers where it is faster). Forward pass, parameters and input gradient are the same in all modes."""
    pad = TORCH_PAD if kernel == 3 else ((0, 0), (0, 0))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad,
                   use_bias=True, kernel_init=CONV_INIT, bias_init=nn.initializers.zeros,
                   dtype=dtype, param_dtype=jnp.float32, conv_general_dilated=conv_fn(conv_grad), name=name)


class BasicBlock(nn.Module):
    """conv3x3 → BN → ReLU → conv3x3 → BN → + shortcut → ReLU (all convs with bias)."""

    features: int
    stride: int
    dtype: Any = jnp.float32
    conv_grad: str = "auto"
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        act = activation_fn(self.activation)
        inner = produced_channels(self.features, self.activation)
        h = _conv(inner, 3, self.stride, "conv1", self.dtype, self.conv_grad)(x)
        mid = act(BatchNorm(name="bn1")(h, train))
        h = _conv(inner, 3, 1, "conv2", self.dtype, self.conv_grad)(mid)
        h = BatchNorm(name="bn2")(h, train)
        if self.stride != 1 or x.shape[-1] != self.features:
            sc = _conv(inner, 1, self.stride, "shortcut_conv", self.dtype, self.conv_grad)(x)
            sc = BatchNorm(name="shortcut_bn")(sc, train)
        elif self.activation == "crelu":  # relu(z) - relu(-z) = z: the previous block's sum, before CReLU
            sc = x[..., :inner] - x[..., inner:]
        else:
            sc = x
        return act(h + sc), mid


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem (no max-pool), 4 stages of 2 blocks, pooled Linear head.

    ``width`` is the stem/first-stage width (64 in the paper); stages use 1, 2, 4, 8 × width.
    ``dtype`` is the compute dtype (parameters stay float32). ``conv_grad`` selects how conv
    kernel gradients are computed (``lop_jax.conv``): ``auto`` (default: on the CPU backend, where
    XLA's own kernel gradient is several times slower than the forward pass, the tap-sum matmuls for the
    layers where they are faster, and one convolution per run under ``vmap``; plain XLA convolutions
    on other backends), ``xla``, ``slices`` (every conv) or ``eigen`` (``cpu_kernels: "eigen"``:
    each conv in the form and with the gradients ``lop_jax.conv.eigen_choices`` picks for its
    shape). Parameters are the same in every mode; outputs are the same bit for bit, and so are
    input gradients, except under ``eigen``, where both are within float32 rounding (under
    ``vmap``: equal to the per-run results).

    ``activation`` 'crelu' replaces every ReLU by a concatenated ReLU (``crelu``); each conv then
    produces half the channels, so every feature map and the head keep the same width, and an
    identity shortcut carries the previous block's sum before its CReLU (recovered exactly as
    relu(z) − relu(−z)), since a sum of CReLU outputs is not one.
    """

    width: int = 64
    num_outputs: int = NUM_OUTPUTS
    dtype: Any = jnp.float32
    conv_grad: str = "auto"
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True,
                 return_features: bool = False) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        x = x.astype(self.dtype)
        act = activation_fn(self.activation)
        h = _conv(produced_channels(self.width, self.activation), 3, 1, "stem_conv", self.dtype, self.conv_grad)(x)
        h = act(BatchNorm(name="stem_bn")(h, train))
        feats = [h]
        for b in range(8):
            stage = b // 2
            stride = 2 if (stage > 0 and b % 2 == 0) else 1
            h, mid = BasicBlock(self.width * 2 ** stage, stride, self.dtype, self.conv_grad, self.activation,
                                name=f"block{b}")(h, train)
            feats.append(mid)
            feats.append(h)
        pooled = jnp.mean(h, axis=(1, 2))
        feats[-1] = pooled
        logits = nn.Dense(self.num_outputs, kernel_init=LINEAR_INIT, bias_init=nn.initializers.zeros,
                          dtype=self.dtype, param_dtype=jnp.float32, name="fc")(pooled)
        logits = logits.astype(jnp.float32)
        if return_features:
            return logits, feats
        return logits


@dataclass(frozen=True)
class FeatureLayer:
    """One hidden feature layer of semantics §7: who produces it, its BatchNorm, who reads it."""

    producer: tuple[str, ...]  # path of the conv producing the channels (output axis last)
    bn: tuple[str, ...]  # path of the BatchNorm that normalises them
    next_layer: tuple[str, ...]  # path of the conv/Linear that reads them (input axis -2 / 0)
    channels: int


def feature_layers(width: int = 64) -> list[FeatureLayer]:
    """The 17 feature layers of semantics §7, in CBP order (stem, then mid/out of each block)."""
    layers = [FeatureLayer(("stem_conv",), ("stem_bn",), ("block0", "conv1"), width)]
    for b in range(8):
        ch = width * 2 ** (b // 2)
        blk = f"block{b}"
        layers.append(FeatureLayer((blk, "conv1"), (blk, "bn1"), (blk, "conv2"), ch))
        nxt = (f"block{b + 1}", "conv1") if b < 7 else ("fc",)
        layers.append(FeatureLayer((blk, "conv2"), (blk, "bn2"), nxt, ch))
    return layers


def init_model(model: ResNet18, key: jax.Array) -> tuple[Params, Params]:
    """Initialise (params, batch_stats) with the reference's init law (semantics §3)."""
    variables = model.init(key, jnp.zeros((1, 32, 32, 3), jnp.float32), train=False)
    return dict(variables["params"]), dict(variables["batch_stats"])


def count_params(params: Params) -> int:
    """Number of trainable parameters (BatchNorm running statistics excluded)."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
