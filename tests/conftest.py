"""Shared test set-up: one intra-op thread (the test machines have few cores, shared with other jobs)."""

import torch

torch.set_num_threads(1)


import pytest  # noqa: E402

TINY_KWARGS = {"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10, "embed_dim": 48, "depth": 3,
               "num_heads": 3}


@pytest.fixture(scope="session")
def tiny_vit_checkpoint(tmp_path_factory):
    """A 3-block ViT trained for eight epochs on the shipped demo images (a real, non-degenerate model)."""
    import timm

    from evolq_pl.data import DemoDataModule

    torch.manual_seed(0)
    data = DemoDataModule(calib_size=4000, heldout_size=0, batch_size=64)
    data.setup("fit")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_KWARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    for _ in range(8):
        for x, y in torch.utils.data.DataLoader(data.calib_set, batch_size=64, shuffle=True):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = tmp_path_factory.mktemp("tiny") / "tiny_vit.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"model_kwargs": TINY_KWARGS}}, path)
    return str(path)
