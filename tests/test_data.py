"""Data: the split of semantics §1 on real CIFAR-100, the archive and download paths, the embedded subset."""

import hashlib
import io
import pickle
import re
import socket
import sys
import tarfile
import threading

import numpy as np
import pytest

import lop_jax.data as data_mod
from lop_jax.config import make_config
from lop_jax.data import (
    ARCHIVE_NAME,
    EMBEDDED_PATH,
    DataError,
    download_archive,
    find_local_copy,
    group_by_class,
    load_data,
    read_python_version,
)

CLOSED_URL = "http://127.0.0.1:9/cifar-100-python.tar.gz"  # discard port: nothing listens, refused at once


def _per_class_indices(labels, k):
    return np.flatnonzero(labels == k)


# ---------------------------------------------------------------------------------------------
# real data (../shared/data/cifar-100-python)


@pytest.fixture(scope="module")
def real_loaded(real_data_dir):
    # data_path is the folder that holds cifar-100-python/, as in the reference's configs
    return load_data(make_config({"data_path": str(real_data_dir.parent)}))


def test_real_split_sizes(real_loaded):
    d = real_loaded
    assert d.train.shape == (100, 450, 32, 32, 3)
    assert d.val.shape == (100, 50, 32, 32, 3)
    assert d.test.shape == (100, 100, 32, 32, 3)
    assert d.train.dtype == d.val.dtype == d.test.dtype == np.uint8
    assert d.num_classes == 100


def test_real_validation_is_first_50_of_each_class_in_file_order(real_loaded, real_raw):
    x, y, _ = real_raw["train"]
    tx, ty, _ = real_raw["test"]
    assert real_loaded.names == real_raw["names"]
    for k in range(100):
        idx = _per_class_indices(y, k)
        assert idx.size == 500
        np.testing.assert_array_equal(real_loaded.val[k], x[idx[:50]], err_msg=f"validation of class {k}")
        np.testing.assert_array_equal(real_loaded.train[k], x[idx[50:]], err_msg=f"train of class {k}")
        tidx = _per_class_indices(ty, k)
        assert tidx.size == 100
        np.testing.assert_array_equal(real_loaded.test[k], tx[tidx], err_msg=f"test of class {k}")


def test_real_validation_matches_within_class_index(real_loaded, real_raw):
    # Independent of the file's global order: the shared copy's filenames are
    # "<fine name>_<index within class>.png"; validation must be indices 0..49 of each class.
    x, y, filenames = real_raw["train"]
    pattern = re.compile(r"_(\d+)\.png$")
    within = np.array([int(pattern.search(f).group(1)) for f in filenames])
    for k in (0, 17, 99):
        idx = _per_class_indices(y, k)
        first50 = idx[np.argsort(within[idx])[:50]]
        np.testing.assert_array_equal(real_loaded.val[k], x[first50])


def test_real_split_at_smaller_sizes_and_folder_given_directly(real_data_dir, real_raw):
    # data_path may also name the cifar-100-python folder itself
    cfg = make_config({"data_path": str(real_data_dir), "num_tasks": 2, "val_images_per_class": 10,
                       "train_images_per_class": 20, "test_images_per_class": 7, "train_batch_size": 25})
    d = load_data(cfg)
    x, y, _ = real_raw["train"]
    assert d.val.shape[:2] == (100, 10) and d.train.shape[:2] == (100, 20) and d.test.shape[:2] == (100, 7)
    for k in (3, 64):
        idx = _per_class_indices(y, k)
        np.testing.assert_array_equal(d.val[k], x[idx[:10]])
        np.testing.assert_array_equal(d.train[k], x[idx[10:30]])


