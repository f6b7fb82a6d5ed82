"""Today's search decisions, pinned bit for bit: the engine/strategy/adapter redesign (issue 14) must keep them.

The pins were computed with the code before that redesign (commit e3b6516). Float sums round differently with
another vector ISA or math library, so each pin belongs to the machine's numerics, told apart by the calibrated
model's fitness (which comes before any search decision): pins exist for an AMD EPYC with AVX-512 kernels, the same
held to AVX2 (``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2``) and an Intel Xeon
with AVX-512 kernels. On other numerics the test says how to add a pin from that commit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli import cli_main

ROOT = Path(__file__).resolve().parents[2]

CASES = {  # shipped weights, so that only the search's own arithmetic stands between the pin and the run
    "vit6": ["--model.model_name", "vit_tiny_patch16_224", "--model.checkpoint_path",
             str(ROOT / "checkpoints" / "vit6_fmnist.pth"), "--model.num_passes", "2"],
    "levit": ["--model.model_name", "levit_128s", "--model.checkpoint_path",
              str(ROOT / "checkpoints" / "levit_fmnist.pth"), "--model.num_passes", "1"],
}
IMAGE_SIZE = {"vit6": "28", "levit": "96"}

# case -> pins, one per machine's numerics: (sha256 of the searched scales, baseline fitness, final fitness, sha256
# of the child fitness trace, accepted trace)
PINS: dict[str, list[tuple[str, str, str, str, list[int]]]] = {
    "vit6": [
        ("1619383aa46af28b58a3e3c9af0c688cc0164c20c0474db051e03eeee7404f1c", "0x1.2fe66a0000000p+4",  # AMD AVX-512
         "0x1.2fd8b70000000p+4", "6fba0a6c2eea88adafe1e6105c76d7e46d5a532fb4d4f205086e27401d209de6",
         [0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0]),
        ("15b8b08ee5036144265081fc02e475be12035ed7a572e43c22752f9c4a4669c9", "0x1.2fe6750000000p+4",  # AMD AVX2
         "0x1.2fd9510000000p+4", "fd9de44c0e159faacb4ce909b1711a7284fe89fc5c496fcd80450e6385278b23",
         [0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0]),
        ("292fb43882f741272b00f71696e996a5687da233b6b7f0c0c60326265252eeab", "0x1.2fe67b0000000p+4",  # Intel AVX-512
         "0x1.2fd9f40000000p+4", "84c8474bdbc983ef38deffb30c3c93b2e7b054bf8655c6a258c4d0e66625bdae",
         [0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0]),
    ],
    "levit": [
        ("47e5efd58e42c471a5a136ccc32bde3420e217aef43ae6f9981714818ccef7a5", "0x1.306ef20000000p+4",  # AMD AVX-512
         "0x1.3066f80000000p+4", "b67dfda6b5744d8c085769d7e6ccd760c695479632c707de9cb44a7b9514c789",
         [0, 1, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1, 0]),
        ("4db86d12f9d5500f54b291b607a8cceb2c4256d8a4d92ff172c5f6043743e335", "0x1.306fe20000000p+4",  # AMD AVX2
         "0x1.3067540000000p+4", "9ffe6dccc541b3a06c6f09a556b4d292defe5f60a469e45f6e29189b0b1e1b99",
         [0, 0, 0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0]),
        ("4db86d12f9d5500f54b291b607a8cceb2c4256d8a4d92ff172c5f6043743e335", "0x1.306ecf0000000p+4",  # Intel AVX-512
         "0x1.3068160000000p+4", "caf80259771c5e0090ea75dfec599e44e2993dd4d4cd30f9d841a5412e455ed3",
         [0, 0, 0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0]),
    ],
}


def run_args(case: str, root: Path) -> list[str]:
    return [
        "fit", *CASES[case], "--model.pretrained", "false", "--model.w_bits", "3", "--model.population_size", "4",
        "--model.tournament_size", "3", "--model.num_cycles", "2", "--model.seed", "3",
        "--data", "evolq_pl.data.DemoDataModule", "--data.calib_size", "64", "--data.heldout_size", "0",
        "--data.batch_size", "32", "--data.image_size", IMAGE_SIZE[case], "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.logger.init_args.version", case,
    ]


def observed(case: str, root: Path) -> tuple[str, str, str, str, list[int]]:
    module = cli_main(run_args(case, root)).model
    scales = torch.cat([layer.weight_quantizer.scale.detach().reshape(-1).float() for block in module.blocks
                        for layer in block.layers])
    events = EventAccumulator(str(root / "evolq" / case))
    events.Reload()
    children = torch.tensor([s.value for s in events.Scalars("search/child_fitness")], dtype=torch.float32)
    accepted = [int(s.value) for s in events.Scalars("search/accepted")]
    return (hashlib.sha256(scales.numpy().tobytes()).hexdigest(), float(module.baseline_fitness).hex(),
            float(module.current_fitness).hex(), hashlib.sha256(children.numpy().tobytes()).hexdigest(), accepted)


@pytest.mark.parametrize("case", CASES)
def test_the_default_search_takes_the_pinned_decisions(case, tmp_path):
    got = observed(case, tmp_path)
    pins = [pin for pin in PINS[case] if pin[1] == got[1]]  # the pin of these numerics, by the baseline fitness
    if not pins:
        pytest.skip(f"no pin for this machine's numerics (baseline fitness {got[1]}): run observed({case!r}) with "
                    "commit e3b6516 here and add its result to PINS")
    assert got == pins[0]
