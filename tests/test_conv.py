"""lop_jax.conv: the tap-sum kernel gradient and input gradient against XLA's own, for every conv
shape the model uses.

Tolerances: forward outputs and input gradients are XLA's own ops, so they must match exactly.
Float32 kernel gradients differ from XLA's only in summation order: |Δ| ≤ 1e-5 × max|g_xla| and the
same against a float64 tap sum (observed ≤ 4e-7 here, 1-2e-6 at the width-64 shapes with batch 90).
The tap-sum input gradient (the ``eigen`` mode's, for strided layers) is held to the same float32
bound against XLA's input gradient and a float64 one, and so are the eigen mode's other forms of the
convolution (patches, pixel pairs): their outputs and both gradients, against XLA's and float64.
Bfloat16 kernel gradients (float32 accumulation, one rounding to bfloat16) must be within
1e-2 × max|g| of the float64 tap sum, like XLA's own. Whole-model parameter gradients at width 4:
≤ 1e-5 of each leaf's scale in float32 (observed 1e-6), ≤ 3e-2 in bfloat16 (observed 3e-3).
"""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lop_jax import conv as conv_mod
from lop_jax.conv import (
    conv_fn,
    conv_general_dilated,
    conv_pairs,
    conv_patches,
    conv_slices,
    eigen_forward,
    input_grad_taps,
    kernel_grad_slices,
    resolve_conv_grad,
)
from lop_jax.model import ResNet18, init_model

DN = ("NHWC", "HWIO", "NHWC")
P1 = ((1, 1), (1, 1))
P0 = ((0, 0), (0, 0))
F32_RTOL = 1e-5  # relative to the gradient's largest magnitude
BF16_RTOL = 1e-2

# (H=W, Ci, Co, kernel, stride, padding): the model's layer kinds at small width/size — stem (Ci 3), 3×3
# stride 1 and 2 (padding 1), 1×1 stride 2 (padding 0) — with Ci below and above conv.MIN_TRANSPOSED_CI
# (both matmul layouts) and odd sizes for the strided ones.
CASES = [
    (8, 3, 4, 3, 1, P1),
    (8, 4, 4, 3, 1, P1),
    (8, 4, 8, 3, 2, P1),
    (8, 4, 8, 1, 2, P0),
    (4, 8, 8, 3, 1, P1),
    (4, 8, 16, 3, 2, P1),
    (4, 8, 16, 1, 2, P0),
    (2, 16, 16, 3, 1, P1),
    (7, 5, 6, 3, 2, P1),
    (7, 8, 6, 1, 2, P0),
    (5, 8, 8, 1, 1, P0),
]
BATCH = 3


def _ids(case):
    h, ci, co, k, s, _ = case
    return f"{h}x{h}-{ci}to{co}-k{k}-s{s}"


def _data(case, dtype=jnp.float32, runs=None, seed=0):
    h, ci, co, k, s, pad = case
    rng = np.random.default_rng(seed)
    lead = (runs,) if runs else ()
    x = rng.normal(size=(*lead, BATCH, h, h, ci))
    w = rng.normal(size=(*lead, k, k, ci, co)) / math.sqrt(k * k * ci)
    ho = (h + sum(pad[0]) - k) // s + 1
    dy = rng.normal(size=(*lead, BATCH, ho, ho, co))
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(dy, dtype)


def _taps_conv(x, w, s, pad):
    return conv_slices(x, w, (s, s), pad, kernel_grad="xla", input_grad="taps")


def _xla_conv(x, w, s, pad):
    return lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=DN)


def _vjps(fn, x, w, dy):
    y, vjp = jax.vjp(fn, x, w)
    return (y, *vjp(dy))