def test_read_python_version_layout(real_data_dir, real_raw):
    tx, ty, sx, sy, names = read_python_version(real_data_dir)
    assert tx.shape == (50000, 32, 32, 3) and sx.shape == (10000, 32, 32, 3)
    # NHWC from the file's 1024 R, 1024 G, 1024 B row-major layout
    row0 = real_raw["train_rows"][0]
    assert tx[0, 0, 0, 0] == row0[0] and tx[0, 0, 0, 1] == row0[1024] and tx[0, 0, 0, 2] == row0[2048]
    assert tx[0, 0, 1, 0] == row0[1] and tx[0, 1, 0, 0] == row0[32]
    np.testing.assert_array_equal(ty, real_raw["train"][1])
    np.testing.assert_array_equal(sy, real_raw["test"][1])
    assert names == real_raw["names"]


def test_embedded_subset_is_real_cifar(real_raw):
    assert EMBEDDED_PATH.stat().st_size <= 5 * 1024 * 1024
    with np.load(EMBEDDED_PATH) as z:
        train, test, names = z["train"], z["test"], [str(n) for n in z["names"]]
    k = train.shape[0]
    assert k >= 10 and train.shape[1] >= 30 and test.shape[1] >= 10
    assert train.shape[2:] == test.shape[2:] == (32, 32, 3) and train.dtype == np.uint8
    x, y, _ = real_raw["train"]
    tx, ty, _ = real_raw["test"]
    assert names == list(real_raw["names"][:k])
    for c in range(k):
        np.testing.assert_array_equal(train[c], x[_per_class_indices(y, c)[: train.shape[1]]])
        np.testing.assert_array_equal(test[c], tx[_per_class_indices(ty, c)[: test.shape[1]]])


# ---------------------------------------------------------------------------------------------
# embedded subset (no real data needed)


def test_embedded_subset_loads_and_splits():
    assert EMBEDDED_PATH.is_file() and EMBEDDED_PATH.stat().st_size <= 5 * 1024 * 1024
    cfg = make_config({"data_source": "embedded", "num_tasks": 2, "train_images_per_class": 20,
                       "val_images_per_class": 10, "test_images_per_class": 10, "train_batch_size": 25})
    d = load_data(cfg)
    with np.load(EMBEDDED_PATH) as z:
        train, test = z["train"], z["test"]
    k = train.shape[0]
    assert d.num_classes == k == len(d.names)
    assert d.val.shape == (k, 10, 32, 32, 3) and d.train.shape == (k, 20, 32, 32, 3)
    assert d.test.shape == (k, 10, 32, 32, 3)
    np.testing.assert_array_equal(d.val, train[:, :10])
    np.testing.assert_array_equal(d.train, train[:, 10:30])
    np.testing.assert_array_equal(d.test, test[:, :10])
    # real photographs, not noise or blanks: every image has structure
    assert d.train.reshape(k * 20, -1).std(axis=1).min() > 5


