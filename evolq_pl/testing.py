"""A small real model for tests and scripts: a 3-block ViT trained on the shipped demo images.

The test suite and ``scripts/fault_injection.py`` both need a trained, non-degenerate transformer that builds in
seconds on a CPU; this is the one recipe they share.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from evolq_pl.data import DemoDataModule

TINY_VIT_NAME = "vit_tiny_patch16_224"
TINY_VIT_KWARGS = {"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10, "embed_dim": 48, "depth": 3,
                   "num_heads": 3}


def train_tiny_vit(path: str | Path, epochs: int = 8, seed: int = 0) -> Path:
    """Train the 3-block ViT on the demo set's 4,000 training images and save ``{"state_dict", "meta"}`` to path."""
    torch.manual_seed(seed)
    data = DemoDataModule(calib_size=4000, heldout_size=0, batch_size=64)
    data.setup("fit")
    model = timm.create_model(TINY_VIT_NAME, pretrained=False, **TINY_VIT_KWARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    for _ in range(epochs):
        for x, y in torch.utils.data.DataLoader(data.calib_set, batch_size=64, shuffle=True):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = Path(path)
    torch.save({"state_dict": model.state_dict(), "meta": {"model_kwargs": TINY_VIT_KWARGS}}, path)
    return path