def _kernel_grad_f64(x, dy, k, s, pad):
    """The kernel gradient in float64 numpy, tap by tap."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    xp = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
    ho, wo = dy.shape[1:3]
    g = np.zeros((k, k, x.shape[-1], dy.shape[-1]))
    for i in range(k):
        for j in range(k):
            tap = xp[:, i:i + (ho - 1) * s + 1:s, j:j + (wo - 1) * s + 1:s]
            g[i, j] = np.einsum("bhwc,bhwo->co", tap, dy)
    return g


def _assert_close_rel(got, want, rtol, msg=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, msg
    scale = np.abs(want).max()
    err = np.abs(got - want).max()
    assert err <= rtol * scale, f"{msg}: max|Δ| {err:.3g} > {rtol} × {scale:.3g}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_and_gradients_match_xla(case):
    _, _, _, k, s, pad = case
    x, w, dy = _data(case)
    ours = jax.jit(lambda x, w, dy: _vjps(lambda a, b: conv_slices(a, b, (s, s), pad), x, w, dy))(x, w, dy)
    xla = jax.jit(lambda x, w, dy: _vjps(lambda a, b: _xla_conv(a, b, s, pad), x, w, dy))(x, w, dy)
    np.testing.assert_array_equal(ours[0], xla[0])  # forward: the same XLA op
    np.testing.assert_array_equal(ours[1], xla[1])  # input gradient: XLA's own
    assert ours[2].dtype == xla[2].dtype == jnp.float32
    _assert_close_rel(ours[2], xla[2], F32_RTOL, "kernel gradient vs XLA")
    _assert_close_rel(ours[2], _kernel_grad_f64(x, dy, k, s, pad), F32_RTOL, "kernel gradient vs float64")


def _input_grad_f64(w, dy, x_shape, s, pad):
    """The input gradient in float64 numpy, tap by tap (each tap's product added where it read)."""
    w = np.asarray(w, np.float64)
    dy = np.asarray(dy, np.float64)
    b, h, wd, ci = x_shape
    k, ho, wo = w.shape[0], dy.shape[1], dy.shape[2]
    gp = np.zeros((b, h + sum(pad[0]), wd + sum(pad[1]), ci))
    for i in range(k):
        for j in range(k):
            gp[:, i:i + (ho - 1) * s + 1:s, j:j + (wo - 1) * s + 1:s] += np.einsum("bhwo,co->bhwc", dy, w[i, j])
    return gp[:, pad[0][0]:pad[0][0] + h, pad[1][0]:pad[1][0] + wd]


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_input_grad_taps_matches_xla(case):
    _, _, _, _, s, pad = case
    x, w, dy = _data(case)
    ours = jax.jit(lambda x, w, dy: _vjps(lambda a, b: _taps_conv(a, b, s, pad), x, w, dy))
    xla = jax.jit(lambda x, w, dy: _vjps(lambda a, b: _xla_conv(a, b, s, pad), x, w, dy))
    (y, gx, gw), (y_x, gx_x, gw_x) = ours(x, w, dy), xla(x, w, dy)
    np.testing.assert_array_equal(y, y_x)
    np.testing.assert_array_equal(gw, gw_x)  # the kernel gradient is XLA's own
    assert gx.dtype == jnp.float32 and gx.shape == x.shape
    _assert_close_rel(gx, gx_x, F32_RTOL, "input gradient vs XLA")
    _assert_close_rel(gx, _input_grad_f64(w, dy, x.shape, s, pad), F32_RTOL, "input gradient vs float64")
    direct = input_grad_taps(w, dy, x.shape, (s, s), pad)
    np.testing.assert_array_equal(direct, gx)
    with pytest.raises(ValueError, match="input_grad"):
        conv_slices(x, w, (s, s), pad, input_grad="winograd")


@pytest.mark.parametrize("case", [CASES[2], CASES[8]], ids=_ids)
def test_input_grad_taps_under_vmap_with_batched_params(case):
    _, _, _, _, s, pad = case
    xs, ws, dys = _data(case, runs=2)
    fn = jax.vmap(lambda x, w, dy: _vjps(lambda a, b: _taps_conv(a, b, s, pad), x, w, dy))
    batched = jax.jit(fn)(xs, ws, dys)
    for r in range(2):
        one = jax.jit(lambda x, w, dy: _vjps(lambda a, b: _taps_conv(a, b, s, pad), x, w, dy))(
            xs[r], ws[r], dys[r])
        for got, want in zip(batched, one, strict=True):
            np.testing.assert_array_equal(got[r], want)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[4]], ids=_ids)
