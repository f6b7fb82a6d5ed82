"""Calibration, held-out and test data for Evol-Q, as Lightning DataModules.

Clean protocol: the calibration set (the search's fitness data) and an optional held-out split (model selection)
are drawn from the TRAIN split; the test split is only ever read by the test loop.
"""

from __future__ import annotations

import gzip
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "CalibrationDataModule",
    "DemoDataModule",
    "FashionMNISTDataModule",
    "GenerationTicks",
    "ImageNetDataModule",
    "read_idx",
]

FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
DEMO_SET = Path(__file__).resolve().parent / "assets" / "demo_fmnist.npz"

# IDX type codes (third byte of the magic number) -> numpy big-endian dtypes.
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST format, optionally gzip-compressed) into a numpy array.

    Own reader so that the Debian copy of Fashion-MNIST needs no download helper; it checks the magic number and
    the payload size so that a corrupt or truncated file fails loudly instead of yielding garbage images.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            gzipped = fh.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gzipped else path.open("rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError; a cut gzip stream raises EOFError
        raise ValueError(f"cannot read IDX file {path}: {err}; re-install or re-download it") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()}); check the file name")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is truncated inside its header; re-install or re-download it")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"IDX file {path} holds {len(raw) - header} data bytes but its header {shape} needs {expected}; "
            "the file is truncated or corrupt, re-install or re-download it"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


class GenerationTicks:
    """Yields 0..n-1, one int per evolutionary generation of an epoch: the training loop's clock.

    The search reads the calibration data itself, so Lightning's training loop only needs a clock. It is a plain
    iterable, not a DataLoader, so Lightning never injects a DistributedSampler (under DDP every rank runs every
    generation) and knows the epoch's length. Lightning saves and restores its position with the checkpoint: every
    iteration starts at 0, except the first one after :meth:`load_state_dict`, which continues a saved epoch.
    """

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"generations_per_epoch must be >= 1, got {n}")
        self.n = n
        self.position = 0  # ticks handed out in the current iteration
        self._resume_at = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        start, self._resume_at = self._resume_at, 0
        self.position = start
        for tick in range(start, self.n):
            self.position = tick + 1
            yield tick

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        position = int(state["position"])
        if not 0 <= position <= self.n:
            raise ValueError(
                f"tick position {position} is outside 0..{self.n}; the checkpoint used another generations_per_epoch"
            )
        self.position = position
        self._resume_at = position if position < self.n else 0  # a finished epoch resumes with a fresh one


