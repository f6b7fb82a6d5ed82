"""EvolQModule under a real Lightning Trainer, on the trained tiny ViT and the shipped demo images."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision

from evolq_pl.callbacks import CheckpointAfterHeldout
from evolq_pl.checkpointing import GenerationCounter
from evolq_pl.data import DemoDataModule
from evolq_pl.module import EvolQModule
from evolq_pl.quant.fused import fused_enabled, fused_kernels
from evolq_pl.quant.modes import calibrate, quantization_disabled
from evolq_pl.search.engine import GRADIENT_COST, same_state
from evolq_pl.search.scales import ScaleVector
from evolq_pl.trainer import quantized_model_for

CKPT: str = ""


@pytest.fixture(autouse=True, scope="module")
def _trained(tiny_vit_checkpoint):
    global CKPT
    CKPT = tiny_vit_checkpoint


def make_module(**overrides) -> EvolQModule:
    args = {"model_name": "vit_tiny_patch16_224", "checkpoint_path": CKPT, "w_bits": 3,
            "num_passes": 2, "population_size": 4, "tournament_size": 3, "num_cycles": 2, "seed": 0}
    args.update(overrides)
    return EvolQModule(**args)


def make_data(module: EvolQModule, **overrides) -> DemoDataModule:
    args = {"calib_size": 64, "heldout_size": 0, "batch_size": 32, "test_batch_size": 100,
            "generations_per_epoch": module.hparams.num_cycles}  # an epoch is one block visit
    args.update(overrides)
    return DemoDataModule(**args)


def make_trainer(tmp_path, module: EvolQModule, **overrides) -> Trainer:
    args = {"accelerator": "cpu", "devices": 1, "default_root_dir": tmp_path, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "inference_mode": False, "enable_checkpointing": False, "max_epochs": module.engine.num_visits}
    args.update(overrides)
    return Trainer(**args)


class Recorder(Callback):
    """Records the visited block per epoch and the model's fitness after each generation."""

    def __init__(self) -> None:
        self.blocks: list[int] = []
        self.fitness: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.blocks.append(pl_module.engine.schedule[trainer.current_epoch])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.fitness.append(pl_module.current_fitness)


