"""The accuracy benchmark's command line: settings are recorded per row, resumes skip done rows, bad input fails."""

import json

import pytest
import torch

from benchmarks.accuracy import main, module_overrides, selection


def test_set_pairs_become_module_and_quant_arguments():
    assert module_overrides(["eps=0.003", "relative_mutation=true", "quant.bias_correction=false",
                             "quant.fit_on=all"]) == {
        "eps": 0.003, "relative_mutation": True,
        "quant_overrides": {"bias_correction": False, "fit_on": "all"}}


def test_strategy_pairs_become_the_strategy_and_its_options():
    assert module_overrides(["strategy=cmaes", "strategy.popsize=5", "strategy.sigma=0.03"]) == {
        "strategy": "cmaes", "strategy_options": {"popsize": 5, "sigma": 0.03}}
    assert module_overrides(["strategy=gradient", "strategy.steps=[0.1, 0.3]"]) == {
        "strategy": "gradient", "strategy_options": {"steps": [0.1, 0.3]}}
    assert module_overrides(["strategy.mutation_units={stem:4, head: 1}"]) == {
        "strategy_options": {"mutation_units": {"stem": 4, "head": 1}}}


@pytest.mark.parametrize("pair, hint", [("eps", "NAME=VALUE"), ("w_bits=3", "--bits"),
                                        ("strategy.mutation_units={stem}", "{NAME:VALUE,...}")])
def test_bad_set_pair_fails_with_a_hint(pair, hint):
    with pytest.raises(SystemExit, match=hint):
        module_overrides([pair])


@pytest.mark.slow
def test_rows_keep_their_settings_and_resume_skips_them(tiny_vit_checkpoint, plain_fp_top1, tmp_path, capsys):
    out = tmp_path / "acc.json"
    common = ["--checkpoints", tiny_vit_checkpoint, "--bits", "3:8", "--seeds", "0", "--passes", "1",
              "--calib-size", "100", "--device", "cpu", "--out", str(out)]
    main(common + ["--set", "relative_mutation=true"])
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["settings"] == "relative_mutation=true"
    row = rows[0]
    assert row["fitness_after"] <= row["fitness_before"]  # the search never accepts a worse scale vector
    # the FP row against a plain timm model's count of correct test images (one image may flip at a near tie)
    assert row["fp"]["top1"] == pytest.approx(plain_fp_top1, abs=0.011)
    # float sums differ across vector ISAs (AVX2 vs AVX-512), and with them a search: each row names its own
    assert row["cpu_capability"] == torch.backends.cpu.get_cpu_capability()

    main(common + ["--set", "relative_mutation=true"])  # same settings: nothing is measured again
    assert json.loads(out.read_text()) == rows
    main(common + ["--curve", "3"])  # other settings: a new row beside the first, its own line in the table
    rows = json.loads(out.read_text())
    assert [r["settings"] for r in rows] == ["relative_mutation=true", ""]
    curve = rows[1]["curve"]  # the test top-1 after each of the 3 visits, from the baseline to the searched model
    assert [p["visit"] for p in curve] == [0, 1, 2, 3] and curve[0]["top1"] == rows[1]["baseline"]["top1"]
    assert curve[-1]["top1"] == rows[1]["evolq"]["top1"] and curve[-1]["evaluations"] == rows[1]["evaluations"]
    table = capsys.readouterr().out
    assert "1 passes, 100 images relative_mutation=true" in table and "| 1 passes, 100 images |" in table
    last_table = table[table.rindex("| model |"):].strip()
    main(["--report", "--out", str(out)])  # the same table again, from the file alone
    assert capsys.readouterr().out.strip() == last_table


def _row(settings: str, seed: int, test: float, heldout: float) -> dict:
    top1 = lambda v: {"top1": v}  # noqa: E731
    return {"checkpoint": "m.pth", "w_bits": 3, "a_bits": 8, "seed": seed, "passes": 10, "calib_size": 1000,
            "settings": settings, "fp": top1(90.0), "baseline": top1(80.0), "evolq": top1(test),
            "heldout": {"baseline": top1(79.0), "evolq": top1(heldout)}}


