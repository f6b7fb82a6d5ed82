"""What the benchmark tests check FP rows against: the plain timm model, computed without the project's code."""

import gzip

import numpy as np
import pytest
import timm
import torch

from evolq_pl.data import DEFAULT_FASHION_MNIST_ROOT, FASHION_MNIST_MEAN, FASHION_MNIST_STD
from evolq_pl.testing import TINY_VIT_KWARGS, TINY_VIT_NAME


def _idx(name: str) -> np.ndarray:
    """An IDX array read with numpy alone: the images' header is 16 bytes, the labels' 8."""
    with gzip.open(f"{DEFAULT_FASHION_MNIST_ROOT}/{name}") as f:
        raw = f.read()
    return np.frombuffer(raw, np.uint8, offset=16 if "images" in name else 8)


@pytest.fixture(scope="session")
def plain_fp_top1(tiny_vit_checkpoint) -> float:
    """Top-1 (%) of the tiny ViT's weights in a fresh timm model on the 10k Fashion-MNIST test images."""
    model = timm.create_model(TINY_VIT_NAME, pretrained=False, **TINY_VIT_KWARGS).eval()
    model.load_state_dict(torch.load(tiny_vit_checkpoint, weights_only=True)["state_dict"])
    images = torch.from_numpy(_idx("t10k-images-idx3-ubyte.gz").reshape(-1, 1, 28, 28).astype(np.float32))
    labels = torch.from_numpy(_idx("t10k-labels-idx1-ubyte.gz").astype(np.int64))
    x = (images / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    with torch.no_grad():
        predictions = torch.cat([model(batch).argmax(1) for batch in x.split(1000)])
    return 100.0 * float((predictions == labels).double().mean())
