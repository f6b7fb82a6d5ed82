"""DataModules on real data: the shipped demo set, the Debian Fashion-MNIST files, and small ImageFolder trees."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from evolq_pl.data import (
    DEMO_SET,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    CalibrationDataModule,
    DemoDataModule,
    FashionMNISTDataModule,
    GenerationTicks,
    ImageNetDataModule,
    read_idx,
)

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "vit6_fmnist.pth"
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian Fashion-MNIST files absent (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def demo() -> dict[str, np.ndarray]:
    with np.load(DEMO_SET) as npz:
        return {k: npz[k] for k in npz.files}


# -- shared split logic (demo set) ------------------------------------------------------------------------------


def test_demo_splits_sizes_disjoint_and_seeded() -> None:
    dm = DemoDataModule(calib_size=300, heldout_size=200, seed=0)
    dm.setup("fit")
    calib, heldout = dm.calib_ids(), dm.heldout_ids()
    assert len(calib) == 300 and len(heldout) == 200
    assert len(set(calib)) == 300 and not set(calib) & set(heldout)
    assert all(re.fullmatch(r"train:\d+", i) for i in calib)
    assert DemoDataModule(calib_size=300, heldout_size=200, seed=0).calib_ids() == calib
    assert DemoDataModule(calib_size=300, heldout_size=200, seed=1).calib_ids() != calib
    # A larger held-out split does not change the calibration draw.
    assert DemoDataModule(calib_size=300, heldout_size=0, seed=0).calib_ids() == calib
    assert dm.test_set is None  # the test split is loaded only for the test stage
    dm.setup("test")
    assert len(dm.test_set) == 2000


def test_demo_batches_are_normalized_images(demo: dict[str, np.ndarray]) -> None:
    dm = DemoDataModule(calib_size=250, heldout_size=0, batch_size=100)
    batches = list(dm.calib_dataloader())
    assert [len(b[0]) for b in batches] == [100, 100, 50]  # fixed order, last batch kept
    x, y = batches[0]
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    # The ids name the source images; rebuild the expected tensors from the raw uint8 pixels.
    source = [int(i.split(":")[1]) for i in dm.calib_ids()[:100]]
    rows = np.searchsorted(demo["train_source_index"], source)
    raw = torch.from_numpy(demo["train_images"][rows]).float().div(255).unsqueeze(1)
    assert torch.allclose(x, (raw - FASHION_MNIST_MEAN) / FASHION_MNIST_STD, atol=1e-6)
    assert torch.equal(y, torch.from_numpy(demo["train_labels"][rows].astype(np.int64)))
    assert abs(x.mean().item()) < 0.15 and 0.8 < x.std().item() < 1.2
    again = next(iter(dm.calib_dataloader()))[0]
    assert torch.equal(again, x)


def test_demo_defaults_and_hparams() -> None:
    dm = DemoDataModule()
    assert (dm.calib_size, dm.heldout_size, dm.batch_size) == (500, 500, 100)
    assert dm.hparams["calib_size"] == 500 and "path" in dm.hparams


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"calib_size": 0}, "calib_size must be an int >= 1"),
        ({"heldout_size": -1}, "heldout_size must be an int >= 0"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"generations_per_epoch": 0}, "generations_per_epoch must be an int >= 1"),
    ],
)
def test_argument_errors(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DemoDataModule(**kwargs)


def test_calib_too_large_for_demo() -> None:
    dm = DemoDataModule(calib_size=3900, heldout_size=200)
    with pytest.raises(
        ValueError, match=r"train split has 4000 items but calib_size \+ heldout_size = 3900 \+ 200"
    ):
        dm.setup("fit")


def test_missing_demo_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found; recreate it with scripts/make_demo_set.py"):
        DemoDataModule(path=str(tmp_path / "none.npz")).setup("fit")


# -- generation ticks -------------------------------------------------------------------------------------------


def test_ticks_length_values_and_state() -> None:
    ticks = GenerationTicks(4)
    assert len(ticks) == 4 and list(ticks) == [0, 1, 2, 3] and list(ticks) == [0, 1, 2, 3]
    loader = DemoDataModule(generations_per_epoch=4).train_dataloader()
    assert isinstance(loader, GenerationTicks) and len(loader) == 4
    it = iter(loader)
    assert [next(it), next(it)] == [0, 1]
    state = loader.state_dict()
    assert state == {"position": 2}
    fresh = GenerationTicks(4)
    fresh.load_state_dict(state)
    assert list(fresh) == [2, 3] and list(fresh) == [0, 1, 2, 3]  # resumes once, then full epochs
    with pytest.raises(ValueError, match="outside 0..4"):
        fresh.load_state_dict({"position": 7})


class _TickModule(L.LightningModule):
    """Smallest real module: one SGD step per tick, records the ticks and validation batches it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.ticks: list[tuple[int, int]] = []
        self.val_batches = 0

    def training_step(self, tick: int, batch_idx: int) -> torch.Tensor:
        self.ticks.append((self.current_epoch, int(tick)))
        return (self.w - float(tick)) ** 2

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.val_batches += 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path: Path, **kwargs: object) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_fit_without_heldout_skips_validation(tmp_path: Path) -> None:
    dm = DemoDataModule(heldout_size=0, generations_per_epoch=3)
    assert dm.val_dataloader() == []
    module = _TickModule()
    _trainer(tmp_path, max_epochs=2, enable_checkpointing=False).fit(module, dm)
    assert module.ticks == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert module.val_batches == 0


