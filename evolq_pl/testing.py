"""Small models for tests and scripts: a 3-block ViT trained on the shipped demo images, tiny random ViTs, and a toy
evaluator for the search engine.

The test suite and ``scripts/fault_injection.py`` both need a trained, non-degenerate transformer that builds in
seconds on a CPU; ``train_tiny_vit`` is the one recipe they share. ``unit_gain_vit`` is the untrained tiny ViT/DeiT
that the model and fast-path tests build. ``ToyEvaluator`` (with ``toy_engine``, ``run_search`` and
``through_checkpoint``) lets engine and strategy tests run and resume a whole search in milliseconds, with no model.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from evolq_pl.data import DemoDataModule
from evolq_pl.search.engine import SearchEngine
from evolq_pl.search.schedule import SearchConfig

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


@torch.no_grad()
def unit_gain_vit(name: str = "deit_tiny_patch16_224", seed: int = 0, depth: int = 2, **kwargs) -> nn.Module:
    """A tiny random timm ViT/DeiT (32 px, patch 8, width 48) whose signals propagate like a trained one's.

    timm's own init (std 0.02) makes attention so uniform and its contribution to the residual stream so small
    that after quantization the class token carries no image information at all; unit-gain weights and random
    LayerNorm affines avoid that.
    """
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, num_classes=10, embed_dim=48,
                              depth=depth, num_heads=3, **kwargs).eval()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0, m.in_features**-0.5)
            m.bias.normal_(0, 0.1)
        elif isinstance(m, nn.LayerNorm):
            m.weight.normal_(1, 0.2)
            m.bias.normal_(0, 0.2)
    model.cls_token.normal_(0, 1)
    if model.reg_token is not None:
        model.reg_token.normal_(0, 1)
    model.pos_embed.normal_(0, 0.5)
    return model


class ToyEvaluator:
    """A search engine ``Evaluator`` over plain vectors: blocks of scales (all 1 at first) whose fitness is their
    squared distance to a random target (lower is better). Evaluation ``k`` (1-based) returns nan if ``k`` is in
    ``poison``; scoring a block the engine has not started fails. Its "calibration set" is the coordinates in
    ``batches`` groups (i mod batches): scoring on a share of it sums the first groups only. Its per-coordinate
    ``local_errors`` measure the distance to a slightly different target, as a layer's error only proxies the
    model's; ``gradient`` is the fitness's exact one."""

    batches = 4

    def __init__(self, sizes: Sequence[int] = (5, 3, 4), seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.scales = [torch.ones(n) for n in sizes]
        self.targets = [1 + 0.1 * torch.randn(n, generator=gen) for n in sizes]
        self.local_targets = [t + 0.02 * torch.randn(len(t), generator=gen) for t in self.targets]
        self.started: list[int] = []
        self.ended: list[int] = []
        self.prepared: int | None = None
        self.calls = 0
        self.poison: set[int] = set()

    def start_block(self, block: int) -> None:
        self.started.append(block)
        self.prepared = block

    def end_block(self, block: int) -> None:
        self.ended.append(block)
        self.prepared = None

    def fitness(self, groups: int | None = None) -> float:
        pairs = zip(self.scales, self.targets, strict=True)
        keep = self.batches if groups is None else groups
        return float(sum((((s.double() - t.double()) ** 2)[torch.arange(len(s)) % self.batches < keep]).sum()
                         for s, t in pairs))

    def calibration_share(self, fraction: float) -> float:
        return max(1, round(fraction * self.batches)) / self.batches

    def evaluate_many(self, block: int, candidates: Sequence[torch.Tensor], fraction: float = 1.0) -> list[float]:
        if fraction == 1.0:
            return [self.evaluate(block, c) for c in candidates]
        groups = round(self.calibration_share(fraction) * self.batches)
        out = []
        for c in candidates:
            self.evaluate(block, c)
            out.append(math.nan if self.calls in self.poison else self.fitness(groups))
        return out

    def local_errors(self, block: int, candidates: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.prepared != block:
            raise AssertionError(f"block {block} screened, but the engine started {self.prepared}")
        target = self.local_targets[block].double()
        return torch.stack([(c.double() - target) ** 2 for c in candidates])

    def gradient(self, block: int, scales: torch.Tensor, fraction: float = 1.0) -> torch.Tensor:
        """The fitness's exact gradient on the share's coordinate groups (zero on the others)."""
        if self.prepared != block:
            raise AssertionError(f"block {block} differentiated, but the engine started {self.prepared}")
        groups = round(self.calibration_share(fraction) * self.batches)
        share = (torch.arange(len(scales)) % self.batches < groups).double()
        return (2 * (scales.double() - self.targets[block].double()) * share).float()

    def evaluate(self, block: int, scales: torch.Tensor) -> float:
        if self.prepared != block:
            raise AssertionError(f"block {block} scored, but the engine started {self.prepared}")
        self.apply(block, scales)
        self.calls += 1
        return math.nan if self.calls in self.poison else self.fitness()

    def apply(self, block: int, scales: torch.Tensor) -> None:
        self.scales[block] = scales.detach().clone().float()

    def get(self, block: int) -> torch.Tensor:
        return self.scales[block].clone()


TINY_RESNET_KWARGS = {"layers": (1, 1, 1, 1), "channels": (8, 16, 24, 32), "num_classes": 10}


@torch.no_grad()
def tiny_cnn(name: str = "resnet18", seed: int = 0, **kwargs) -> nn.Module:
    """A tiny random timm CNN (ResNet: one block per stage, widths 8-32; or any MobileNetV2 name) whose BatchNorms
    all matter: timm leaves BN statistics at (0, 1) and zeroes the gain of each residual branch's last BN, which
    would make BN folding untestable and every residual branch add nothing."""
    torch.manual_seed(seed)
    base = TINY_RESNET_KWARGS if name.startswith("resnet") else {"num_classes": 10}
    model = timm.create_model(name, pretrained=False, **{**base, **kwargs})
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.normal_(1, 0.3)
            m.bias.normal_(0, 0.3)
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2)
    return model.eval()


def toy_engine(config: SearchConfig, strategy: str, seed: int = 7, evaluator: ToyEvaluator | None = None,
               sizes: Sequence[int] = (5, 3, 4)) -> SearchEngine:
    """A search engine over a ``ToyEvaluator``'s blocks (every block's eps is ``config.eps``)."""
    return SearchEngine(len(sizes), [config.eps] * len(sizes), config, strategy, seed,
                        evaluator=evaluator or ToyEvaluator(sizes))


def run_search(engine: SearchEngine) -> list:
    """Step the engine to the end; returns each generation's report."""
    reports = []
    while not engine.done:
        reports.append(engine.step())
    return reports


