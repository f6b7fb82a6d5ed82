"""scripts/fault_injection.py, short: three SIGKILLs (calibration, start-up, one during the search) and resumes end
bitwise where an uninterrupted run ends, with the same test top-1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.mark.slow
def test_three_kills_resume_to_the_uninterrupted_search(tiny_vit_checkpoint, tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    try:
        import fault_injection
    finally:
        sys.path.remove(str(SCRIPTS))
    log = tmp_path / "kills.jsonl"
    fault_injection.main(["--kills", "3", "--seed", "0", "--passes", "1", "--calib", "100", "--heldout", "100",
                          "--weights", tiny_vit_checkpoint, "--workdir", str(tmp_path / "runs"), "--log", str(log),
                          "--in-process"])  # exits 1 unless identical
    *kills, summary = (json.loads(line) for line in log.read_text().splitlines())
    assert [k["aim"] for k in kills][0] == "calibration" and len(kills) == 3
    assert summary["kills_survived"] == 3 and summary["generations"] == 9 and summary["validations"] == 3
    assert summary["identical"] and summary["test_top1_equal"]
    assert all(k["last_ckpt_loads"] for k in kills)