def search_scales(module: EvolQModule) -> list[torch.Tensor]:
    return [layer.weight_quantizer.scale.clone() for b in module.blocks for layer in b.layers]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One finished search shared by the read-only tests below."""
    tmp = tmp_path_factory.mktemp("search")
    module, rec = make_module(), Recorder()
    start = make_module()
    trainer = make_trainer(tmp, module, callbacks=[rec])
    trainer.fit(module, datamodule=make_data(module))
    calibrate(start.qmodel, module._calib)  # the calibrated baseline the search started from
    return module, rec, trainer, start


def test_schedule_visits_blocks_last_to_first_for_each_pass(searched):
    module, rec, trainer, _ = searched
    assert rec.blocks == [2, 1, 0, 2, 1, 0]
    assert trainer.current_epoch == 6
    assert trainer.global_step == 6 * 2  # one step per generation, counted without an optimizer


def test_search_never_increases_calibration_fitness(searched):
    module, rec, _, _ = searched
    assert all(b <= a for a, b in zip(rec.fitness, rec.fitness[1:], strict=False))
    assert rec.fitness[-1] <= module.engine.state.visit_start_fitness


def test_search_changes_only_attention_weight_scales(searched):
    module, _, _, start = searched
    changed = [not torch.equal(a, b) for a, b in zip(search_scales(module), search_scales(start), strict=True)]
    assert any(changed)
    searched_names = {f"blocks.{i}.attn.{n}.weight_quantizer.scale" for i in range(3) for n in ("qkv", "proj")}
    for (name, p), (_, q) in zip(module.qmodel.named_buffers(), start.qmodel.named_buffers(), strict=True):
        if name not in searched_names and "observer" not in name:
            assert torch.equal(p, q), name


def test_suffix_fitness_equals_full_model_fitness(searched):
    module, _, _, _ = searched
    evaluator, block = module.engine.evaluator, 1
    evaluator.start_block(block)
    suffix = evaluator.fitness(block)
    evaluator.end_block(block)
    with torch.no_grad():
        full = [module.fitness_fn(module.qmodel(x), t) for x, t in zip(evaluator.batches, evaluator.teachers,
                                                                         strict=True)]
    assert suffix == pytest.approx(float(torch.stack(full).mean()), rel=1e-6)


def test_same_seed_same_scales_different_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        module = make_module(seed=seed, num_passes=1)
        make_trainer(tmp_path / name, module).fit(module, datamodule=make_data(module))
        runs[name] = search_scales(module)
    assert all(torch.equal(x, y) for x, y in zip(runs["a"], runs["b"], strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(runs["a"], runs["c"], strict=True))


def test_original_teacher_keeps_integer_layernorm(searched):
    module, _, _, _ = searched
    x = module._calib[0]
    with torch.no_grad(), quantization_disabled(module.qmodel):
        fp = module.qmodel(x)
    with torch.no_grad(), quantization_disabled(module.qmodel, keep_int_norm=True):
        quirk = module.qmodel(x)
    assert not torch.allclose(fp, quirk)


def test_checkpoint_holds_quantizer_state_and_restores_the_searched_model(tmp_path):
    module = make_module(num_passes=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = make_trainer(tmp_path, module, callbacks=[ckpt], enable_checkpointing=True)
    trainer.fit(module, datamodule=make_data(module))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert all("quantizer" in k or ".q_" in k or k.startswith("qmodel.q_") for k in saved["state_dict"])
    assert saved["evolq"]["search"]["strategy"]["population"] is not None
    fresh = make_module(num_passes=1)
    result = make_trainer(tmp_path, fresh).test(fresh, datamodule=make_data(fresh), ckpt_path=tmp_path / "last.ckpt")
    expected = make_trainer(tmp_path, module).test(module, datamodule=make_data(module))
    assert result[0]["test/top1"] == pytest.approx(expected[0]["test/top1"])
    for a, b in zip(search_scales(fresh), search_scales(module), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_of_another_bit_width_is_refused(tmp_path):
    module = make_module(num_passes=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    make_trainer(tmp_path, module, callbacks=[ckpt], enable_checkpointing=True).fit(module,
                                                                                   datamodule=make_data(module))
    other = make_module(num_passes=1, w_bits=4)
    with pytest.raises(ValueError, match="another run"):
        make_trainer(tmp_path, other).test(other, datamodule=make_data(other), ckpt_path=tmp_path / "last.ckpt")


def test_search_stem_and_head_search_the_patch_embedding_and_the_head_first_in_every_pass(tmp_path):
    module, rec = make_module(num_passes=1, num_cycles=1, search_stem=True, search_head=True), Recorder()
    start = make_module(num_passes=1, num_cycles=1, search_stem=True, search_head=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    make_trainer(tmp_path, module, callbacks=[rec, ckpt], enable_checkpointing=True).fit(
        module, datamodule=make_data(module))
    depth = len(module.qmodel.blocks)
    assert [module.blocks[b].name for b in rec.blocks] == ["stem", "head", *(f"blocks.{i}" for i in
                                                                             reversed(range(depth)))]
    calibrate(start.qmodel, module._calib)
    changed = {n.rsplit(".", 2)[0] for (n, p), (_, q) in zip(module.qmodel.named_buffers(),
                                                              start.qmodel.named_buffers(), strict=True)
               if "observer" not in n and not torch.equal(p, q)}
    assert changed & {"patch_proj", "head"}  # the search moved the ends' scales
    plain = make_module(num_passes=1, num_cycles=1)
    with pytest.raises(ValueError, match=r"another run: .*'search_head': \(True, None\)"):
        make_trainer(tmp_path, plain).test(plain, datamodule=make_data(plain), ckpt_path=tmp_path / "last.ckpt")


def test_a_joint_search_moves_every_blocks_and_the_heads_scales_in_each_visit(tmp_path):
    module = make_module(num_passes=2, num_cycles=1, search_head=True, search_jointly=True, strategy="gradient",
                         fitness="kl")
    start = make_module(num_passes=2, num_cycles=1, search_head=True, search_jointly=True)
    assert [b.name for b in module.blocks] == ["all"] and module.engine.num_visits == 2
    make_trainer(tmp_path, module).fit(module, datamodule=make_data(module))
    calibrate(start.qmodel, module._calib)
    changed = {n.rsplit(".", 2)[0] for (n, p), (_, q) in zip(module.qmodel.named_buffers(),
                                                              start.qmodel.named_buffers(), strict=True)
               if "observer" not in n and not torch.equal(p, q)}
    depth = len(module.qmodel.blocks)
    assert changed == {"head", *(f"blocks.{i}.attn.{n}" for i in range(depth) for n in ("qkv", "proj"))}
    assert module.current_fitness < module.baseline_fitness


def test_the_stem_named_in_mutation_units_gets_mutations_and_the_joint_unit_the_gradient(tmp_path):
    """The module tells the engine its unit names, so ``mutation_units: {stem: 3}`` reaches the stem's visits, whose
    mutations are screened by the patch embedding's layer-local errors (``screen``: no evaluation counted)."""
    options = {"mutation_units": {"stem": 3}, "adapt": True, "screen": 4}
    module = make_module(num_passes=2, num_cycles=1, search_head=True, search_jointly=True, search_stem=True,
                         strategy="gradient", fitness="kl", eps=0.01, relative_mutation=True,
                         strategy_options=options)
    assert [b.name for b in module.blocks] == ["all", "stem"]
    make_trainer(tmp_path, module).fit(module, datamodule=make_data(module))
    assert module.engine.state.evaluations == 1 + 2 * 3 + 2 * (GRADIENT_COST + 2)
    assert module.current_fitness < module.baseline_fitness
    with pytest.raises(ValueError, match="mutation_units names stem, .*its units are all "):
        make_module(search_jointly=True, strategy="gradient", num_cycles=1, strategy_options=options)


