"""The accuracy benchmark's command line: settings are recorded per row, resumes skip done rows, bad input fails."""

import json

import pytest

from benchmarks.accuracy import main, module_overrides


def test_set_pairs_become_module_and_quant_arguments():
    assert module_overrides(["eps=0.003", "relative_mutation=true", "quant.bias_correction=false",
                             "quant.fit_on=all"]) == {
        "eps": 0.003, "relative_mutation": True,
        "quant_overrides": {"bias_correction": False, "fit_on": "all"}}


@pytest.mark.parametrize("pair, hint", [("eps", "NAME=VALUE"), ("w_bits=3", "--bits")])
def test_bad_set_pair_fails_with_a_hint(pair, hint):
    with pytest.raises(SystemExit, match=hint):
        module_overrides([pair])


@pytest.mark.slow
def test_rows_keep_their_settings_and_resume_skips_them(tiny_vit_checkpoint, tmp_path, capsys):
    out = tmp_path / "acc.json"
    common = ["--checkpoints", tiny_vit_checkpoint, "--bits", "3:8", "--seeds", "0", "--passes", "1",
              "--calib-size", "100", "--device", "cpu", "--out", str(out)]
    main(common + ["--set", "relative_mutation=true"])
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["settings"] == "relative_mutation=true"
    row = rows[0]
    assert row["fitness_after"] <= row["fitness_before"]  # the search never accepts a worse scale vector
    assert row["fp"]["agree_fp"] == 100.0 and row["fp"]["kl_fp"] == pytest.approx(0.0, abs=1e-6)

    main(common + ["--set", "relative_mutation=true"])  # same settings: nothing is measured again
    assert json.loads(out.read_text()) == rows
    main(common)  # other settings: a new row beside the first, its own line in the table
    rows = json.loads(out.read_text())
    assert [r["settings"] for r in rows] == ["relative_mutation=true", ""]
    table = capsys.readouterr().out
    assert "1 passes, 100 images relative_mutation=true" in table and "| 1 passes, 100 images |" in table
    last_table = table[table.rindex("| model |"):].strip()
    main(["--report", "--out", str(out)])  # the same table again, from the file alone
    assert capsys.readouterr().out.strip() == last_table