class CalibrationDataModule(LightningDataModule, ABC):
    """Calibration, held-out and test loaders under the clean protocol.

    Calibration is ``calib_size`` items of the TRAIN split drawn by a permutation seeded with ``seed`` (fixed order),
    held-out is the next ``heldout_size`` items of the same permutation; the test split feeds only the test loop.
    """

    def __init__(
        self,
        calib_size: int = 1000,
        heldout_size: int = 0,
        batch_size: int = 100,
        test_batch_size: int = 100,
        num_workers: int = 0,
        seed: int = 0,
        generations_per_epoch: int = 3,
    ) -> None:
        """Store the options; no data is read before setup().

        Args:
            calib_size: number of calibration images drawn from the train split (Evol-Q: 1000).
            heldout_size: number of held-out train images for model selection (0: no validation loop).
            batch_size: calibration batch size (Evol-Q: 100, so 10 fitness batches).
            test_batch_size: batch size of the evaluation loaders (held-out and test).
            num_workers: DataLoader worker processes for the image loaders.
            seed: seed of the permutation that picks calibration and held-out items.
            generations_per_epoch: evolutionary generations (training steps) per Lightning epoch: the model's
                num_cycles (cli.py links the two).
        """
        super().__init__()
        for name, value, low in (
            ("calib_size", calib_size, 1),
            ("heldout_size", heldout_size, 0),
            ("batch_size", batch_size, 1),
            ("test_batch_size", test_batch_size, 1),
            ("num_workers", num_workers, 0),
            ("generations_per_epoch", generations_per_epoch, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}; pass {name}={low} or more")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.calib_size = calib_size
        self.heldout_size = heldout_size
        self.batch_size = batch_size
        self.test_batch_size = test_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.generations_per_epoch = generations_per_epoch
        self.calib_set: Dataset | None = None
        self.heldout_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._calib_index: list[int] = []
        self._heldout_index: list[int] = []
        self._train: Dataset | None = None
        self.save_hyperparameters(logger=False)  # config.yaml records them; logging would clash with model.seed

    # -- what a subclass provides -------------------------------------------------------------------------------
    @abstractmethod
    def _load_train(self) -> Dataset:
        """The full train split (cheap to build: items load lazily)."""

    @abstractmethod
    def _load_test(self) -> Dataset:
        """The full test split."""

    @abstractmethod
    def _item_id(self, index: int) -> str:
        """Stable identifier of train item ``index`` (relative file path, or ``split:index``)."""

    def _pick(self, train: Dataset, order: list[int], count: int) -> list[int]:
        """The first ``count`` usable items of ``order``; image folders override this to skip bad files."""
        return order[:count]

    # -- Lightning hooks ------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Draw calibration and held-out items from train; load the test split only for the test stage."""
        self._setup_splits()
        if stage in ("test", None) and self.test_set is None:
            self.test_set = self._load_test()

    def _setup_splits(self) -> None:
        if self.calib_set is not None:
            return
        train = self._load_train()
        need = self.calib_size + self.heldout_size
        if len(train) < need:
            raise ValueError(
                f"the train split has {len(train)} items but calib_size + heldout_size = {self.calib_size} + "
                f"{self.heldout_size} = {need}; lower calib_size/heldout_size or use a larger train split"
            )
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
        chosen = self._pick(train, order, need)
        self._train = train
        self._calib_index = chosen[: self.calib_size]
        self._heldout_index = chosen[self.calib_size :]
        self.calib_set = Subset(train, self._calib_index)
        self.heldout_set = Subset(train, self._heldout_index)

    def calib_ids(self) -> list[str]:
        """Identifiers of the calibration items in loader order, to store with a run and compare across runs."""
        self._setup_splits()
        return [self._item_id(i) for i in self._calib_index]

    def heldout_ids(self) -> list[str]:
        """Identifiers of the held-out items in loader order."""
        self._setup_splits()
        return [self._item_id(i) for i in self._heldout_index]

    def calib_dataloader(self) -> DataLoader:
        """Calibration batches in a fixed order; the last batch may be smaller (no item is dropped)."""
        self._setup_splits()
        return self._loader(self.calib_set, self.batch_size)

    def train_dataloader(self) -> GenerationTicks:
        """One tick per generation; the search itself iterates :meth:`calib_dataloader`."""
        return GenerationTicks(self.generations_per_epoch)

    def val_dataloader(self) -> DataLoader | list:
        """The held-out train items; an empty list (Lightning then skips validation) when heldout_size is 0."""
        self._setup_splits()
        if self.heldout_size == 0:
            return []
        return self._loader(self.heldout_set, self.test_batch_size, evaluation=True)

    def test_dataloader(self) -> DataLoader:
        """The test split, read only by the test loop."""
        if self.test_set is None:
            self.test_set = self._load_test()
        return self._loader(self.test_set, self.test_batch_size, evaluation=True)

    def _loader(self, dataset: Dataset, batch_size: int, evaluation: bool = False) -> DataLoader:
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        sampler = _EveryItemOnce(dataset, world, trainer.global_rank) if evaluation and world > 1 else None
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=self.num_workers,
            sampler=sampler,
        )


class _EveryItemOnce(DistributedSampler):
    """Each process's share of an evaluation split, every item exactly once over all processes.

    Lightning's own DistributedSampler pads the shares to equal length with repeated items, which counts them twice
    in a held-out or test top-1; Lightning leaves a DistributedSampler the loader already has in place.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = range(rank, len(dataset), num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ---------------------------------------------------------------------------------------------------------------
# Image folders (ImageNet layout)


def calibration_batches(datamodule: Any) -> list[torch.Tensor]:
    """The calibration images of a ``CalibrationDataModule`` as a list of batches (labels dropped)."""
    if datamodule is None or not hasattr(datamodule, "calib_dataloader"):
        raise RuntimeError("EvolQModule needs a CalibrationDataModule (data: in the config) for its calibration set")
    batches = [b[0] if isinstance(b, list | tuple) else b for b in datamodule.calib_dataloader()]
    if not batches:
        raise ValueError("the calibration loader yielded no batches: give calib_size >= 1")
    return batches


class _ImageList(Dataset):
    """(path, label) pairs decoded with PIL; a failing file raises an error that names it."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Any, mode: str) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as raw:
                img = raw.convert(self.mode)
        except (OSError, ValueError, SyntaxError) as err:
            raise ValueError(f"cannot decode image {path} ({err}); remove or replace the file") from err
        return self.transform(img), label


def _image_problem(path: str, decode: bool) -> str | None:
    """Why ``path`` is unusable (None if fine); ``decode`` reads all pixels, else only the header is checked."""
    try:
        with Image.open(path) as img:
            if decode:
                img.load()
            else:
                img.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"
    return None