def test_embedded_subset_too_small_for_config_is_named():
    with np.load(EMBEDDED_PATH) as z:
        k, n_train = z["train"].shape[:2]
    small = {"data_source": "embedded", "val_images_per_class": 10, "train_images_per_class": 20,
             "test_images_per_class": 10, "train_batch_size": 25}
    load_data(make_config({**small, "num_tasks": k // 5}))
    with pytest.raises(DataError, match="num_tasks"):
        load_data(make_config({**small, "num_tasks": k // 5 + 1}))
    with pytest.raises(DataError, match="train_images_per_class"):
        load_data(make_config({**small, "num_tasks": 1, "train_images_per_class": n_train,
                               "train_batch_size": n_train}))


# ---------------------------------------------------------------------------------------------
# group_by_class


def test_group_by_class_keeps_within_class_order():
    labels = np.array([2, 0, 1, 0, 2, 1, 0, 2, 1, 1, 0, 2])
    images = np.arange(labels.size, dtype=np.int64).reshape(-1, 1, 1, 1) * np.ones((1, 2, 2, 3), np.int64)
    out = group_by_class(images, labels, num_classes=3, per_class=3)
    assert out.shape == (3, 3, 2, 2, 3)
    np.testing.assert_array_equal(out[:, :, 0, 0, 0], [[1, 3, 6], [2, 5, 8], [0, 4, 7]])
    with pytest.raises(DataError, match="class"):
        group_by_class(images, labels, num_classes=3, per_class=5)


# ---------------------------------------------------------------------------------------------
# archive and download paths, on a small fake archive in tmp_path


def _fake_python_version(num_classes=2, per_train=500, per_test=100, seed=0):
    """Pickles in the official layout, classes interleaved, plus the expected grouped arrays."""
    rng = np.random.default_rng(seed)

    def split(per):
        labels = np.tile(np.arange(num_classes), per)
        rng.shuffle(labels)
        rows = rng.integers(0, 256, (labels.size, 3072), dtype=np.uint8)
        return {"data": rows, "fine_labels": labels.tolist(), "coarse_labels": [0] * labels.size,
                "filenames": [f"f{i}.png" for i in range(labels.size)], "batch_label": "fake"}

    train, test = split(per_train), split(per_test)
    meta = {"fine_label_names": [f"class{k}" for k in range(num_classes)], "coarse_label_names": ["all"]}
    return {"train": train, "test": test, "meta": meta}


def _write_archive(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in files.items():
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fake_archive(tmp_path_factory):
    files = _fake_python_version()
    src = tmp_path_factory.mktemp("fake_src") / ARCHIVE_NAME
    md5 = _write_archive(src, files)
    return src, md5, files


def _expected_grouped(files, split, per):
    rows = files[split]["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray(files[split]["fine_labels"])
    return np.stack([rows[np.flatnonzero(labels == k)[:per]] for k in range(2)])


def test_archive_md5_mismatch_names_the_file(tmp_path, fake_archive):
    src, _, _ = fake_archive
    local = tmp_path / ARCHIVE_NAME
    local.write_bytes(src.read_bytes())
    assert find_local_copy(tmp_path) == local
    with pytest.raises(DataError) as info:
        read_python_version(local)
    assert str(local) in str(info.value) and "md5" in str(info.value)
    with pytest.raises(DataError, match=re.escape(str(local))):
        load_data(make_config({"data_path": str(tmp_path), "num_tasks": 1}))


def test_archive_with_right_md5_is_read_and_split(tmp_path, fake_archive, monkeypatch):
    src, md5, files = fake_archive
    monkeypatch.setattr(data_mod, "ARCHIVE_MD5", md5)
    (tmp_path / ARCHIVE_NAME).write_bytes(src.read_bytes())
    d = load_data(make_config({"data_path": str(tmp_path), "num_tasks": 1, "classes_per_task": 2,
                               "train_batch_size": 50}))
    train = _expected_grouped(files, "train", 500)
    np.testing.assert_array_equal(d.val, train[:, :50])
    np.testing.assert_array_equal(d.train, train[:, 50:])
    np.testing.assert_array_equal(d.test, _expected_grouped(files, "test", 100))
    assert d.names == ("class0", "class1")


def test_download_md5_mismatch_is_an_error_and_keeps_nothing(tmp_path, fake_archive, monkeypatch):
    src, _, _ = fake_archive
    monkeypatch.setattr(data_mod, "ARCHIVE_URL", src.as_uri())
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        download_archive(root)
    assert "md5" in str(info.value) and ARCHIVE_NAME in str(info.value)
    assert list(root.iterdir()) == []


def test_download_with_right_md5_is_kept_and_used(tmp_path, fake_archive, monkeypatch):
    src, md5, files = fake_archive
    monkeypatch.setattr(data_mod, "ARCHIVE_URL", src.as_uri())
    monkeypatch.setattr(data_mod, "ARCHIVE_MD5", md5)
    root = tmp_path / "data"
    d = load_data(make_config({"data_path": str(root), "num_tasks": 1, "classes_per_task": 2,
                               "train_batch_size": 50}))
    assert sorted(p.name for p in root.iterdir()) == [ARCHIVE_NAME]
    assert (root / ARCHIVE_NAME).read_bytes() == src.read_bytes()
    np.testing.assert_array_equal(d.val, _expected_grouped(files, "train", 50))
    # next time the local copy is found, no download is attempted
    monkeypatch.setattr(data_mod, "ARCHIVE_URL", CLOSED_URL)
    assert find_local_copy(root) == root / ARCHIVE_NAME
    load_data(make_config({"data_path": str(root), "num_tasks": 1, "classes_per_task": 2,
                           "train_batch_size": 50}))


def test_no_local_data_and_no_network_says_where_to_put_the_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "ARCHIVE_URL", CLOSED_URL)
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_data(make_config({"data_path": str(root)}))
    msg = str(info.value)
    assert ARCHIVE_NAME in msg and str(root) in msg
    assert not (root / ARCHIVE_NAME).exists() and not (root / (ARCHIVE_NAME + ".part")).exists()
    assert data_mod.DOWNLOAD_TIMEOUT_S <= 30


def test_default_data_path_is_data_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data_mod, "ARCHIVE_URL", CLOSED_URL)
    with pytest.raises(DataError, match="'data'"):
        load_data(make_config({}))


def test_download_gives_up_on_a_silent_server(tmp_path, monkeypatch):
    # A server that accepts connections and never answers: the download must time out (after
    # DOWNLOAD_TIMEOUT_S, shortened here) with the DataError, not hang.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    monkeypatch.setattr(data_mod, "ARCHIVE_URL", f"http://127.0.0.1:{port}/x")
    monkeypatch.setattr(data_mod, "DOWNLOAD_TIMEOUT_S", 0.3)
    outcome = []

    def attempt():
        try:
            download_archive(tmp_path / "data")
        except Exception as err:  # noqa: BLE001
            outcome.append(err)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(120)  # a watchdog only, so that a missing timeout fails instead of hanging the suite
    server.close()
    assert outcome and isinstance(outcome[0], DataError), outcome
    assert ARCHIVE_NAME in str(outcome[0])


def test_corrupt_folder_is_a_data_error(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(b"not a pickle")
    assert find_local_copy(tmp_path) == folder
    with pytest.raises(DataError, match="train"):
        load_data(make_config({"data_path": str(tmp_path)}))


def test_tfds_missing_is_a_data_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails, installed or not
    with pytest.raises(DataError, match="tfds"):
        load_data(make_config({"data_source": "tfds"}))


class _FakeTfdsBuilder:
    def __init__(self, prepared: bool):
        self.prepared = prepared
        self.data_dir = "fake_tfds_dir/cifar100/3.0.2"
        self.download_calls = 0

    def is_prepared(self) -> bool:
        return self.prepared

    def download_and_prepare(self) -> None:
        self.download_calls += 1
        raise AssertionError("tfds' own download (with its long retry loop) must not start offline")


def test_tfds_offline_and_unprepared_fails_fast_without_tfds_retries(monkeypatch):
    import types

    import lop_jax.data as data_mod

    builder = _FakeTfdsBuilder(prepared=False)
    fake = types.SimpleNamespace(builder=lambda name, **kw: builder)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    probed = []
    monkeypatch.setattr(data_mod, "host_reachable", lambda addr: probed.append(addr) or False)
    with pytest.raises(DataError, match="no prepared cifar100 in fake_tfds_dir.*cifar-100-python.tar.gz"):
        load_data(make_config({"data_source": "tfds"}))
    assert builder.download_calls == 0 and probed == [data_mod.TFDS_SOURCE_HOST]


def test_host_reachable_is_false_quickly_for_a_closed_port():
    import socket as socket_mod

    from lop_jax.data import host_reachable

    with socket_mod.socket() as s:  # bind a port, never listen: a connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert host_reachable(("127.0.0.1", port), timeout=5.0) is False
