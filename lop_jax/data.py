"""CIFAR-100 sources and the reference's split (semantics §1).

Sources, chosen by the config key ``data_source``:

- ``cifar100`` (default): the official *python* version in ``data_path``, as the extracted
  ``cifar-100-python/`` folder or the ``cifar-100-python.tar.gz`` archive. If neither is there
  the archive is downloaded once (md5-checked) and kept; without network this fails within
  seconds with a message saying where to put the archive.
- ``embedded``: a small real subset shipped inside the package (the first 20 classes), so that
  the quick command runs anywhere. Made by ``scripts/make_embedded_subset.py``.
- ``tfds``: tensorflow-datasets' ``cifar100`` (needs the ``tfds`` extra, which pulls in
  TensorFlow because tfds cannot prepare CIFAR-100 without it).

Whatever the source, images come out grouped by fine label: ``CifarData.train[k]`` holds the
training images of class k in the data set's own order, after the first ``val_images_per_class``
of that class were taken out for validation.

``load_full_split`` gives the same source unsplit (``FullSplit``: every training image and every
test image of each class, 500 and 100 per class for the real CIFAR-100, whatever a run's sizes).
The post-run analysis draws from it, as the reference does (semantics §9); ``split_for_run`` cuts a
run's ``CifarData`` out of it, so that a sweep reads the data set once.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import socket
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lop_jax.config import Config
from lop_jax.errors import InputError

ARCHIVE_NAME = "cifar-100-python.tar.gz"
FOLDER_NAME = "cifar-100-python"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
EMBEDDED_PATH = Path(__file__).parent / "embedded" / "cifar100_subset.npz"
DOWNLOAD_TIMEOUT_S = 10.0
# tfds fetches the binary version from the same host; probed before tfds' own (slow) retry loop
TFDS_SOURCE_HOST = ("www.cs.toronto.edu", 443)


class DataError(InputError, RuntimeError):
    """The data asked for cannot be found or read; the message says what to do."""


@dataclass(frozen=True)
class _ByClass:
    """Training and test images grouped by class: uint8 arrays [K, n, 32, 32, 3], row k = fine label k."""

    train: np.ndarray
    test: np.ndarray
    names: tuple[str, ...]
    source: str

    @property
    def num_classes(self) -> int:
        return int(self.train.shape[0])


@dataclass(frozen=True)
class CifarData(_ByClass):
    """A run's split: its training, validation (``val``) and test images per class."""

    val: np.ndarray


@dataclass(frozen=True)
class FullSplit(_ByClass):
    """A source's whole training and test splits grouped by class: uint8 [K, n, 32, 32, 3].

    No validation images are taken out: ``train[k]`` is every training image of class k (500 for
    the real CIFAR-100, fewer for the embedded subset), ``test[k]`` every test image (100).
    """