def test_local_grid_gives_each_unit_one_locally_best_candidate_first_through_the_module(tmp_path):
    """``local_grid`` reaches the real evaluator's layer-local errors (the stem's convolution and the joint unit's
    linear layers): each unit's first generation scores one candidate, whose local error is no higher than the
    calibrated scales', and the search goes on with mutations and steps."""
    module = make_module(num_passes=2, num_cycles=1, search_head=True, search_jointly=True, search_stem=True,
                         strategy="gradient", fitness="kl", eps=0.01, relative_mutation=True,
                         strategy_options={"mutation_units": {"stem": 3}, "local_grid": [0.6, 0.8, 1.2]})
    recorded: list[tuple[str, int, float, float]] = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            engine = pl_module.engine
            strategy, ask = engine.state.strategy, type(engine.state.strategy).ask

            def spy(rng):
                candidates = ask(strategy, rng)
                if strategy.gridding:
                    errors = strategy.local_errors([strategy.best()[0], candidates[0]]).sum(dim=1)
                    recorded.append((strategy.unit, len(candidates), float(errors[0]), float(errors[1])))
                return candidates
            strategy.ask = spy

    make_trainer(tmp_path, module, callbacks=[Record()]).fit(module, datamodule=make_data(module))
    assert [(unit, count) for unit, count, _, _ in recorded] == [("stem", 1), ("all", 1)]
    assert all(after < before for _, _, before, after in recorded)
    assert module.engine.state.evaluations == 1 + 2 + 3 + (GRADIENT_COST + 2)
    assert module.current_fitness <= module.baseline_fitness


def test_fitness_options_all_run(tmp_path):
    for fitness in ("mse", "kl", "cosine"):
        module = make_module(num_passes=1, fitness=fitness)
        make_trainer(tmp_path / fitness, module).fit(module, datamodule=make_data(module, calib_size=32))
        assert math.isfinite(module.current_fitness)