def test_fit_with_heldout_validates(tmp_path: Path) -> None:
    dm = DemoDataModule(calib_size=100, heldout_size=200, test_batch_size=100, generations_per_epoch=2)
    module = _TickModule()
    _trainer(tmp_path, max_epochs=1, enable_checkpointing=False, num_sanity_val_steps=0).fit(module, dm)
    assert module.val_batches == 2


def test_fit_resumes_mid_epoch(tmp_path: Path) -> None:
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=-1, filename="{step}"
    )
    _trainer(tmp_path, max_epochs=2, callbacks=[checkpoints]).fit(
        _TickModule(), DemoDataModule(generations_per_epoch=5)
    )
    resumed = _TickModule()
    _trainer(tmp_path, max_epochs=2, enable_checkpointing=False).fit(
        resumed, DemoDataModule(generations_per_epoch=5), ckpt_path=tmp_path / "ck" / "step=2.ckpt"
    )
    assert resumed.ticks == [(0, 2), (0, 3), (0, 4)] + [(1, t) for t in range(5)]


# -- Fashion-MNIST from the Debian IDX files ---------------------------------------------------------------------


@needs_fmnist
def test_read_idx_debian_files() -> None:
    images = read_idx(FMNIST / "train-images-idx3-ubyte.gz")
    labels = read_idx(FMNIST / "train-labels-idx1-ubyte.gz")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
    assert (
        abs(images.mean() / 255 - FASHION_MNIST_MEAN) < 2e-3
        and abs(images.std() / 255 - FASHION_MNIST_STD) < 2e-3
    )
    assert read_idx(FMNIST / "t10k-images-idx3-ubyte.gz").shape == (10000, 28, 28)


@needs_fmnist
def test_read_idx_rejects_corrupt_files(tmp_path: Path) -> None:
    raw = gzip.decompress((FMNIST / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "plain").write_bytes(raw)
    assert read_idx(tmp_path / "plain").shape == (10000,)  # uncompressed IDX works too
    (tmp_path / "magic").write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(tmp_path / "short")
    packed = (FMNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ValueError, match="cannot read IDX file"):
        read_idx(tmp_path / "cut.gz")


@needs_fmnist
def test_fashion_mnist_module() -> None:
    dm = FashionMNISTDataModule(calib_size=1000, heldout_size=500, seed=0)
    dm.setup("test")
    assert len(dm.calib_set) == 1000 and len(dm.heldout_set) == 500 and len(dm.test_set) == 10000
    assert not set(dm.calib_ids()) & set(dm.heldout_ids())
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (100, 1, 28, 28) and y.shape == (100,)
    assert len(dm.calib_dataloader()) == 10


def test_fashion_mnist_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"not found in .*apt-get install dataset-fashion-mnist.*root="):
        FashionMNISTDataModule(root=str(tmp_path)).setup("fit")


# -- ImageFolder (ImageNet layout), built from real Fashion-MNIST pixels -----------------------------------------