def interrupt_and_resume(make_engine: Callable[..., SearchEngine], stop_after: int,
                         ) -> tuple[SearchEngine, list, SearchEngine, list]:
    """An uninterrupted search and one stopped after ``stop_after`` generations, its state taken through a checkpoint
    and resumed by a new engine of another seed over a new evaluator holding the stopped one's scales (as the model's
    quantizer buffers bring them back). ``make_engine(evaluator, seed=...)`` builds an engine; returns (reference,
    its reports, resumed engine, the reports before and after the stop)."""
    reference = make_engine()
    ref_reports = run_search(reference)
    first = make_engine()
    done = [first.step() for _ in range(stop_after)]
    scales = [first.evaluator.get(b) for b in range(len(first.evaluator.scales))]
    state = through_checkpoint(first.state_dict())
    evaluator = ToyEvaluator([len(values) for values in scales])
    for block, values in enumerate(scales):
        evaluator.apply(block, values)
    resumed = make_engine(evaluator, seed=123)  # another seed: everything must come from the checkpoint
    resumed.load_state_dict(state)
    return reference, ref_reports, resumed, done + run_search(resumed)


def fit_with_strategy(checkpoint: str, save_dir: str | Path, strategy: str, options: str, num_cycles: int,
                      batch_size: int):
    """``cli.py fit`` of the tiny ViT at ``checkpoint`` (W3A8, one pass) searched by ``strategy`` with its
    ``strategy_options`` (a YAML mapping), on 64 DemoDataModule calibration images in batches of ``batch_size``, no
    held-out split, on the CPU; returns the CLI object."""
    from evolq_pl.cli import cli_main  # here, so that importing the test helpers does not build the CLI

    return cli_main(["fit", "--model.model_name", "vit_tiny_patch16_224", "--model.checkpoint_path", checkpoint,
                     "--model.w_bits", "3", "--model.num_passes", "1", "--model.num_cycles", str(num_cycles),
                     "--model.strategy", strategy, "--model.strategy_options", options,
                     "--data", "evolq_pl.data.DemoDataModule", "--data.calib_size", "64", "--data.heldout_size", "0",
                     "--data.batch_size", str(batch_size), "--trainer.accelerator", "cpu",
                     "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save_dir)])


def through_checkpoint(state: dict) -> dict:
    """``state`` through torch.save/torch.load with weights_only, as a checkpoint file takes it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
