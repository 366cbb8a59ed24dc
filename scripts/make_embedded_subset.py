"""Cut the small real CIFAR-100 subset shipped inside lop-jax (lop_jax/embedded/).

It keeps the first CLASSES fine labels, and for each class the first TRAIN images of the
training split and the first TEST images of the test split, in the data set's own order, so
the reference's split rule (first images of a class → validation) still holds on it.

    python scripts/make_embedded_subset.py --source ../shared/data/cifar-100-python
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lop_jax.data import EMBEDDED_PATH, group_by_class, read_python_version

CLASSES, TRAIN, TEST = 20, 60, 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="cifar-100-python folder or archive")
    parser.add_argument("--out", default=str(EMBEDDED_PATH))
    args = parser.parse_args()
    tx, ty, sx, sy, names = read_python_version(Path(args.source))
    train = group_by_class(tx, ty, len(names), 500)[:CLASSES, :TRAIN]
    test = group_by_class(sx, sy, len(names), 100)[:CLASSES, :TEST]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, train=train, test=test, names=np.array(names[:CLASSES]))
    print(f"wrote {args.out}: train {train.shape}, test {test.shape}, {Path(args.out).stat().st_size} bytes")


if __name__ == "__main__":
    main()