class ImageNetDataModule(CalibrationDataModule):
    """ImageNet as ImageFolder trees ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``.

    Preprocessing defaults to Evol-Q's for ``model_name`` (see :func:`evolq_pl.models.preprocessing.preprocessing_for`);
    any field can be overridden. The transform is deterministic (resize, center crop) for every split.
    """

    def __init__(
        self,
        root: str,
        model_name: str | None = None,
        input_size: tuple[int, int, int] | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        on_bad_image: Literal["skip", "fail"] = "fail",
        calib_size: int = 1000,
        heldout_size: int = 0,
        batch_size: int = 100,
        test_batch_size: int = 100,
        num_workers: int = 0,
        seed: int = 0,
        generations_per_epoch: int = 3,
    ) -> None:
        """Store the options; no data is read before setup().

        Args:
            root: folder holding ``train/`` and ``val/`` (one sub-folder per class in each).
            model_name: timm model name (with tag) whose preprocessing to use.
            input_size: (C, H, W) override; C is 3 (RGB) or 1 (grey).
            interpolation: resize interpolation override (e.g. bicubic).
            crop_pct: override; the shorter side is resized to int(H / crop_pct) before the center crop.
            mean: per-channel normalization mean override.
            std: per-channel normalization std override.
            on_bad_image: "fail" stops at an unreadable image naming it; "skip" leaves it out and warns with the count.
            calib_size: number of calibration images drawn from the train split (Evol-Q: 1000).
            heldout_size: number of held-out train images for model selection (0: no validation loop).
            batch_size: calibration batch size (Evol-Q: 100, so 10 fitness batches).
            test_batch_size: batch size of the evaluation loaders (held-out and test).
            num_workers: DataLoader worker processes.
            seed: seed of the permutation that picks calibration and held-out items.
            generations_per_epoch: evolutionary generations (training steps) per Lightning epoch: the model's
                num_cycles (cli.py links the two).
        """
        super().__init__(
            calib_size, heldout_size, batch_size, test_batch_size, num_workers, seed, generations_per_epoch
        )
        if on_bad_image not in ("skip", "fail"):
            raise ValueError(f"on_bad_image must be 'skip' or 'fail', got {on_bad_image!r}")
        from evolq_pl.models.preprocessing import preprocessing_for

        pre: dict[str, Any] = preprocessing_for(model_name) if model_name is not None else {}
        given = {
            "input_size": input_size,
            "interpolation": interpolation,
            "crop_pct": crop_pct,
            "mean": mean,
            "std": std,
        }
        pre.update({k: v for k, v in given.items() if v is not None})
        missing = [k for k in given if k not in pre]
        if missing:
            raise ValueError(
                f"no preprocessing for {', '.join(missing)}; pass model_name= or set them explicitly"
            )
        size = tuple(int(v) for v in pre["input_size"])
        if len(size) != 3 or size[0] not in (1, 3):
            raise ValueError(f"input_size must be (C, H, W) with C 1 or 3, got {pre['input_size']!r}")
        if len(pre["mean"]) != size[0] or len(pre["std"]) != size[0]:
            raise ValueError(
                f"mean and std need {size[0]} values (one per channel), got {pre['mean']} / {pre['std']}"
            )
        if not 0.0 < float(pre["crop_pct"]) <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {pre['crop_pct']}")
        self.preprocessing = {**pre, "input_size": size}
        self.root = Path(root)
        self.on_bad_image = on_bad_image
        self.skipped_images: list[str] = []
        self._classes: list[str] | None = None
        self.transform = self._build_transform()

    def _build_transform(self) -> Any:
        """timm's eval transform: resize the shorter side to floor(H / crop_pct), center crop, to tensor, normalize.

        That is Evol-Q's transform (PIL resize, same size for the crop_pcts in use).
        """
        from timm.data import create_transform

        p = self.preprocessing
        return create_transform(
            p["input_size"],
            is_training=False,
            interpolation=p["interpolation"],
            crop_pct=p["crop_pct"],
            crop_mode="center",
            mean=tuple(p["mean"]),
            std=tuple(p["std"]),
        )

    @property
    def _mode(self) -> str:
        return "RGB" if self.preprocessing["input_size"][0] == 3 else "L"

    def _scan(self, split: str) -> list[tuple[str, int]]:
        layout = "expected root/train/<class>/<image> and root/val/<class>/<image> (ImageFolder layout)"
        if not self.root.is_dir():
            raise ValueError(f"ImageNet root {self.root} does not exist; {layout}")
        folder = self.root / split
        if not folder.is_dir():
            raise ValueError(f"ImageNet root {self.root} has no '{split}' folder; {layout}")
        try:
            classes, class_to_idx = find_classes(folder)
        except FileNotFoundError as err:
            raise ValueError(f"{folder} holds no class folders; {layout}") from err
        if split == "train":
            self._classes = classes  # train fixes the labels; val must have the same class folders
        elif classes != self._classes:
            extra = sorted(set(classes) ^ set(self._classes))[:5]
            raise ValueError(
                f"{folder} has other class folders than train (e.g. {extra}); both splits need the same classes"
            )
        samples = make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        counts = np.bincount([label for _, label in samples], minlength=len(classes))
        empty = [classes[i] for i in np.flatnonzero(counts == 0)]
        if empty:
            raise ValueError(
                f"class folder {folder / empty[0]} holds no images ({len(empty)} empty class folder(s) in {folder}); "
                f"add images ({', '.join(IMG_EXTENSIONS)}) or remove the folder"
            )
        return samples

    def _bad(self, path: str, problem: str) -> None:
        if self.on_bad_image == "fail":
            raise ValueError(
                f"cannot read image {path} ({problem}); remove or replace it, or pass on_bad_image='skip'"
            )
        self.skipped_images.append(path)

    def _load_train(self) -> Dataset:
        return _ImageList(self._scan("train"), self.transform, self._mode)

    def _pick(self, train: Dataset, order: list[int], count: int) -> list[int]:
        """Decode candidates in permutation order and keep the first ``count`` readable ones."""
        assert isinstance(train, _ImageList)
        skipped_before = len(self.skipped_images)
        chosen: list[int] = []
        for index in order:
            if len(chosen) == count:
                break
            path = train.samples[index][0]
            problem = _image_problem(path, decode=True)
            if problem is None:
                chosen.append(index)
            else:
                self._bad(path, problem)
        if len(chosen) < count:
            raise ValueError(
                f"only {len(chosen)} readable train images but calib_size + heldout_size = {count}; "
                "lower calib_size/heldout_size or repair the train folder"
            )
        self._warn_skipped(skipped_before, "calibration/held-out draw from train")
        return chosen

    def _load_test(self) -> Dataset:
        if self._classes is None:
            self._scan("train")  # fixes the class list (labels) from train
        samples = self._scan("val")
        skipped_before = len(self.skipped_images)
        good = []
        for path, label in samples:
            problem = _image_problem(path, decode=False)
            if problem is None:
                good.append((path, label))
            else:
                self._bad(path, problem)
        self._warn_skipped(skipped_before, "test split (val/)")
        return _ImageList(good, self.transform, self._mode)

    def _warn_skipped(self, before: int, where: str) -> None:
        new = self.skipped_images[before:]
        if new:
            rank_zero_warn(
                f"skipped {len(new)} unreadable image(s) in the {where}, e.g. {new[0]}; "
                "the list is in ImageNetDataModule.skipped_images"
            )

    def _item_id(self, index: int) -> str:
        assert isinstance(self._train, _ImageList)
        return Path(self._train.samples[index][0]).relative_to(self.root / "train").as_posix()


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST (full, from IDX files) and the embedded demo subset


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of [N, C, H, W] (or [C, H, W]) images to size x size, e.g. 28 px Fashion-MNIST for LeViT."""
    single = x.dim() == 3
    out = torch.nn.functional.interpolate(x[None] if single else x, size=(size, size), mode="bilinear",
                                          align_corners=False)
    return out[0] if single else out


class _ArrayImages(Dataset):
    """uint8 [N, H, W] images -> normalized float [1, H, W] tensors (optionally resized), int labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int | None = None) -> None:
        if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(
                f"expected uint8 images [N, H, W] and N labels, got {images.shape} {images.dtype} / {labels.shape}"
            )
        self.images = images
        self.labels = labels.astype(np.int64)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.images[index]).to(torch.float32).div_(255.0).unsqueeze(0)
        if self.image_size is not None and self.image_size != x.shape[-1]:
            x = resize_images(x, self.image_size)
        x = x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
        return x, int(self.labels[index])