def test_xla_kernel_grad_option_is_xla_exactly(case):
    """kernel_grad="xla" (what "auto" keeps for small stride-1 layers) gives XLA's own gradients."""
    _, _, _, _, s, pad = case
    x, w, dy = _data(case)
    ours = jax.jit(lambda x, w, dy: _vjps(lambda a, b: conv_slices(a, b, (s, s), pad, kernel_grad="xla"), x, w, dy))
    xla = jax.jit(lambda x, w, dy: _vjps(lambda a, b: _xla_conv(a, b, s, pad), x, w, dy))
    for got, want in zip(ours(x, w, dy), xla(x, w, dy), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="kernel_grad"):
        conv_slices(x, w, (s, s), pad, kernel_grad="cudnn")


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3], CASES[6]], ids=_ids)
def test_grad_of_a_scalar_loss_under_jit(case):
    _, _, _, _, s, pad = case
    x, w, _ = _data(case)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.tanh(conv(x, w)) ** 2)

    ours = jax.jit(jax.grad(loss(lambda a, b: conv_slices(a, b, (s, s), pad)), argnums=(0, 1)))(x, w)
    xla = jax.jit(jax.grad(loss(lambda a, b: _xla_conv(a, b, s, pad)), argnums=(0, 1)))(x, w)
    np.testing.assert_array_equal(ours[0], xla[0])
    _assert_close_rel(ours[1], xla[1], F32_RTOL)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[5]], ids=_ids)
def test_vmap_with_batched_params(case):
    """vmap over a run axis with a kernel per run (as the multi-run training loop does): one plain
    convolution per run, so forward and input gradient equal the unbatched XLA ops run by run."""
    _, _, _, k, s, pad = case
    runs = 3
    xs, ws, dys = _data(case, runs=runs)
    ours = jax.jit(jax.vmap(lambda x, w, dy: _vjps(lambda a, b: conv_slices(a, b, (s, s), pad), x, w, dy)))(xs, ws, dys)
    xla_vmapped = jax.jit(jax.vmap(lambda x, w, dy: _vjps(lambda a, b: _xla_conv(a, b, s, pad), x, w, dy)))(xs, ws, dys)
    per_run = jax.jit(lambda x, w, dy: _vjps(lambda a, b: _xla_conv(a, b, s, pad), x, w, dy))
    for r in range(runs):
        want = per_run(xs[r], ws[r], dys[r])
        np.testing.assert_array_equal(ours[0][r], want[0])
        np.testing.assert_array_equal(ours[1][r], want[1])
        _assert_close_rel(ours[2][r], want[2], F32_RTOL, f"run {r} vs XLA")
        _assert_close_rel(ours[2][r], _kernel_grad_f64(xs[r], dys[r], k, s, pad), F32_RTOL, f"run {r} vs float64")
        for i in range(3):  # XLA's own batching (grouped convolutions) agrees up to rounding
            _assert_close_rel(ours[i][r], xla_vmapped[i][r], F32_RTOL, f"run {r}, output {i} vs XLA's vmap")

    # one shared kernel, batched inputs (the runs are folded into the batch): per-run kernel gradients
    def vjps_shared(x, dy):
        return _vjps(lambda a, b: conv_slices(a, b, (s, s), pad), x, ws[0], dy)

    shared = jax.jit(jax.vmap(vjps_shared))(xs, dys)
    for r in range(runs):
        want = per_run(xs[r], ws[0], dys[r])
        _assert_close_rel(shared[0][r], want[0], F32_RTOL, f"shared kernel, run {r}, forward")
        _assert_close_rel(shared[1][r], want[1], F32_RTOL, f"shared kernel, run {r}, input gradient")
        _assert_close_rel(shared[2][r], _kernel_grad_f64(xs[r], dys[r], k, s, pad), F32_RTOL, f"shared kernel, run {r}")