def _to_nhwc(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def group_by_class(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """[N, 32, 32, 3] images → [num_classes, per_class, ...], keeping the order within each class."""
    out = np.empty((num_classes, per_class) + images.shape[1:], images.dtype)
    for k in range(num_classes):
        idx = np.flatnonzero(labels == k)
        if idx.size < per_class:
            raise DataError(f"class {k} has {idx.size} images, {per_class} are needed")
        out[k] = images[idx[:per_class]]
    return out


def _read_pickle(raw: bytes, what: str) -> dict:
    try:
        return pickle.load(io.BytesIO(raw), encoding="latin1")
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a corrupt file
        raise DataError(f"cannot read CIFAR-100 file '{what}': {err}") from None


def _load_python_files(read: callable, where: str) -> tuple[np.ndarray, ...]:
    train = _read_pickle(read("train"), f"{where}/train")
    test = _read_pickle(read("test"), f"{where}/test")
    meta = _read_pickle(read("meta"), f"{where}/meta")
    return (_to_nhwc(np.asarray(train["data"], np.uint8)), np.asarray(train["fine_labels"]),
            _to_nhwc(np.asarray(test["data"], np.uint8)), np.asarray(test["fine_labels"]),
            tuple(meta["fine_label_names"]))


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_local_copy(data_path: str | Path) -> Path | None:
    """The extracted folder or archive of the python version under ``data_path``, if any."""
    root = Path(data_path) if str(data_path) else Path("data")
    for cand in (root / FOLDER_NAME, root, root / ARCHIVE_NAME):
        if cand.is_dir() and (cand / "train").is_file() and (cand / "test").is_file():
            return cand
        if cand.is_file() and cand.name == ARCHIVE_NAME:
            return cand
    return None


def download_archive(data_path: str | Path) -> Path:
    """Download the official archive once into ``data_path`` and verify its md5."""
    root = Path(data_path) if str(data_path) else Path("data")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create data directory {root}: {err}") from None
    target = root / ARCHIVE_NAME
    tmp = root / (ARCHIVE_NAME + ".part")
    hint = (f"no CIFAR-100 found under '{root}' and the download failed ({{}}); put the official "
            f"'{ARCHIVE_NAME}' (or its extracted '{FOLDER_NAME}/' folder) in '{root}', or set data_path")
    try:
        with urllib.request.urlopen(ARCHIVE_URL, timeout=DOWNLOAD_TIMEOUT_S) as resp, open(tmp, "wb") as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DataError(hint.format(getattr(err, "reason", err))) from None
    if _md5(tmp) != ARCHIVE_MD5:
        tmp.unlink(missing_ok=True)
        raise DataError(hint.format("md5 mismatch of the downloaded archive"))
    tmp.replace(target)
    return target


def read_python_version(location: Path) -> tuple[np.ndarray, ...]:
    """(train_x, train_y, test_x, test_y, names) from the folder or the archive."""
    if location.is_dir():
        return _load_python_files(lambda name: (location / name).read_bytes(), str(location))
    if _md5(location) != ARCHIVE_MD5:
        raise DataError(f"{location} is not the official {ARCHIVE_NAME} (md5 mismatch); replace it")
    with tarfile.open(location, "r:gz") as tar:
        def read(name: str) -> bytes:
            member = tar.extractfile(f"{FOLDER_NAME}/{name}")
            if member is None:
                raise DataError(f"{location} has no {FOLDER_NAME}/{name}")
            return member.read()

        return _load_python_files(read, str(location))


def host_reachable(address: tuple[str, int], timeout: float = DOWNLOAD_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``address`` opens within ``timeout`` seconds."""
    try:
        with socket.create_connection(address, timeout=timeout):
            return True
    except OSError:
        return False


def _read_tfds(data_path: str) -> tuple[np.ndarray, ...]:
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DataError("data_source 'tfds' needs the tfds extra: pip install -e '.[tfds]' "
                        f"(tensorflow-datasets, TensorFlow and importlib_resources): {err}") from None
    kwargs = {"data_dir": data_path} if data_path else {}
    try:
        builder = tfds.builder("cifar100", **kwargs)
        if not builder.is_prepared() and not host_reachable(TFDS_SOURCE_HOST):
            raise DataError(f"tensorflow-datasets has no prepared cifar100 in {builder.data_dir} and cannot reach "
                            f"{TFDS_SOURCE_HOST[0]} to download it; prepare it once on a machine with network "
                            "(tfds build cifar100) and copy the folder, or use data_source 'cifar100' with "
                            f"{ARCHIVE_NAME} in data_path")
        builder.download_and_prepare()
        splits = {s: tfds.as_numpy(builder.as_dataset(split=s, batch_size=-1)) for s in ("train", "test")}
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - tfds raises many types; report them in one line
        raise DataError(f"tensorflow-datasets could not provide cifar100: {type(err).__name__}: {err}") from None
    names = tuple(builder.info.features["label"].names)
    return (splits["train"]["image"], splits["train"]["label"], splits["test"]["image"],
            splits["test"]["label"], names)


def _load_embedded() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    if not EMBEDDED_PATH.is_file():
        raise DataError(f"the embedded subset {EMBEDDED_PATH} is missing; reinstall lop-jax")
    with np.load(EMBEDDED_PATH) as z:
        return z["train"], z["test"], tuple(str(n) for n in z["names"])


def load_full_split(cfg: Config) -> FullSplit:
    """Every training and test image of the source the config names (``data_source``, ``data_path``),
    grouped by class; the config's per-class sizes play no part."""
    if cfg.data_source == "embedded":
        train_all, test_all, names = _load_embedded()
        return FullSplit(train=train_all, test=test_all, names=names,
                         source=f"embedded subset ({len(names)} classes)")
    if cfg.data_source == "tfds":
        tx, ty, sx, sy, names = _read_tfds(cfg.data_path)
        source = "tensorflow-datasets cifar100"
    else:
        location = find_local_copy(cfg.data_path) or download_archive(cfg.data_path)
        tx, ty, sx, sy, names = read_python_version(location)
        source = f"CIFAR-100 python version at {location}"
    return FullSplit(train=group_by_class(np.asarray(tx, np.uint8), np.asarray(ty), len(names), 500),
                     test=group_by_class(np.asarray(sx, np.uint8), np.asarray(sy), len(names), 100),
                     names=names, source=source)


def split_for_run(full: FullSplit, cfg: Config) -> CifarData:
    """The run's split (semantics §1) at the config's sizes: per class, the first ``val_images_per_class``
    training images for validation, the next ``train_images_per_class`` for training, and the first
    ``test_images_per_class`` test images."""
    n_val, n_train, n_test = cfg.val_images_per_class, cfg.train_images_per_class, cfg.test_images_per_class
    k, source = full.num_classes, full.source
    if cfg.num_classes > k:
        raise DataError(f"config key 'num_tasks': the run needs {cfg.num_classes} classes but {source} has {k}")
    if n_val + n_train > full.train.shape[1]:
        raise DataError(f"config key 'train_images_per_class': {source} has {full.train.shape[1]} training "
                        f"images per class, {n_val} + {n_train} are asked for")
    if n_test > full.test.shape[1]:
        raise DataError(f"config key 'test_images_per_class': {source} has {full.test.shape[1]} test "
                        f"images per class, {n_test} are asked for")
    return CifarData(train=full.train[:, n_val:n_val + n_train], val=full.train[:, :n_val],
                     test=full.test[:, :n_test], names=full.names, source=source)


def load_data(cfg: Config) -> CifarData:
    """Load the data set named by the config and split it as in semantics §1, at the config's sizes."""
    return split_for_run(load_full_split(cfg), cfg)