class _ArrayDataModule(CalibrationDataModule):
    """Shared part of the array-backed modules: ids are ``train:<index in full Fashion-MNIST train>``."""

    _train_source_index: np.ndarray | None = None
    image_size: int | None = None  # resize the 28 px images (models with larger inputs, e.g. LeViT)

    @abstractmethod
    def _arrays(self, split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of a split."""

    def _load_train(self) -> Dataset:
        return _ArrayImages(*self._arrays("train"), self.image_size)

    def _load_test(self) -> Dataset:
        return _ArrayImages(*self._arrays("test"), self.image_size)

    def _set_image_size(self, image_size: int | None) -> None:
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        self.image_size = image_size

    def _item_id(self, index: int) -> str:
        source = index if self._train_source_index is None else int(self._train_source_index[index])
        return f"train:{source}"


class FashionMNISTDataModule(_ArrayDataModule):
    """Full Fashion-MNIST from its gzip IDX files (60k train for calibration/held-out, t10k as the test split)."""

    FILES = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }

    def __init__(
        self,
        root: str = DEFAULT_FASHION_MNIST_ROOT,
        calib_size: int = 1000,
        heldout_size: int = 0,
        batch_size: int = 100,
        test_batch_size: int = 100,
        num_workers: int = 0,
        seed: int = 0,
        generations_per_epoch: int = 3,
        image_size: int | None = None,
    ) -> None:
        """Store the options; no data is read before setup().

        Args:
            root: folder with train-/t10k- images/labels IDX .gz files (Debian: apt-get install dataset-fashion-mnist).
            calib_size: number of calibration images drawn from the train split.
            heldout_size: number of held-out train images for model selection (0: no validation loop).
            batch_size: calibration batch size.
            test_batch_size: batch size of the evaluation loaders (held-out and test).
            num_workers: DataLoader worker processes.
            seed: seed of the permutation that picks calibration and held-out items.
            generations_per_epoch: evolutionary generations (training steps) per Lightning epoch: the model's
                num_cycles (cli.py links the two).
            image_size: resize the 28 px images to this side (bilinear), for models with larger inputs.
        """
        super().__init__(
            calib_size, heldout_size, batch_size, test_batch_size, num_workers, seed, generations_per_epoch
        )
        self._set_image_size(image_size)
        self.root = Path(root)

    def _arrays(self, split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray]:
        paths = [self.root / name for name in self.FILES[split]]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise ValueError(
                f"Fashion-MNIST file(s) {', '.join(missing)} not found in {self.root}; "
                "run `apt-get install dataset-fashion-mnist` or pass root= to the folder holding them"
            )
        images, labels = (read_idx(p) for p in paths)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{paths[0]} and {paths[1]} do not match ({images.shape} images, {labels.shape} labels)"
            )
        return images, labels


class DemoDataModule(_ArrayDataModule):
    """The small Fashion-MNIST subset shipped in the package, so the demo and tests need no dataset install.

    4000 train images (seed 0 draw from the 60k) and the first 2000 of t10k; see scripts/make_demo_set.py.
    """

    def __init__(
        self,
        path: str | None = None,
        calib_size: int = 500,
        heldout_size: int = 500,
        batch_size: int = 100,
        test_batch_size: int = 100,
        num_workers: int = 0,
        seed: int = 0,
        generations_per_epoch: int = 3,
        image_size: int | None = None,
    ) -> None:
        """Store the options; no data is read before setup().

        Args:
            path: .npz demo set (default: the one inside the package).
            calib_size: number of calibration images drawn from the demo train part.
            heldout_size: number of held-out demo train images for model selection (0: no validation loop).
            batch_size: calibration batch size.
            test_batch_size: batch size of the evaluation loaders (held-out and test).
            num_workers: DataLoader worker processes.
            seed: seed of the permutation that picks calibration and held-out items.
            generations_per_epoch: evolutionary generations (training steps) per Lightning epoch: the model's
                num_cycles (cli.py links the two).
            image_size: resize the 28 px images to this side (bilinear), for models with larger inputs.
        """
        super().__init__(
            calib_size, heldout_size, batch_size, test_batch_size, num_workers, seed, generations_per_epoch
        )
        self._set_image_size(image_size)
        self.path = Path(path) if path is not None else DEMO_SET
        self._npz: dict[str, np.ndarray] | None = None

    def _arrays(self, split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray]:
        if self._npz is None:
            if not self.path.is_file():
                raise ValueError(f"demo set {self.path} not found; recreate it with scripts/make_demo_set.py")
            try:
                with np.load(self.path) as npz:
                    self._npz = {k: npz[k] for k in npz.files}
            except (OSError, ValueError, EOFError) as err:
                raise ValueError(
                    f"cannot read demo set {self.path} ({err}); recreate it with scripts/make_demo_set.py"
                ) from err
            keys = {"train_images", "train_labels", "train_source_index", "test_images", "test_labels"}
            if not keys <= set(self._npz):
                raise ValueError(
                    f"demo set {self.path} lacks {sorted(keys - set(self._npz))}; recreate it with scripts/make_demo_set.py"
                )
            self._train_source_index = self._npz["train_source_index"]
        return self._npz[f"{split}_images"], self._npz[f"{split}_labels"]