def test_vmap_nested_and_over_the_unroll_cap(monkeypatch):
    case = CASES[2]
    _, _, _, k, s, pad = case
    xs, ws, dys = _data(case, runs=2)
    xs2, ws2, dys2 = (jnp.stack([a, a[::-1]]) for a in (xs, ws, dys))  # [2, 2, ...]

    def vjps(x, w, dy):
        return _vjps(lambda a, b: conv_slices(a, b, (s, s), pad), x, w, dy)

    nested = jax.jit(jax.vmap(jax.vmap(vjps)))(xs2, ws2, dys2)
    monkeypatch.setattr(conv_mod, "MAX_UNROLLED_RUNS", 1)  # past the cap: XLA's own batching of the plain ops
    capped = jax.jit(jax.vmap(vjps))(xs, ws, dys)
    for r in range(2):
        want = jax.jit(vjps)(xs[r], ws[r], dys[r])
        for i in range(3):
            _assert_close_rel(nested[i][0, r], want[i], F32_RTOL, f"nested, output {i}")
            _assert_close_rel(nested[i][1, 1 - r], want[i], F32_RTOL, f"nested, output {i}")
            _assert_close_rel(capped[i][r], want[i], F32_RTOL, f"capped, output {i}")


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[4]], ids=_ids)
def test_bfloat16(case):
    _, _, _, k, s, pad = case
    x, w, dy = _data(case, jnp.bfloat16)
    ours = jax.jit(lambda x, w, dy: _vjps(lambda a, b: conv_slices(a, b, (s, s), pad), x, w, dy))(x, w, dy)
    xla = jax.jit(lambda x, w, dy: _vjps(lambda a, b: _xla_conv(a, b, s, pad), x, w, dy))(x, w, dy)
    assert [o.dtype for o in ours] == [o.dtype for o in xla] == [jnp.bfloat16] * 3
    np.testing.assert_array_equal(np.asarray(ours[0], np.float32), np.asarray(xla[0], np.float32))
    np.testing.assert_array_equal(np.asarray(ours[1], np.float32), np.asarray(xla[1], np.float32))
    want = _kernel_grad_f64(np.asarray(x, np.float32), np.asarray(dy, np.float32), k, s, pad)
    _assert_close_rel(np.asarray(ours[2], np.float32), want, BF16_RTOL, "bf16 kernel gradient")
    _assert_close_rel(np.asarray(xla[2], np.float32), want, BF16_RTOL, "XLA's bf16 kernel gradient")


def test_kernel_grad_slices_directly():
    case = CASES[5]
    _, _, _, k, s, pad = case
    x, w, dy = _data(case)
    g = kernel_grad_slices(x, dy, w.shape, (s, s), pad)
    assert g.shape == w.shape and g.dtype == jnp.float32
    _assert_close_rel(g, _kernel_grad_f64(x, dy, k, s, pad), F32_RTOL)


def test_drop_in_falls_back_where_unsupported():
    x, w, _ = _data(CASES[1])
    dn = lax.conv_dimension_numbers(x.shape, w.shape, DN)
    # what flax.linen.Conv passes: ConvDimensionNumbers, explicit padding, no dilation
    got = conv_general_dilated(x, w, (1, 1), P1, (1, 1), (1, 1), dn, precision=None)
    np.testing.assert_array_equal(got, _xla_conv(x, w, 1, P1))
    for kwargs in ({"padding": "SAME"}, {"padding": P1, "rhs_dilation": (2, 2)}):
        args = dict(window_strides=(1, 1), dimension_numbers=dn) | kwargs
        f = jax.jit(jax.grad(lambda w, kw=args: jnp.sum(conv_general_dilated(x, w, **kw) ** 2)))
        g = jax.jit(jax.grad(lambda w, kw=args: jnp.sum(lax.conv_general_dilated(x, w, **kw) ** 2)))
        np.testing.assert_array_equal(f(w), g(w))


