"""2-D convolution with fast gradients and fast ``vmap`` on XLA's CPU backend.

XLA's CPU backend computes the kernel (weight) gradient of an NHWC/HWIO convolution as a
convolution whose window is the whole output image, single-threaded; for the wider layers of the
CIFAR ResNet-18 that is several times slower than the forward pass. And ``vmap`` with a kernel per
run (the multi-run training loop) turns every convolution into a grouped one, which the CPU backend
runs several times slower than one convolution per run (the measurements are in
docs/performance_notes.md). :func:`conv_general_dilated` is a drop-in for
``lax.conv_general_dilated`` (what ``flax.linen.Conv(conv_general_dilated=...)`` calls) whose

* forward is ``lax.conv_general_dilated`` itself (bit-identical output),
* input gradient is XLA's own (the transpose of the same convolution),
* kernel gradient is, where it pays off, a sum over kernel taps (:func:`kernel_grad_slices`):
  for tap (i, j), the strided slice of the padded input that meets kernel element (i, j),
  contracted with the output cotangent over the batch and the output pixels — one matmul per tap,
  accumulated in float32 — and otherwise XLA's own,
* batching rule (``vmap``) runs one convolution per run when the kernel is batched (for up to
  :data:`MAX_UNROLLED_RUNS` runs) and folds the run axis into the batch when it is not.

The ``eigen`` mode (``cpu_kernels: "eigen"`` in a config, which also moves the convolutions out of
XLA's YNNPACK fusions onto its Eigen path) keeps XLA's kernel gradient, which is the faster one
there for 3×3 kernels (the tap sum for 1×1), and computes the input gradient of a strided
convolution of 16 input channels or more as a sum over kernel taps (:func:`input_grad_taps`),
where XLA's own is a slow dilated convolution. Eigen's convolution is slow where the layer has
few output channels or a shallow kernel, so there (:func:`eigen_forward`) the eigen mode computes
the same convolution in another form, its gradients being XLA's transposes of that form: the stem
as one matmul over its image patches (:func:`conv_patches`), and the narrow stride-1 layers over
pixel pairs (:func:`conv_pairs`: each pair of adjacent columns one pixel of twice the channels, a
convolution with twice the output channels). :func:`eigen_choices` says which, layer by layer.

Supported: NHWC input, HWIO kernel, explicit padding, any stride, no dilation, one feature group
(everything else goes to ``lax.conv_general_dilated``). Reverse-mode only (``jax.grad``/``vjp``,
not ``jvp``); works under ``jax.jit`` and ``jax.vmap``. :func:`conv_fn` picks the function for a
model's ``conv_grad`` setting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache, partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_batching import custom_vmap

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
CONV_GRAD_MODES = ("auto", "xla", "slices", "eigen")
KERNEL_GRADS = ("slices", "xla")
INPUT_GRADS = ("xla", "taps")
FORWARDS = ("xla", "patches", "pairs")
# The eigen mode's other forms (eigen_forward): patches for kernels of at most this many entries per
# output channel (kh·kw·Ci, the stem's 27); pixel pairs for 3×3 stride-1 layers of at most this many
# output channels, where Eigen's kernel fills its registers poorly (8→8 gained, 16→16 lost).
MAX_PATCHES_DEPTH = 32
MAX_PAIRS_CO = 8
# The eigen mode's input gradient of a strided convolution is the tap sum from this many input
# channels on; below, XLA's own is faster (measured at widths 8 and 64: docs/speed_vs_pytorch.md).
MIN_TAPS_CI = 16
# In "auto" mode, stride-1 convolutions with fewer than this many (Ci × Co) kernel entries keep
# XLA's kernel gradient, which is as fast as the tap sum there; from 32→32 channels on the tap sum
# wins. Strided and 1×1 convolutions always use the tap sum, which won at every width measured
# (the figures behind these thresholds: docs/performance_notes.md).
MIN_SLICES_ENTRIES_STRIDE_1 = 32 * 32
# Below this many input channels each tap's product is computed as [N, Ci]ᵀ[N, Co] directly;
# from it on as [Co, N] @ [N, Ci] with the cotangent transposed once (XLA's CPU backend hands a
# matmul whose lhs contracts its last axis to its fast library).
MIN_TRANSPOSED_CI = 8
# Under vmap with a batched kernel, up to this many runs are unrolled into one convolution each;
# more fall back to XLA's grouped convolution (compile time grows with the unrolled count).
MAX_UNROLLED_RUNS = 32

Padding = tuple[tuple[int, int], tuple[int, int]]


class _Spec(NamedTuple):
    """The static part of a convolution (hashable: the key of its cached custom ops)."""

    strides: tuple[int, int]
    padding: Padding
    precision: Any
    kernel_grad: str
    input_grad: str = "xla"
    forward: str = "xla"


def resolve_conv_grad(mode: str) -> str:
    """``auto`` → ``slices`` on the CPU backend and ``xla`` elsewhere (GPUs have cuDNN); checks the name."""
    if mode not in CONV_GRAD_MODES:
        raise ValueError(f"conv_grad must be one of {CONV_GRAD_MODES}, got {mode!r}")
    if mode == "auto":
        return "slices" if jax.default_backend() == "cpu" else "xla"
    return mode


def _plain_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Padding,
                precision: Any, forward: str = "xla") -> jax.Array:
    if forward == "patches":
        return conv_patches(x, w, strides, padding, precision)
    if forward == "pairs":
        return conv_pairs(x, w, padding, precision)
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DIMENSION_NUMBERS,
                                    precision=precision)


def _out_hw(in_hw: Sequence[int], kernel_hw: Sequence[int], strides: Sequence[int],
            padding: Padding) -> tuple[int, int]:
    (h, w), (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = in_hw, kernel_hw, strides, padding
    return (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1


def conv_patches(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Padding,
                 precision: Any = None) -> jax.Array:
    """The NHWC/HWIO convolution as one matmul: the kh·kw strided slices of the padded input side by
    side on the channel axis [B·Ho·Wo, kh·kw·Ci] times the kernel [kh·kw·Ci, Co]."""
    kh, kw, ci, co = w.shape
    b = x.shape[0]
    ho, wo = _out_hw(x.shape[1:3], (kh, kw), strides, padding)
    patches = jnp.concatenate(_taps(x, (kh, kw), (ho, wo), strides, padding), axis=-1)
    y = jnp.dot(patches.reshape(b * ho * wo, kh * kw * ci), w.reshape(kh * kw * ci, co), precision=precision)
    return y.reshape(b, ho, wo, co)


def _pair_taps() -> np.ndarray:
    """For the pair form of a 3×3 kernel: ``[paired column 0..2, input sub-pixel p, output sub-pixel q]``
    → the kernel column that output pixel 2j+q applies to input pixel 2(j+column-1)+p, or 3 (none)."""
    idx = np.full((3, 2, 2), 3, np.int32)
    for q in range(2):
        for dj in range(3):
            t = q + dj - 1  # the input column, relative to 2j
            idx[t // 2 + 1, t % 2, q] = dj
    return idx


def conv_pairs(x: jax.Array, w: jax.Array, padding: Padding, precision: Any = None) -> jax.Array:
    """The stride-1 NHWC/HWIO 3×3 convolution (width padding 1 on each side, even image width) over
    pixel pairs: the input [B, H, W, Ci] read as [B, H, W/2, 2·Ci] (a reshape), convolved with the
    3×3 kernel [3, 3, 2·Ci, 2·Co] that maps a pair of input pixels to a pair of output pixels (the
    original kernel's entries where a pixel of the one meets a pixel of the other, zeros elsewhere),
    and read back as [B, H, W, Co]. Twice the multiply-adds, in a shape Eigen runs faster."""
    b, h, wd, ci = x.shape
    kh, kw, _, co = w.shape
    if kw != 3 or tuple(padding[1]) != (1, 1) or wd % 2:
        raise ValueError(f"conv_pairs takes a width-3 kernel, width padding (1, 1) and an even image width, "
                         f"got kernel {w.shape}, padding {padding}, width {wd}")
    padded = jnp.concatenate([w, jnp.zeros((kh, 1, ci, co), w.dtype)], axis=1)
    w2 = padded[:, _pair_taps()]  # [kh, paired column, p, q, Ci, Co]
    w2 = w2.transpose(0, 1, 2, 4, 3, 5).reshape(kh, 3, 2 * ci, 2 * co)
    y = lax.conv_general_dilated(x.reshape(b, h, wd // 2, 2 * ci), w2, (1, 1), (tuple(padding[0]), (1, 1)),
                                 dimension_numbers=DIMENSION_NUMBERS, precision=precision)
    return y.reshape(b, h, wd, co)


def eigen_forward(input_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
                  padding: Padding) -> str:
    """The form the ``eigen`` mode computes a convolution in: ``patches`` for a kernel larger than 1×1
    with at most :data:`MAX_PATCHES_DEPTH` entries per output channel (the stem), ``pairs`` for a 3×3
    stride-1 convolution with width padding 1, an even image width and at most :data:`MAX_PAIRS_CO`
    output channels, else ``xla`` (XLA's convolution)."""
    kh, kw, ci, co = kernel_shape
    if kh * kw > 1 and kh * kw * ci <= MAX_PATCHES_DEPTH:
        return "patches"
    if ((kh, kw) == (3, 3) and tuple(strides) == (1, 1) and tuple(padding[1]) == (1, 1)
            and input_shape[2] % 2 == 0 and co <= MAX_PAIRS_CO):
        return "pairs"
    return "xla"


def _taps(x: jax.Array, kernel_hw: tuple[int, int], out_hw: tuple[int, int], strides: tuple[int, int],
          padding: Padding) -> list[jax.Array]:
    """The kh·kw strided slices [B, Ho, Wo, Ci] of the padded input, row-major over the kernel."""
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
    (sh, sw), (ho, wo) = strides, out_hw
    b, _, _, ci = xp.shape
    return [lax.slice(xp, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, ci), (1, sh, sw, 1))
            for i in range(kernel_hw[0]) for j in range(kernel_hw[1])]


def kernel_grad_slices(x: jax.Array, dy: jax.Array, kernel_hw: Sequence[int], strides: tuple[int, int],
                       padding: Padding, precision: Any = None) -> jax.Array:
    """Kernel gradient [kh, kw, Ci, Co] of the NHWC/HWIO convolution, as one matmul per kernel tap.

    ``x`` is the convolution's input [B, H, W, Ci], ``dy`` the output cotangent [B, Ho, Wo, Co];
    products are accumulated in float32 and the result has ``x``'s dtype.
    """
    kh, kw = kernel_hw[:2]
    ci, co = x.shape[-1], dy.shape[-1]
    n = dy.shape[0] * dy.shape[1] * dy.shape[2]
    taps = [t.reshape(n, ci) for t in _taps(x, (kh, kw), dy.shape[1:3], strides, padding)]
    d2 = dy.reshape(n, co)
    if ci >= MIN_TRANSPOSED_CI:
        # The barrier keeps XLA from folding the transpose back into the matmul's dimension numbers.
        d_t = lax.optimization_barrier(d2.T)
        g = jnp.stack([jnp.dot(d_t, t, precision=precision, preferred_element_type=jnp.float32) for t in taps])
        g = jnp.swapaxes(g, 1, 2)
    else:
        g = jnp.stack([lax.dot_general(t, d2, (((0,), (0,)), ((), ())), precision=precision,
                                       preferred_element_type=jnp.float32) for t in taps])
    return g.reshape(kh, kw, ci, co).astype(x.dtype)


def input_grad_taps(w: jax.Array, dy: jax.Array, input_shape: Sequence[int], strides: tuple[int, int],
                    padding: Padding, precision: Any = None) -> jax.Array:
    """Input gradient [B, H, W, Ci] of the NHWC/HWIO convolution, as one matmul per kernel tap.

    For tap (i, j) the output cotangent [B·Ho·Wo, Co] times the tap's kernel transposed [Co, Ci]
    lands, spread by the stride, where that tap read the padded input; the taps' products are
    summed in float32 and the padding cut off. For strided convolutions on XLA's Eigen path this
    is several times faster than XLA's own (a dilated convolution).
    """
    kh, kw = w.shape[:2]
    b, h, wd, ci = input_shape
    _, ho, wo, co = dy.shape
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    hp, wp = h + pt + pb, wd + pl + pr
    d2 = dy.reshape(b * ho * wo, co)
    zero = jnp.zeros((), jnp.float32)
    acc = None
    for i in range(kh):
        for j in range(kw):
            g = jnp.dot(d2, w[i, j].T, precision=precision, preferred_element_type=jnp.float32)
            g = lax.pad(g.reshape(b, ho, wo, ci), zero,
                        ((0, 0, 0), (i, hp - i - (ho - 1) * sh - 1, sh - 1), (j, wp - j - (wo - 1) * sw - 1, sw - 1),
                         (0, 0, 0)))
            acc = g if acc is None else acc + g
    return acc[:, pt:pt + h, pl:pl + wd, :].astype(dy.dtype)


def _per_run(fn: Callable, plain: Callable, axis_size: int, in_batched: Sequence[bool], *args: jax.Array):
    """Batching rule body: ``fn`` once per run (unrolled), or XLA's own batching of ``plain`` past the cap."""
    if axis_size > MAX_UNROLLED_RUNS:
        return jax.vmap(plain, in_axes=tuple(0 if b else None for b in in_batched))(*args), True
    outs = [fn(*(a[r] if b else a for a, b in zip(args, in_batched, strict=True))) for r in range(axis_size)]
    return jnp.stack(outs), True


def _fold(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _unfold(y: jax.Array, runs: int) -> jax.Array:
    return y.reshape(runs, y.shape[0] // runs, *y.shape[1:])


@cache
def _ops(spec: _Spec) -> tuple[Callable, Callable, Callable]:
    """(forward, input gradient, kernel gradient) of one convolution spec, each with its vmap rule."""
    strides, padding, precision, kernel_grad, input_grad_mode, forward = spec

    def conv_plain(x, w):
        return _plain_conv(x, w, strides, padding, precision, forward)

    def input_grad_plain(x, w, dy):
        # x gives the shape only
        if input_grad_mode == "taps":
            return input_grad_taps(w, dy, x.shape, strides, padding, precision).astype(x.dtype)
        # the transpose of the (linear in x) convolution: XLA's own input gradient
        return jax.linear_transpose(lambda x_: conv_plain(x_, w), x)(dy)[0]

    def kernel_grad_plain(x, w, dy):
        if kernel_grad == "slices":
            return kernel_grad_slices(x, dy, w.shape[:2], strides, padding, precision).astype(w.dtype)
        return jax.linear_transpose(lambda w_: conv_plain(x, w_), w)(dy)[0]

    conv, input_grad, kernel_grad_op = (custom_vmap(f) for f in (conv_plain, input_grad_plain, kernel_grad_plain))

    @conv.def_vmap
    def _conv_rule(axis_size, in_batched, x, w):
        if not in_batched[1]:  # a shared kernel: the runs are just more images
            return _unfold(conv(_fold(x), w), axis_size), True
        return _per_run(conv, conv_plain, axis_size, in_batched, x, w)

    @input_grad.def_vmap
    def _input_grad_rule(axis_size, in_batched, x, w, dy):
        if not in_batched[1] and in_batched[0] and in_batched[2]:
            return _unfold(input_grad(_fold(x), w, _fold(dy)), axis_size), True
        return _per_run(input_grad, input_grad_plain, axis_size, in_batched, x, w, dy)

    @kernel_grad_op.def_vmap
    def _kernel_grad_rule(axis_size, in_batched, x, w, dy):
        return _per_run(kernel_grad_op, kernel_grad_plain, axis_size, in_batched, x, w, dy)

    return conv, input_grad, kernel_grad_op


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_custom(x: jax.Array, w: jax.Array, spec: _Spec) -> jax.Array:
    return _ops(spec)[0](x, w)


def _conv_custom_fwd(x, w, spec):
    return _ops(spec)[0](x, w), (x, w)


def _conv_custom_bwd(spec, res, dy):
    x, w = res
    _, input_grad, kernel_grad = _ops(spec)
    return input_grad(x, w, dy), kernel_grad(x, w, dy)


_conv_custom.defvjp(_conv_custom_fwd, _conv_custom_bwd)


def conv_slices(x: jax.Array, w: jax.Array, strides: Sequence[int], padding: Padding, precision: Any = None,
                kernel_grad: str = "slices", input_grad: str = "xla", forward: str = "xla") -> jax.Array:
    """NHWC/HWIO convolution (explicit padding, no dilation) with the custom gradient and vmap rules.

    ``kernel_grad``: ``slices`` (the tap sum, :func:`kernel_grad_slices`) or ``xla`` (XLA's own);
    ``input_grad``: ``xla`` (XLA's own) or ``taps`` (:func:`input_grad_taps`); ``forward``: ``xla``
    (XLA's convolution), ``patches`` (:func:`conv_patches`) or ``pairs`` (:func:`conv_pairs`), the
    ``xla`` gradients then being XLA's transposes of that form.
    """
    if kernel_grad not in KERNEL_GRADS:
        raise ValueError(f"kernel_grad must be one of {KERNEL_GRADS}, got {kernel_grad!r}")
    if input_grad not in INPUT_GRADS:
        raise ValueError(f"input_grad must be one of {INPUT_GRADS}, got {input_grad!r}")
    if forward not in FORWARDS:
        raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
    spec = _Spec(tuple(int(s) for s in strides), tuple((int(lo), int(hi)) for lo, hi in padding), precision,
                 kernel_grad, input_grad, forward)
    return _conv_custom(x, w, spec)


def slices_pay_off(kernel_shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether the tap sum beats XLA's CPU kernel gradient for this layer (the rule of the constants above)."""
    kh, kw, ci, co = kernel_shape
    return any(s != 1 for s in strides) or (kh, kw) == (1, 1) or ci * co >= MIN_SLICES_ENTRIES_STRIDE_1


def eigen_choices(input_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
                  padding: Padding) -> dict[str, str]:
    """How the ``eigen`` mode computes a convolution: ``forward``, the form (:func:`eigen_forward`);
    ``kernel_grad``, ``slices`` (the one-tap sum) for a 1×1 kernel, else XLA's transpose of the form
    (named by the form); ``input_grad``, ``taps`` (:func:`input_grad_taps`) for a strided convolution
    in XLA's form with at least :data:`MIN_TAPS_CI` input channels, else XLA's transpose of the form."""
    form = eigen_forward(input_shape, kernel_shape, strides, padding)
    kh, kw, ci, _ = kernel_shape
    strided = any(int(st) != 1 for st in strides)
    return {"forward": form, "kernel_grad": "slices" if (kh, kw) == (1, 1) else form,
            "input_grad": "taps" if form == "xla" and strided and ci >= MIN_TAPS_CI else form}


def _explicit_padding(padding: Any) -> Padding | None:
    if isinstance(padding, str) or len(padding) != 2:
        return None
    return tuple((int(lo), int(hi)) for lo, hi in padding)  # type: ignore[return-value]


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None, *,
                         only_where_faster: bool = False, eigen: bool = False) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` that uses :func:`conv_slices` where it applies.

    It applies to 4-D NHWC/HWIO convolutions with explicit padding, no dilation and one group;
    anything else goes to ``lax.conv_general_dilated`` unchanged. The kernel gradient is the tap
    sum, or with ``only_where_faster`` the tap sum for the layers of :func:`slices_pay_off` and
    XLA's own for the others (the custom vmap rule applies to all of them). With ``eigen`` (the
    ``eigen`` mode of :func:`conv_fn`) the form and the gradients are :func:`eigen_choices`'.
    """
    pad = _explicit_padding(padding)
    supported = (
        lhs.ndim == 4 and rhs.ndim == 4 and pad is not None
        and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and feature_group_count == 1 and batch_group_count == 1 and preferred_element_type is None
        and lhs.dtype == rhs.dtype
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, DIMENSION_NUMBERS)
    )
    if not supported:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count, precision,
                                        preferred_element_type)
    if eigen:
        chosen = eigen_choices(lhs.shape, rhs.shape, window_strides, pad)
        return conv_slices(lhs, rhs, window_strides, pad, precision,
                           kernel_grad="slices" if chosen["kernel_grad"] == "slices" else "xla",
                           input_grad="taps" if chosen["input_grad"] == "taps" else "xla", forward=chosen["forward"])
    kernel_grad = "slices" if not only_where_faster or slices_pay_off(rhs.shape, window_strides) else "xla"
    return conv_slices(lhs, rhs, window_strides, pad, precision, kernel_grad)


_conv_where_faster = partial(conv_general_dilated, only_where_faster=True)
_conv_eigen = partial(conv_general_dilated, eigen=True)


def conv_fn(conv_grad: str) -> Callable[..., jax.Array]:
    """The ``conv_general_dilated`` for a ``conv_grad`` setting: ``xla`` → ``lax.conv_general_dilated``;
    ``slices`` → the tap-sum kernel gradient for every supported convolution; ``eigen`` → XLA's
    kernel gradient and, for strided convolutions, the tap-sum input gradient; ``auto`` → on the CPU
    backend the tap sum where it pays off (:func:`slices_pay_off`) and XLA's kernel gradient
    elsewhere, both with the per-run vmap rule; on other backends ``lax.conv_general_dilated``."""
    mode = resolve_conv_grad(conv_grad)
    if mode == "xla":
        return lax.conv_general_dilated
    if mode == "eigen":
        return _conv_eigen
    return _conv_where_faster if conv_grad == "auto" else conv_general_dilated