class HeldoutRecorder(Callback):
    """The held-out top-1 of each validation during a fit and the scales it was measured on."""

    def __init__(self) -> None:
        self.top1: list[float] = []
        self.scales: list[list[torch.Tensor]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.top1.append(float(trainer.callback_metrics["heldout/top1"]))
        self.scales.append(pl_module.engine.snapshot())


class SpoilScales(Callback):
    """Before visit ``epoch`` starts, triples every searched scale: the held-out top-1 of that visit and the later
    ones falls far below the earlier ones on any CPU, so the best held-out visit is not the last one."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            for scales in (ScaleVector(block.layers) for block in pl_module.blocks):
                scales.set(scales.get() * 3)


def test_heldout_selection_keeps_the_best_visit_even_when_it_is_not_the_last(tmp_path):
    module = make_module(num_passes=2, selection="heldout", w_bits=2, eps=3e-3)
    rec = HeldoutRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    make_trainer(tmp_path, module, callbacks=[SpoilScales(epoch=2), rec, ckpt, CheckpointAfterHeldout()],
                 enable_checkpointing=True).fit(
        module, datamodule=make_data(module, heldout_size=200))
    assert len(rec.top1) == module.engine.num_visits  # validated after every visit
    best = rec.top1.index(max(rec.top1))  # the first of equal scores is kept
    assert best < len(rec.top1) - 1 and rec.top1[-1] < rec.top1[best], rec.top1  # the case this test is about
    state = module.engine.state
    assert state.best_heldout == rec.top1[best]
    restored = module.engine.snapshot()
    assert all(torch.equal(a, b) for a, b in zip(restored, rec.scales[best], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(restored, rec.scales[-1], strict=True))
    # a test of the run's last.ckpt (which holds the last visit's scales) measures the kept ones too
    fresh = make_module(num_passes=2, selection="heldout", w_bits=2, eps=3e-3)
    make_trainer(tmp_path, fresh).test(fresh, datamodule=make_data(fresh), ckpt_path=tmp_path / "last.ckpt")
    tested = [ScaleVector(b.layers).get() for b in fresh.blocks]
    assert all(torch.equal(a, b) for a, b in zip(tested, rec.scales[best], strict=True))
    # and so do the verbs that read a checkpoint outside a Trainer loop (export, landscape)
    other = make_module(num_passes=2, selection="heldout", w_bits=2, eps=3e-3)
    quantized_model_for(other, None, str(tmp_path / "last.ckpt"))
    exported = [ScaleVector(b.layers).get() for b in other.blocks]
    assert all(torch.equal(a, b) for a, b in zip(exported, rec.scales[best], strict=True))


def test_heldout_selection_without_heldout_images_is_refused_with_the_fix(tmp_path):
    module = make_module(num_passes=1, selection="heldout")
    with pytest.raises(ValueError, match=r"heldout_size=0: give data.heldout_size >= 1 \(e.g. 1000\) or use "
                                         r"selection: none"):
        make_trainer(tmp_path, module).fit(module, datamodule=make_data(module, heldout_size=0))


def test_bad_search_arguments_fail_with_clear_messages():
    with pytest.raises(ValueError, match="population_size"):
        make_module(population_size=0)
    with pytest.raises(ValueError, match="temperature"):
        make_module(temperature=0.0)
    with pytest.raises(ValueError, match="w_bits"):
        make_module(w_bits=9)
    with pytest.raises(ValueError, match="unknown model"):
        make_module(model_name="not_a_model")


def test_bf16_mixed_precision_search_keeps_quantizer_math_in_float32(tmp_path):
    module = make_module(num_passes=1)
    seen = []
    quantizer = module.qmodel.blocks[-1].attn.q_qkv
    handle = quantizer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    make_trainer(tmp_path, module, precision="bf16-mixed").fit(module, datamodule=make_data(module))
    handle.remove()
    assert seen and set(seen) == {torch.float32}
    assert math.isfinite(module.current_fitness) and module.current_fitness <= module.baseline_fitness


def test_search_lowers_heldout_infonce_against_the_calibrated_baseline(tmp_path):
    module = make_module(num_passes=3, num_cycles=3, population_size=8, tournament_size=5)
    data = make_data(module, calib_size=128, heldout_size=256)
    trainer = make_trainer(tmp_path, module)
    baseline = trainer.validate(module, datamodule=data, verbose=False)[0]["heldout/infonce"]
    trainer = make_trainer(tmp_path, module)
    trainer.fit(module, datamodule=data)
    searched = trainer.validate(module, datamodule=data, verbose=False)[0]["heldout/infonce"]
    assert module.current_fitness < module.baseline_fitness
    assert searched < baseline


def test_reported_top1_is_the_fraction_of_correct_images(tmp_path):
    """ImageNet top-1 is micro accuracy (correct images / images), not torchmetrics' default per-class mean."""
    module = make_module(eval_fp=True)
    data = make_data(module)
    result = make_trainer(tmp_path, module).test(module, datamodule=data, verbose=False)[0]["test/top1"]
    hits = total = 0
    with torch.no_grad():
        for x, y in data.test_dataloader():
            hits += int((module.qmodel(x).argmax(1) == y).sum())  # quantizers are off: never calibrated here
            total += len(y)
    assert result == pytest.approx(100.0 * hits / total, abs=1e-4)


def test_fused_kernels_give_the_same_search(tmp_path):
    runs = {}
    for fused in (False, True):
        module = make_module(num_passes=1, fused=fused)
        make_trainer(tmp_path / str(fused), module).fit(module, datamodule=make_data(module))
        runs[fused] = (search_scales(module), module.current_fitness)
    assert runs[True][1] == runs[False][1]
    assert all(torch.equal(x, y) for x, y in zip(runs[True][0], runs[False][0], strict=True))


def test_fused_switch_goes_back_to_what_it_was_after_a_run_and_a_failed_run(tmp_path):
    module = make_module(num_passes=1, num_cycles=1)
    with fused_kernels(True):
        make_trainer(tmp_path, module).fit(module, datamodule=make_data(module))  # fused=False inside the fit
        assert fused_enabled()
    assert not fused_enabled()
    module = make_module(num_passes=1, fused=True)
    with pytest.raises(ValueError, match="max_epochs=7"):  # fails in setup, after the switch was turned on
        make_trainer(tmp_path, module, max_epochs=7).fit(module, datamodule=make_data(module))
    assert not fused_enabled()


def test_a_loop_that_is_not_one_epoch_per_visit_is_refused_with_the_fix(tmp_path):
    module = make_module(num_passes=1)
    with pytest.raises(ValueError, match=r"max_epochs=1000, but the search has 3 block visits .* max_epochs=3"):
        make_trainer(tmp_path, module, max_epochs=None).fit(module, datamodule=make_data(module))
    module = make_module(num_passes=1)
    with pytest.raises(ValueError, match=r"gives 3 steps per epoch: give the data module generations_per_epoch=2"):
        make_trainer(tmp_path, module).fit(module, datamodule=make_data(module, generations_per_epoch=3))


def test_fp16_gradient_scaling_is_refused_and_a_disabled_scaler_runs(tmp_path):
    """16-mixed steps every optimizer through a GradScaler, which cannot step without a backward pass."""
    module = make_module(num_passes=1, num_cycles=1)
    with pytest.raises(ValueError, match="16-mixed precision scales gradients and the search has none"):
        make_trainer(tmp_path, module, plugins=[MixedPrecision("16-mixed", "cpu")]).fit(module,
                                                                                        datamodule=make_data(module))
    counter = GenerationCounter(torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert scaler.step(counter, closure=lambda: "closure ran") == "closure ran"


class NaNTest(torch.utils.data.Dataset):
    """A test split of NaN images that counts its reads."""

    def __init__(self) -> None:
        self.reads = 0

    def __len__(self) -> int:
        return 100

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.reads += 1
        return torch.full((1, 28, 28), float("nan")), 0


class PoisonedTestSplit(DemoDataModule):
    """The demo data with its test split replaced by NaN images."""

    def _load_test(self) -> NaNTest:
        return NaNTest()


def test_the_test_split_is_never_read_by_a_fit_with_heldout_selection(tmp_path):
    runs = {}
    for name, data_class in (("clean", DemoDataModule), ("poisoned", PoisonedTestSplit)):
        module = make_module(num_passes=1, selection="heldout", w_bits=2, eps=3e-3)
        data = data_class(calib_size=64, heldout_size=100, batch_size=32, test_batch_size=100,
                          generations_per_epoch=module.hparams.num_cycles)
        make_trainer(tmp_path / name, module).fit(module, datamodule=data)
        runs[name] = (module, data)
    (clean, _), (poisoned, data) = runs["clean"], runs["poisoned"]
    assert data.test_set is None  # not even loaded
    assert same_state(poisoned.engine.state_dict(), clean.engine.state_dict())  # the search and its selection
    assert poisoned.engine.state.best_snapshot is not None
    assert all(torch.equal(a, b) for a, b in zip(search_scales(poisoned), search_scales(clean), strict=True))
    make_trainer(tmp_path, poisoned).test(poisoned, datamodule=data, verbose=False)
    assert data.test_set.reads == 100  # the poison was live: the test loop read it


def test_the_original_teacher_is_the_one_the_search_scores_against(tmp_path, searched):
    fp_module = searched[0]
    module = make_module(num_passes=1, num_cycles=1, teacher="int_ln")
    make_trainer(tmp_path, module).fit(module, datamodule=make_data(module))
    evaluator = module.engine.evaluator
    with torch.no_grad(), quantization_disabled(module.qmodel, keep_int_norm=True):
        expected = [module.qmodel(x) for x in evaluator.batches]
    assert all(torch.equal(t, e) for t, e in zip(evaluator.teachers, expected, strict=True))
    assert module.teacher_id != fp_module.teacher_id  # same images, another teacher
    assert module.current_fitness <= module.baseline_fitness


def test_search_mlp_searches_the_mlp_scales_too(tmp_path):
    module = make_module(num_passes=1, search_mlp=True)
    start = make_module(num_passes=1, search_mlp=True)
    make_trainer(tmp_path, module).fit(module, datamodule=make_data(module))
    calibrate(start.qmodel, module._calib)
    names = {n for n, m in module.qmodel.named_modules() for b in module.blocks if m in b.layers}
    assert {n.rsplit(".", 1)[-1] for n in names} == {"qkv", "proj", "fc1", "fc2"}
    changed = {n for (n, p), (_, q) in zip(module.qmodel.named_buffers(), start.qmodel.named_buffers(), strict=True)
               if "observer" not in n and not torch.equal(p, q)}
    assert any(".fc1." in n or ".fc2." in n for n in changed)  # the search moved MLP scales
    assert all(n.endswith("weight_quantizer.scale") and n.rsplit(".", 2)[0] in names for n in changed)