def test_conv_fn_and_mode_resolution():
    assert jax.default_backend() == "cpu"
    assert resolve_conv_grad("auto") == "slices" and resolve_conv_grad("xla") == "xla"
    assert conv_fn("xla") is lax.conv_general_dilated
    assert conv_fn("slices") is conv_general_dilated
    assert conv_fn("auto") is not lax.conv_general_dilated
    with pytest.raises(ValueError, match="conv_grad"):
        conv_fn("cudnn")
    # "auto" keeps XLA's kernel gradient only for small stride-1 layers
    assert not conv_mod.slices_pay_off((3, 3, 16, 16), (1, 1))
    assert conv_mod.slices_pay_off((3, 3, 64, 64), (1, 1))
    assert conv_mod.slices_pay_off((3, 3, 8, 16), (2, 2)) and conv_mod.slices_pay_off((1, 1, 8, 16), (2, 2))
    assert resolve_conv_grad("eigen") == "eigen"


@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[7], CASES[10], (4, 16, 8, 3, 2, P1)], ids=_ids)
def test_eigen_mode(case):
    """``eigen``, where it keeps XLA's convolution: XLA's forward; XLA's kernel gradient, the tap sum
    for 1×1 kernels; XLA's input gradient, the tap sum at stride 2 from 16 input channels on."""
    _, ci, _, k, s, pad = case
    x, w, dy = _data(case)
    assert eigen_forward(x.shape, w.shape, (s, s), pad) == "xla"
    eigen = conv_fn("eigen")
    ours = jax.jit(lambda x, w, dy: _vjps(lambda a, b: eigen(a, b, (s, s), pad, dimension_numbers=DN), x, w, dy))
    xla = jax.jit(lambda x, w, dy: _vjps(lambda a, b: _xla_conv(a, b, s, pad), x, w, dy))
    (y, gx, gw), (y_x, gx_x, gw_x) = ours(x, w, dy), xla(x, w, dy)
    np.testing.assert_array_equal(y, y_x)
    if k == 1:
        np.testing.assert_array_equal(gw, kernel_grad_slices(x, dy, (k, k), (s, s), pad))
        _assert_close_rel(gw, gw_x, F32_RTOL, "1×1 kernel gradient vs XLA")
    else:
        np.testing.assert_array_equal(gw, gw_x)
    if s != 1 and ci >= conv_mod.MIN_TAPS_CI:
        np.testing.assert_array_equal(gx, input_grad_taps(w, dy, x.shape, (s, s), pad))
        _assert_close_rel(gx, gx_x, F32_RTOL, "strided input gradient vs XLA")
    else:
        np.testing.assert_array_equal(gx, gx_x)


# ---------------------------------------------------------------------------------------------
# the whole network at width 4


def _model_grads(conv_grad, dtype=jnp.float32, width=4):
    model = ResNet18(width=width, dtype=dtype, conv_grad=conv_grad)
    params, batch_stats = jax.jit(init_model, static_argnums=0)(ResNet18(width=width), jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(6, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 100, size=6))

    @jax.jit
    def grads(params):
        def loss(p):
            logits, _ = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))
        return jax.value_and_grad(loss)(params)

    return params, grads(params)


@pytest.fixture(scope="module")
def model_grads_f32():
    return {mode: _model_grads(mode) for mode in ("xla", "slices", "auto", "eigen")}


