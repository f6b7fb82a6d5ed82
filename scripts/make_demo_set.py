"""Build the embedded demo set evolq_pl/assets/demo_fmnist.npz from the Debian Fashion-MNIST files.

The demo and the tests must run without any dataset install, so a small subset ships inside the package:
4000 train images drawn without replacement by numpy's default_rng(seed), kept in ascending source order, and the
first 2000 t10k images. Fashion-MNIST is MIT-licensed (Zalando Research).

Example: python scripts/make_demo_set.py   (needs `apt-get install dataset-fashion-mnist`)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from evolq_pl.data import DEFAULT_FASHION_MNIST_ROOT, DEMO_SET, read_idx


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(DEFAULT_FASHION_MNIST_ROOT))
    parser.add_argument("--out", type=Path, default=DEMO_SET)
    parser.add_argument("--train-count", type=int, default=4000)
    parser.add_argument("--test-count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train_images = read_idx(args.root / "train-images-idx3-ubyte.gz")
    train_labels = read_idx(args.root / "train-labels-idx1-ubyte.gz")
    test_images = read_idx(args.root / "t10k-images-idx3-ubyte.gz")
    test_labels = read_idx(args.root / "t10k-labels-idx1-ubyte.gz")
    if not 0 < args.train_count <= len(train_images) or not 0 < args.test_count <= len(test_images):
        parser.error(f"counts must be in 1..{len(train_images)} (train) and 1..{len(test_images)} (test)")

    source = np.sort(np.random.default_rng(args.seed).choice(len(train_images), args.train_count, replace=False))
    info = (
        f"Fashion-MNIST subset: {args.train_count} train images drawn by numpy default_rng({args.seed}) "
        f"(train_source_index = index in the 60k train split), first {args.test_count} t10k images"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        train_images=train_images[source],
        train_labels=train_labels[source],
        train_source_index=source.astype(np.int32),
        test_images=test_images[: args.test_count],
        test_labels=test_labels[: args.test_count],
        info=np.array(info),
    )
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {info}")


if __name__ == "__main__":
    main()