def _write_tree(root: Path, demo: dict[str, np.ndarray], per_class: dict[str, int]) -> None:
    """root/<split>/<class>/<n>.png|jpg with demo images; class c1 uses JPEG to cover both decoders."""
    k = 0
    for split, count in per_class.items():
        for cls in ("c0", "c1"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for n in range(count):
                img = Image.fromarray(demo["train_images"][k])
                img.save(folder / (f"{n}.png" if cls == "c0" else f"{n}.jpg"))
                k += 1


@pytest.fixture
def tree(tmp_path: Path, demo: dict[str, np.ndarray]) -> Path:
    root = tmp_path / "imagenet"
    _write_tree(root, demo, {"train": 5, "val": 2})
    return root


def _folder_dm(root: Path, **kwargs: object) -> ImageNetDataModule:
    defaults: dict[str, object] = {
        "model_name": "deit_tiny_patch16_224.fb_in1k",
        "calib_size": 4,
        "batch_size": 3,
    }
    return ImageNetDataModule(str(root), **{**defaults, **kwargs})


def test_image_folder_splits_and_transform(tree: Path) -> None:
    dm = _folder_dm(tree, heldout_size=2)
    dm.setup("test")
    ids = dm.calib_ids()
    assert len(ids) == 4 and all(re.fullmatch(r"c[01]/\d\.(png|jpg)", i) for i in ids)
    assert not set(ids) & set(dm.heldout_ids())
    assert _folder_dm(tree, heldout_size=2).calib_ids() == ids
    x, y = next(iter(dm.calib_dataloader()))
    assert x.shape == (3, 3, 224, 224) and y.tolist() == [int(i[1]) for i in ids[:3]]
    assert len(dm.test_set) == 4
    resize = dm.transform.transforms[0]
    assert resize.size == 256  # DeiT: 224 / 0.875 as in Evol-Q, not timm's 0.9


def test_image_folder_overrides_grey(tree: Path) -> None:
    dm = ImageNetDataModule(
        str(tree),
        input_size=(1, 28, 28),
        interpolation="bilinear",
        crop_pct=1.0,
        mean=(0.5,),
        std=(0.5,),
        calib_size=2,
    )
    x, _ = next(iter(dm.calib_dataloader()))
    assert x.shape == (2, 1, 28, 28) and x.min() >= -1.0 and x.max() <= 1.0
    with pytest.raises(ValueError, match="pass model_name= or set them explicitly"):
        ImageNetDataModule(str(tree), input_size=(1, 28, 28))


def test_image_folder_missing_root_and_split(tmp_path: Path, tree: Path) -> None:
    with pytest.raises(
        ValueError, match=r"ImageNet root .*nowhere does not exist; expected root/train/<class>"
    ):
        _folder_dm(tmp_path / "nowhere").setup("fit")
    (tree / "val").rename(tree / "validation")
    dm = _folder_dm(tree)
    dm.setup("fit")  # calibration needs only train
    with pytest.raises(
        ValueError, match="has no 'val' folder; expected root/train/<class>/<image> and root/val"
    ):
        dm.setup("test")


def test_image_folder_empty_class(tree: Path) -> None:
    (tree / "train" / "c2").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*c2 holds no images"):
        _folder_dm(tree).setup("fit")


def test_image_folder_calib_too_large(tree: Path) -> None:
    with pytest.raises(
        ValueError, match=r"train split has 10 items but calib_size \+ heldout_size = 8 \+ 3 = 11"
    ):
        _folder_dm(tree, calib_size=8, heldout_size=3).setup("fit")


def test_image_folder_corrupt_image(tree: Path) -> None:
    (tree / "train" / "c1" / "bad.jpg").write_bytes(b"this is not a JPEG")
    (tree / "val" / "c0" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=r"cannot read image .*train/c1/bad\.jpg .*on_bad_image='skip'"):
        _folder_dm(tree, calib_size=11).setup("fit")  # every train file is a candidate

    dm = _folder_dm(tree, calib_size=10, on_bad_image="skip")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) in the calibration/held-out draw"):
        dm.setup("fit")
    assert len(dm.calib_ids()) == 10 and "c1/bad.jpg" not in dm.calib_ids()
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) in the test split"):
        dm.setup("test")
    assert len(dm.test_set) == 4 and len(dm.skipped_images) == 2

    (tree / "train" / "c1" / "bad.jpg").unlink()
    with pytest.raises(ValueError, match=r"cannot read image .*val/c0/bad\.png"):
        _folder_dm(tree, calib_size=2).setup("test")


def test_datamodules_share_the_base() -> None:
    assert all(
        issubclass(c, CalibrationDataModule)
        for c in (DemoDataModule, FashionMNISTDataModule, ImageNetDataModule)
    )


def test_shipped_reference_model_matches_demo_preprocessing() -> None:
    """The demo tensors are normalized exactly as the reference model was trained (its accuracy holds on them)."""
    ckpt = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    meta = ckpt["meta"]
    assert meta["timm_name"] == "vit_tiny_patch16_224" and meta["model_kwargs"]["depth"] == 6
    assert (meta["input_mean"], meta["input_std"]) == (FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    model = timm.create_model(meta["timm_name"], pretrained=False, **meta["model_kwargs"]).eval()
    model.load_state_dict(ckpt["state_dict"])
    dm = DemoDataModule(test_batch_size=500)
    dm.setup("test")
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in dm.test_dataloader())
    top1 = 100.0 * correct / len(dm.test_set)  # first 2000 of the 10000 test images behind meta["fp_top1"]
    assert meta["fp_top1"] >= 80.0 and abs(top1 - meta["fp_top1"]) < 3.0