def test_parameter_tree_is_unchanged_by_conv_grad(model_grads_f32):
    for mode in ("slices", "auto"):
        for k in ("stem_conv", "fc"):
            model = ResNet18(width=4, conv_grad=mode)
            params = jax.eval_shape(lambda m=model: init_model(m, jax.random.PRNGKey(0)))[0]
            assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(model_grads_f32["xla"][0])
            assert params[k]["kernel"].shape == model_grads_f32["xla"][0][k]["kernel"].shape
    # same init values whatever the mode
    a = jax.jit(init_model, static_argnums=0)(ResNet18(width=4, conv_grad="slices"), jax.random.PRNGKey(0))
    b = jax.jit(init_model, static_argnums=0)(ResNet18(width=4, conv_grad="xla"), jax.random.PRNGKey(0))
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, a, b)))


@pytest.mark.parametrize("mode", ["slices", "auto", "eigen"])
def test_model_parameter_gradients_match_xla(model_grads_f32, mode):
    (loss_x, g_x), (loss_s, g_s) = model_grads_f32["xla"][1], model_grads_f32[mode][1]
    if mode == "eigen":  # the stem and the narrow layers in other forms: float32 rounding
        assert float(loss_s) == pytest.approx(float(loss_x), rel=1e-6)
    else:
        assert loss_s == loss_x  # the forward pass is the same
    flat_x, flat_s = flax.traverse_util.flatten_dict(g_x), flax.traverse_util.flatten_dict(g_s)
    assert flat_x.keys() == flat_s.keys()
    for path in flat_x:
        assert flat_s[path].dtype == flat_x[path].dtype == jnp.float32
        if mode == "eigen" and path[-1] == "bias" and "conv" in path[-2]:
            # a conv bias feeding a BatchNorm has a zero gradient: what both give is rounding noise
            # (observed ~3e-7), so it is held to the scale of its layer's kernel gradient instead
            kernel = np.abs(np.asarray(flat_x[(*path[:-1], "kernel")])).max()
            assert np.abs(np.asarray(flat_s[path]) - np.asarray(flat_x[path])).max() <= 1e-5 * kernel, path
            continue
        # the gradients' rounding differences propagate through the network (observed ≤ 1e-6)
        _assert_close_rel(flat_s[path], flat_x[path], 1e-5, str(path))


def test_model_bfloat16_gradients():
    params, (loss_x, g_x) = _model_grads("xla", jnp.bfloat16)
    _, (loss_s, g_s) = _model_grads("slices", jnp.bfloat16)
    assert loss_s == loss_x
    flat_x, flat_s = flax.traverse_util.flatten_dict(g_x), flax.traverse_util.flatten_dict(g_s)
    for path in flat_x:
        assert flat_s[path].dtype == flat_x[path].dtype == jnp.float32  # float32 params → float32 grads
        # bf16 activations: both are bf16-rounded estimates of the same gradient (observed ≤ 3e-3)
        _assert_close_rel(flat_s[path], flat_x[path], 3e-2, str(path))


def test_eigen_forms_by_layer():
    """Which form the eigen mode computes each of the network's convolutions in: the stem over its
    patches, the narrow 3×3 stride-1 layers over pixel pairs, everything else XLA's convolution."""
    assert eigen_forward((50, 32, 32, 3), (3, 3, 3, 8), (1, 1), P1) == "patches"
    assert eigen_forward((90, 32, 32, 3), (3, 3, 3, 64), (1, 1), P1) == "patches"
    assert eigen_forward((50, 32, 32, 8), (3, 3, 8, 8), (1, 1), P1) == "pairs"
    assert eigen_forward((50, 16, 16, 16), (3, 3, 16, 16), (1, 1), P1) == "xla"  # wider: XLA's is faster
    assert eigen_forward((50, 32, 31, 8), (3, 3, 8, 8), (1, 1), P1) == "xla"  # odd width: no pairs
    assert eigen_forward((50, 32, 32, 8), (3, 3, 8, 16), (2, 2), P1) == "xla"
    assert eigen_forward((50, 32, 32, 8), (1, 1, 8, 16), (2, 2), P0) == "xla"
    assert eigen_forward((50, 32, 32, 3), (1, 1, 3, 8), (1, 1), P0) == "xla"  # 1×1: no patches