def test_selection_picks_on_heldout_images_never_on_the_test_set():
    rows = [_row("eps=0.001", s, test=88.0, heldout=80.0) for s in range(3)]  # best on test, worst held out
    rows += [_row("eps=0.003", s, test=82.0, heldout=81.0 + s) for s in range(3)]
    no_heldout = _row("eps=0.01", 0, test=89.0, heldout=99.0)
    del no_heldout["heldout"]
    rows.append(no_heldout)  # a setting without held-out numbers cannot be chosen
    out = selection(rows)
    line = next(x for x in out.splitlines() if x.startswith("| m.pth"))
    assert "| 10 passes, 1000 images eps=0.003 |" in line and "80.00 → 82.00" in line and "| 20% |" in line
    assert "eps=0.01" not in out
    assert selection([{k: v for k, v in r.items() if k != "heldout"} for r in rows]) == ""


@pytest.mark.slow
def test_heldout_rows_report_heldout_top1_and_the_pick(tiny_vit_checkpoint, tmp_path, capsys):
    out = tmp_path / "acc.json"
    main(["--checkpoints", tiny_vit_checkpoint, "--bits", "3:8", "--seeds", "0", "--passes", "1", "--calib-size",
          "100", "--heldout-size", "200", "--device", "cpu", "--out", str(out), "--set", "eps=0.003", "--hold-test"])
    (row,) = json.loads(out.read_text())
    assert row["settings"] == "eps=0.003 heldout_size=200"
    for which in ("baseline", "evolq"):
        assert 0.0 <= row["heldout"][which]["top1"] <= 100.0
    held = capsys.readouterr().out  # --hold-test: the test top-1 is measured but not printed before the pick
    assert f"held-out baseline {row['heldout']['baseline']['top1']:.2f} Evol-Q {row['heldout']['evolq']['top1']:.2f}" \
        in held and "test numbers held back" in held
    assert "| model |" not in held and "FP" not in held
    main(["--report", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "Chosen on held-out train images" in printed and "| eps=0.003 heldout_size=200" not in printed
    assert "1 passes, 100 images eps=0.003 heldout_size=200 |" in printed.split("Chosen")[1]


@pytest.mark.slow
def test_heldout_only_rows_never_open_the_test_split(tiny_vit_checkpoint, tmp_path, capsys, monkeypatch):
    """Exploring settings before a pre-registration: the search and the held-out scores run, the test split is
    never asked for (its loader raises here), and the report lists the row without a test number."""
    from evolq_pl.data import FashionMNISTDataModule

    def no_test(self):
        raise AssertionError("the test split was read")

    monkeypatch.setattr(FashionMNISTDataModule, "test_dataloader", no_test)
    out = tmp_path / "explore.json"
    main(["--checkpoints", tiny_vit_checkpoint, "--bits", "3:8", "--seeds", "0", "--passes", "1", "--calib-size",
          "100", "--heldout-size", "200", "--heldout-only", "--curve", "3", "--device", "cpu", "--out", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["fp"] is row["baseline"] is row["evolq"] is None and "curve" not in row
    curve = row["heldout_curve"]  # held-out scores along the search, from the baseline to the searched model
    assert [p["visit"] for p in curve] == [0, 1, 2, 3] and curve[-1]["evaluations"] == row["evaluations"]
    assert {k: curve[0][k] for k in row["heldout"]["baseline"]} == row["heldout"]["baseline"]
    assert {k: curve[-1][k] for k in row["heldout"]["evolq"]} == row["heldout"]["evolq"]
    assert row["fitness_after"] <= row["fitness_before"] and 0.0 <= row["heldout"]["evolq"]["top1"] <= 100.0
    assert row["heldout"]["fp"]["top1"] > 0 and row["heldout"]["fp"]["agree_fp"] == 100.0
    assert "held-out only (no test image read)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--checkpoints", tiny_vit_checkpoint, "--heldout-only", "--out", str(tmp_path / "x.json")])
    assert "--heldout-only needs held-out images" in capsys.readouterr().err
