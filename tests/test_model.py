"""ResNet-18, CIFAR variant (semantics §3, §7): shapes, parameter count, init law, padding, BatchNorm, feature maps."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lop_jax import model as model_mod
from lop_jax.model import BatchNorm, ResNet18, count_params, feature_layers, init_model

W = 2  # width of the small networks run here


def expected_param_shapes(w):
    """Every parameter of the reference network, by path, with Flax layouts (HWIO convs, (in, out) Linear)."""
    shapes = {("stem_conv", "kernel"): (3, 3, 3, w), ("stem_conv", "bias"): (w,),
              ("stem_bn", "scale"): (w,), ("stem_bn", "bias"): (w,)}
    c_in = w
    for b in range(8):
        c = w * 2 ** (b // 2)
        blk = f"block{b}"
        shapes.update({(blk, "conv1", "kernel"): (3, 3, c_in, c), (blk, "conv1", "bias"): (c,),
                       (blk, "bn1", "scale"): (c,), (blk, "bn1", "bias"): (c,),
                       (blk, "conv2", "kernel"): (3, 3, c, c), (blk, "conv2", "bias"): (c,),
                       (blk, "bn2", "scale"): (c,), (blk, "bn2", "bias"): (c,)})
        if b in (2, 4, 6):
            shapes.update({(blk, "shortcut_conv", "kernel"): (1, 1, c_in, c), (blk, "shortcut_conv", "bias"): (c,),
                           (blk, "shortcut_bn", "scale"): (c,), (blk, "shortcut_bn", "bias"): (c,)})
        c_in = c
    shapes.update({("fc", "kernel"): (8 * w, 100), ("fc", "bias"): (100,)})
    return shapes


def _flat_shapes(tree):
    return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(tree).items()}


# one compiled init per width (eager Flax init dispatches op by op and is slow on the CPU)
jit_init = jax.jit(init_model, static_argnums=0)


def _abstract_init(w):
    return jax.eval_shape(lambda: init_model(ResNet18(width=w), jax.random.PRNGKey(0)))


# ---------------------------------------------------------------------------------------------
# parameter count and shapes


def test_parameter_count_at_width_64():
    params, batch_stats = _abstract_init(64)
    assert count_params(params) == 11_224_932
    assert sum(math.prod(s) for s in expected_param_shapes(64).values()) == 11_224_932
    # running statistics are state, not parameters: 2 × (all BN channels)
    bn_channels = sum(s[0] for k, s in expected_param_shapes(64).items() if "bn" in k[-2] and k[-1] == "scale")
    assert sum(x.size for x in jax.tree_util.tree_leaves(batch_stats)) == 2 * bn_channels


@pytest.mark.parametrize("w", [64, W])
def test_every_layer_shape(w):
    params, batch_stats = _abstract_init(w)
    assert _flat_shapes(params) == expected_param_shapes(w)
    want_stats = {k[:-1] + (s,): shape for k, shape in expected_param_shapes(w).items()
                  if "bn" in k[-2] and k[-1] == "scale" for s in ("mean", "var")}
    assert _flat_shapes(batch_stats) == want_stats
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves((params, batch_stats)))


# ---------------------------------------------------------------------------------------------
# initialisation law at width 64


@pytest.fixture(scope="module")
def init64():
    params, batch_stats = jit_init(ResNet18(width=64), jax.random.PRNGKey(0))
    return flax.traverse_util.flatten_dict(jax.device_get(params)), jax.device_get(batch_stats)


def test_conv_init_is_kaiming_normal_fan_in(init64):
    flat, _ = init64
    kernels = {k: np.asarray(v, np.float64) for k, v in flat.items() if k[-1] == "kernel" and k[0] != "fc"}
    assert len(kernels) == 1 + 16 + 3
    for path, k in kernels.items():
        kh, kw, c_in, _ = k.shape
        target = math.sqrt(2.0 / (c_in * kh * kw))
        n = k.size
        # sampling error of the std is ≈ 1/√(2n): 1.7 % for the stem, < 0.6 % elsewhere
        tol = max(0.03, 6 / math.sqrt(2 * n))
        assert abs(k.std() / target - 1) < tol, (path, k.std(), target)
        assert abs(k.mean()) < 6 * target / math.sqrt(n), path
        if n >= 100_000:
            # a normal, not truncated nor uniform: ≈ 4.55 % beyond 2σ and some beyond 3.5σ
            beyond2 = np.mean(np.abs(k) > 2 * target)
            assert 0.040 < beyond2 < 0.051, (path, beyond2)
            assert np.mean(np.abs(k) > 3.5 * target) > 1e-4, path


def test_linear_init_and_zero_biases_and_bn_identity(init64):
    flat, batch_stats = init64
    fc = np.asarray(flat[("fc", "kernel")], np.float64)
    target = math.sqrt(1.0 / 512)
    assert abs(fc.std() / target - 1) < 0.03
    assert 0.040 < np.mean(np.abs(fc) > 2 * target) < 0.051
    for path, v in flat.items():
        if path[-1] == "bias":
            np.testing.assert_array_equal(v, 0.0, err_msg=str(path))
        if path[-1] == "scale":
            np.testing.assert_array_equal(v, 1.0, err_msg=str(path))
    for path, v in flax.traverse_util.flatten_dict(batch_stats).items():
        np.testing.assert_array_equal(v, 0.0 if path[-1] == "mean" else 1.0, err_msg=str(path))
    # layers are drawn independently
    assert not np.allclose(flat[("block0", "conv1", "kernel")], flat[("block0", "conv2", "kernel")])


def test_init_depends_on_key_only(init64):
    flat, _ = init64
    again = flax.traverse_util.flatten_dict(jit_init(ResNet18(width=64), jax.random.PRNGKey(0))[0])
    other = flax.traverse_util.flatten_dict(jit_init(ResNet18(width=64), jax.random.PRNGKey(1))[0])
    for path in (("stem_conv", "kernel"), ("block7", "conv2", "kernel"), ("fc", "kernel")):
        np.testing.assert_array_equal(again[path], flat[path])
        assert not np.allclose(other[path], flat[path])


# ---------------------------------------------------------------------------------------------
# torch-style padding at stride 2


def _torch_conv(x, k, b, stride, pad):
    """x [H, W, Ci], k [kh, kw, Ci, Co]: PyTorch Conv2d (cross-correlation, zero padding on every side)."""
    xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    kh, kw = k.shape[:2]
    ho = (xp.shape[0] - kh) // stride + 1
    wo = (xp.shape[1] - kw) // stride + 1
    out = np.zeros((ho, wo, k.shape[3]))
    for i in range(ho):
        for j in range(wo):
            win = xp[i * stride:i * stride + kh, j * stride:j * stride + kw]
            out[i, j] = np.tensordot(win, k, axes=3) + b
    return out


def test_stride_2_padding_hand_computed():
    x = np.arange(1, 17, dtype=np.float32).reshape(4, 4)
    k = np.arange(1, 10, dtype=np.float32).reshape(3, 3)
    # PyTorch pads one zero row/column on EVERY side: the 6×6 padded input, windows at rows/cols 0 and 2
    xp = np.zeros((6, 6), np.float32)
    xp[1:5, 1:5] = x
    want = np.array([[np.sum(xp[r:r + 3, c:c + 3] * k) for c in (0, 2)] for r in (0, 2)]) + 0.5
    assert want[0, 0] == 1 * 5 + 2 * 6 + 5 * 8 + 6 * 9 + 0.5  # 111.5: the top-left window sees the zero border
    conv = model_mod._conv(1, 3, 2, "c", jnp.float32)
    got = conv.apply({"params": {"kernel": k[:, :, None, None], "bias": np.array([0.5], np.float32)}},
                     x[None, :, :, None])
    np.testing.assert_allclose(np.asarray(got)[0, :, :, 0], want, rtol=1e-6)
    # 'SAME' (pads 0 before, 1 after at stride 2) would give a different answer
    same = np.array([[np.sum(np.pad(x, ((0, 1), (0, 1)))[r:r + 3, c:c + 3] * k) for c in (0, 2)]
                     for r in (0, 2)]) + 0.5
    assert not np.allclose(same, want)


# ---------------------------------------------------------------------------------------------
# the whole network at width 2, one traced forward pass with every submodule's output captured


@pytest.fixture(scope="module")
def small_net():
    net = ResNet18(width=W)
    # parameters drawn here (the init law is tested above), with non-trivial biases, BN parameters and
    # running statistics so that their roles are visible; no compiled init needed at this width
    rng = np.random.default_rng(0)
    params, batch_stats = {}, {}
    for path, shape in expected_param_shapes(W).items():
        if path[-1] == "kernel":
            value = rng.normal(size=shape) * math.sqrt(2.0 / math.prod(shape[:-1]))
        elif path[-1] == "scale":
            value = 1 + 0.1 * rng.normal(size=shape)
            batch_stats[path[:-1] + ("mean",)] = 0.2 * rng.normal(size=shape).astype(np.float32)
            batch_stats[path[:-1] + ("var",)] = (1 + 0.2 * np.abs(rng.normal(size=shape))).astype(np.float32)
        else:
            value = 0.1 * rng.normal(size=shape)
        params[path] = value.astype(np.float32)
    params = flax.traverse_util.unflatten_dict(params)
    batch_stats = flax.traverse_util.unflatten_dict(batch_stats)
    x = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)

    @jax.jit
    def forward(params, batch_stats, x):
        variables = {"params": params, "batch_stats": batch_stats}
        train_out, train_vars = net.apply(variables, x, train=True, return_features=True,
                                          capture_intermediates=True, mutable=["batch_stats", "intermediates"])
        eval_out, eval_vars = net.apply(variables, x, train=False, return_features=True,
                                        capture_intermediates=True, mutable=["batch_stats", "intermediates"])
        plain = net.apply(variables, x, train=False)
        return train_out, train_vars, eval_out, eval_vars, plain

    out = jax.device_get(forward(params, batch_stats, x))
    return {"params": jax.device_get(params), "batch_stats": jax.device_get(batch_stats), "x": x,
            "train": out[0], "train_vars": out[1], "eval": out[2], "eval_vars": out[3], "plain": out[4]}


def _captured(vars_, *path):
    node = vars_["intermediates"]
    for p in path:
        node = node[p]
    return node["__call__"][0]


def test_strided_convs_in_the_network_use_torch_padding(small_net):
    p, iv = small_net["params"], small_net["train_vars"]
    for b in (2, 4, 6):
        block_in = np.asarray(_captured(iv, f"block{b - 1}")[0])  # output of the previous block
        for name, stride, pad in (("conv1", 2, 1), ("shortcut_conv", 2, 0)):
            got = np.asarray(_captured(iv, f"block{b}", name))
            kernel, bias = p[f"block{b}"][name]["kernel"], p[f"block{b}"][name]["bias"]
            for i in range(2):
                want = _torch_conv(block_in[i], kernel, bias, stride, pad)
                np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-5, err_msg=f"block{b}.{name}")
    stem = np.asarray(_captured(iv, "stem_conv"))
    want = _torch_conv(small_net["x"][0], p["stem_conv"]["kernel"], p["stem_conv"]["bias"], 1, 1)
    np.testing.assert_allclose(stem[0], want, rtol=1e-4, atol=1e-5)


def test_output_shapes_and_eval_matches_plain_call(small_net):
    logits = small_net["eval"][0]
    assert logits.shape == (4, 100) and logits.dtype == np.float32
    np.testing.assert_array_equal(logits, small_net["plain"])


def test_network_batchnorm_running_stats_update_in_train_mode_only(small_net):
    stem = np.asarray(_captured(small_net["train_vars"], "stem_conv"), np.float64)
    n = stem.shape[0] * stem.shape[1] * stem.shape[2]
    old = small_net["batch_stats"]["stem_bn"]
    new = small_net["train_vars"]["batch_stats"]["stem_bn"]
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    unbiased = stem.var(axis=(0, 1, 2)) * n / (n - 1)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * unbiased, rtol=1e-4, atol=1e-6)
    # evaluation mode leaves the running statistics alone
    same = jax.tree_util.tree_map(np.array_equal, small_net["eval_vars"]["batch_stats"], small_net["batch_stats"])
    assert all(jax.tree_util.tree_leaves(same))


def test_seventeen_feature_maps(small_net):
    p = small_net["params"]
    for mode in ("train", "eval"):
        logits, feats = small_net[mode]
        iv = small_net[f"{mode}_vars"]
        assert len(feats) == 17
        widths = [W] + [W * 2 ** (b // 2) for b in range(8) for _ in (0, 1)]
        assert [f.shape[-1] for f in feats] == widths
        assert feats[0].shape == (4, 8, 8, W)
        assert feats[16].shape == (4, 8 * W)
        for b in range(8):
            out, mid = _captured(iv, f"block{b}")
            np.testing.assert_array_equal(feats[1 + 2 * b], mid)
            if b < 7:
                np.testing.assert_array_equal(feats[2 + 2 * b], out)
        # the last feature is the globally pooled output of the last block, and it feeds the head
        np.testing.assert_allclose(feats[16], np.asarray(_captured(iv, "block7")[0]).mean(axis=(1, 2)), rtol=1e-5)
        np.testing.assert_allclose(logits, feats[16] @ p["fc"]["kernel"] + p["fc"]["bias"], rtol=1e-4, atol=1e-5)
        # stem output is after BN and ReLU
        stem_bn = np.asarray(_captured(iv, "stem_bn"))
        np.testing.assert_array_equal(feats[0], np.maximum(stem_bn, 0))
        assert all(np.all(f >= 0) for f in feats)


def test_feature_layers_table():
    layers = feature_layers(64)
    assert len(layers) == 17
    assert sum(f.channels for f in layers) == 3904
    assert [f.channels for f in layers] == [64] + [64] * 4 + [128] * 4 + [256] * 4 + [512] * 4
    shapes = expected_param_shapes(64)
    order = [("stem_conv",)] + [(f"block{b}", c) for b in range(8) for c in ("conv1", "conv2")] + [("fc",)]
    for i, f in enumerate(layers):
        assert f.producer == order[i] and f.next_layer == order[i + 1]
        assert shapes[f.producer + ("kernel",)][-1] == f.channels
        in_axis = 0 if f.next_layer == ("fc",) else 2
        assert shapes[f.next_layer + ("kernel",)][in_axis] == f.channels
        assert shapes[f.bn + ("scale",)] == (f.channels,)
        assert f.bn[-1].startswith("bn") or f.bn == ("stem_bn",)
        assert "shortcut" not in "".join(f.producer + f.bn + f.next_layer)
    assert sum(f.channels for f in feature_layers(W)) == 3904 * W // 64


# ---------------------------------------------------------------------------------------------
# BatchNorm in PyTorch's convention


@pytest.fixture(scope="module")
def bn_case():
    rng = np.random.default_rng(7)
    x = (3.0 + 2.0 * rng.normal(size=(4, 2, 3, 5))).astype(np.float32)
    params = {"scale": rng.normal(size=5).astype(np.float32), "bias": rng.normal(size=5).astype(np.float32)}
    stats = {"mean": rng.normal(size=5).astype(np.float32), "var": (0.5 + rng.random(5)).astype(np.float32)}
    bn = BatchNorm()

    @jax.jit
    def run(params, stats, x):
        y_train, upd = bn.apply({"params": params, "batch_stats": stats}, x, True, mutable=["batch_stats"])
        y_eval = bn.apply({"params": params, "batch_stats": stats}, x, False)
        return y_train, upd["batch_stats"], y_eval

    return x, params, stats, jax.device_get(run(params, stats, x))


def test_batchnorm_train_mode(bn_case):
    x, params, stats, (y_train, new_stats, _) = bn_case
    x64 = x.astype(np.float64).reshape(-1, 5)
    n = x64.shape[0]
    mean, biased = x64.mean(0), x64.var(0)
    # normalisation uses the batch's biased variance, eps 1e-5
    want = (x64 - mean) / np.sqrt(biased + 1e-5) * params["scale"] + params["bias"]
    np.testing.assert_allclose(y_train.reshape(-1, 5), want, rtol=1e-4, atol=1e-5)
    # running statistics: momentum 0.1, unbiased variance
    np.testing.assert_allclose(new_stats["mean"], 0.9 * stats["mean"] + 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_stats["var"], 0.9 * stats["var"] + 0.1 * biased * n / (n - 1), rtol=1e-5)
    assert not np.allclose(new_stats["var"], 0.9 * stats["var"] + 0.1 * biased, rtol=1e-3)


def test_batchnorm_eval_mode_uses_running_stats(bn_case):
    x, params, stats, (_, _, y_eval) = bn_case
    want = (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * params["scale"] + params["bias"]
    np.testing.assert_allclose(y_eval, want, rtol=1e-4, atol=1e-5)
