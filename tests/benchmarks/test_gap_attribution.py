"""The gap-attribution benchmark: one row per run, parts switched apart, the full model equal to the baseline."""

import json

import pytest

from benchmarks.gap_attribution import PARTS, main


@pytest.mark.slow
def test_rows_hold_every_part_and_resume_skips_them(tiny_vit_checkpoint, plain_fp_top1, tmp_path, capsys):
    out = tmp_path / "gap.json"
    args = ["--checkpoints", tiny_vit_checkpoint, "--bits", "2:8", "--seeds", "0", "--calib-size", "100",
            "--device", "cpu", "--out", str(out)]
    main(args)
    (row,) = json.loads(out.read_text())
    assert set(row["parts"]) == set(PARTS)
    assert row["fp"]["top1"] == pytest.approx(plain_fp_top1, abs=0.011)  # a plain timm model's count
    assert row["parts"]["all"]["agree_fp"] < 100.0  # W2A8 moves predictions; a part alone moves fewer or as many
    assert max(p["agree_fp"] for p in row["parts"].values()) > row["parts"]["all"]["agree_fp"]
    table = capsys.readouterr().out
    assert "| W2A8 | 1 |" in table
    main(args)  # done rows are not measured again: only the table is printed
    assert json.loads(out.read_text()) == [row]
    again = capsys.readouterr().out
    assert again.strip() == table.strip().split("\n", 1)[1]  # the table without the first run's progress line
    main(["--report", "--out", str(out)])
    assert capsys.readouterr().out == again