# (case, form): every form on stride 1 and, for the patches, stride 2 and an odd size
FORM_CASES = [(CASES[0], "patches"), ((7, 3, 5, 3, 2, P1), "patches"), ((8, 2, 8, 3, 1, P1), "patches"),
              (CASES[0], "pairs"), (CASES[1], "pairs"), ((6, 8, 8, 3, 1, P1), "pairs"), (CASES[4], "pairs")]


def _form_ids(case_form):
    return f"{_ids(case_form[0])}-{case_form[1]}"


@pytest.mark.parametrize("case_form", FORM_CASES, ids=_form_ids)
def test_eigen_forms_match_xla(case_form):
    """The forms compute XLA's convolution and its gradients within float32 rounding (as
    ``conv_slices(forward=...)``, the eigen mode's op, and directly)."""
    case, form = case_form
    _, _, _, k, s, pad = case
    x, w, dy = _data(case)
    ours = jax.jit(lambda x, w, dy: _vjps(lambda a, b: conv_slices(a, b, (s, s), pad, kernel_grad="xla",
                                                                   forward=form), x, w, dy))(x, w, dy)
    xla = jax.jit(lambda x, w, dy: _vjps(lambda a, b: _xla_conv(a, b, s, pad), x, w, dy))(x, w, dy)
    direct = conv_patches(x, w, (s, s), pad) if form == "patches" else conv_pairs(x, w, pad)
    np.testing.assert_array_equal(direct, ours[0])
    for got, want, name in zip(ours, xla, ("output", "input gradient", "kernel gradient"), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        _assert_close_rel(got, want, F32_RTOL, f"{name} vs XLA")
    _assert_close_rel(ours[1], _input_grad_f64(w, dy, x.shape, s, pad), F32_RTOL, "input gradient vs float64")
    _assert_close_rel(ours[2], _kernel_grad_f64(x, dy, k, s, pad), F32_RTOL, "kernel gradient vs float64")
    with pytest.raises(ValueError, match="forward"):
        conv_slices(x, w, (s, s), pad, forward="winograd")


def test_eigen_mode_takes_its_forms_under_vmap_with_batched_params():
    """The eigen mode on a stem and a narrow layer, vmapped over runs with a kernel each (the
    multi-run loop): run by run the unbatched form's output and gradients, bit for bit."""
    eigen = conv_fn("eigen")
    for case in (CASES[0], CASES[1]):
        _, _, _, _, s, pad = case
        xs, ws, dys = _data(case, runs=2)
        form = eigen_forward(xs.shape[1:], ws.shape[1:], (s, s), pad)
        assert form in ("patches", "pairs")

        def vjps(x, w, dy, s=s, pad=pad):
            return _vjps(lambda a, b: eigen(a, b, (s, s), pad, dimension_numbers=DN), x, w, dy)

        batched = jax.jit(jax.vmap(vjps))(xs, ws, dys)
        for r in range(2):
            one = jax.jit(vjps)(xs[r], ws[r], dys[r])
            np.testing.assert_array_equal(one[0], conv_slices(xs[r], ws[r], (s, s), pad, kernel_grad="xla",
                                                              forward=form))
            for got, want in zip(batched, one, strict=True):
                np.testing.assert_array_equal(got[r], want)


def test_pairs_refuse_what_they_cannot_compute():
    x, w, _ = _data(CASES[1])
    with pytest.raises(ValueError, match="even image width"):
        conv_pairs(x[:, :, :7], w, P1)
    with pytest.raises(ValueError, match="width padding"):
        conv_pairs(x, w, ((1, 1), (0, 2)))
