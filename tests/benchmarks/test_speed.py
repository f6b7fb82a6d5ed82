"""The speed benchmark: every kind timed side by side, the suffix path scoring a probe as the whole model does."""

import json

import pytest
import torch

from benchmarks.speed import main, parse_args

TINY = ["--device", "cpu", "--threads", "1", "--models", "deit_tiny", "--calib-sizes", "4", "--batch-size", "2",
        "--blocks=-2,-1", "--repeats", "2"]


@pytest.mark.slow
def test_rows_time_every_kind_and_the_suffix_scores_the_probe_like_the_whole_model(tmp_path, capsys):
    out = tmp_path / "speed.json"
    result = main([*TINY, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))  # the file holds every number
    assert result["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    (run,) = result["runs"]
    assert [r["block"] for r in run["blocks"]] == [10, 11]
    for row in run["blocks"]:
        fast = row["ops"]["fast"]
        assert fast["check"]["same"], fast["check"]  # bitwise: cached-input suffix == whole quantized model
        assert len(fast["samples"]["naive"]) == 2 and len(row["floor_samples"]) == 2
        assert fast["candidate_s"] > 0 and fast["naive_over_candidate"] > 0
    summary = run["summary"]["fast"]
    assert summary["fitness_checks_equal"] is True
    est = summary["estimated_all_blocks"]  # two positions of twelve: fitted over all twelve
    assert est["candidate_over_floor"] > 0 and est["naive_over_candidate"] > 0
    assert "candidate/floor mean" in capsys.readouterr().out


@pytest.mark.slow
def test_naive_repeats_zero_skips_the_whole_model_loop(capsys):
    result = main([*TINY, "--blocks=-1", "--repeats", "1", "--naive-repeats", "0"])
    (row,) = result["runs"][0]["blocks"]
    fast = row["ops"]["fast"]
    assert fast["naive_s"] is None and fast["check"] is None and fast["samples"]["naive"] == []
    assert fast["candidate_s"] > 0 and row["floor_s"] > 0
    summary = result["runs"][0]["summary"]["fast"]
    assert summary["mean_naive_over_candidate"] is None and summary["fitness_checks_equal"] is None
    assert "naive/candidate mean - (not timed" in capsys.readouterr().out


@pytest.mark.slow
def test_every_ops_path_scores_the_shared_probe_alike(capsys):
    result = main([*TINY, "--blocks=-1", "--repeats", "1", "--naive-repeats", "0", "--ops", "fast", "reference"])
    run = result["runs"][0]
    (row,) = run["blocks"]
    assert set(row["probe_by_ops"]) == {"fast", "reference"} and row["ops_agree"] is True
    assert run["summary"]["ops_agree"] is True
    assert "fast, reference score a shared probe bitwise alike: True" in capsys.readouterr().out


def test_naive_repeats_beyond_repeats_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "2", "--naive-repeats", "3"])
    assert "--naive-repeats must be between 0 and --repeats (2)" in capsys.readouterr().err


@pytest.mark.slow
def test_swin_suffix_scores_the_probe_like_the_whole_model_and_has_a_floor():
    """Swin-T shapes: the last block (past the last patch merging) and the floor of timm's own blocks."""
    result = main([*TINY[:4], "--models", "swin_tiny", "--calib-sizes", "2", "--batch-size", "2", "--blocks=-1",
                   "--repeats", "1"])
    (run,) = result["runs"]
    assert run["timm_name"] == "swin_tiny_patch4_window7_224.ms_in1k" and run["depth"] == 12
    for row in run["blocks"]:
        assert row["ops"]["fast"]["check"]["same"], row["ops"]["fast"]["check"]
        assert row["floor_s"] > 0


@pytest.mark.parametrize(("name", "side"), [("resnet50", 48), ("mobilenetv2_035", 32)])
@torch.no_grad()
def test_the_cnn_floor_is_timms_model_from_any_block(name, side):
    """The floor a CNN candidate is compared with runs timm's own blocks from the same hidden state."""
    from benchmarks.speed import fp_suffix, input_shape
    from evolq_pl.models import quantize_model
    from evolq_pl.quant.config import QuantConfig
    from evolq_pl.quant.modes import quantization_disabled
    from evolq_pl.testing import tiny_cnn

    fp = tiny_cnn(name)
    assert input_shape(fp) == (3, 224, 224)
    qmodel = quantize_model(fp, QuantConfig(), name).eval()
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    expected = fp(x)
    with quantization_disabled(qmodel):
        for i in range(len(qmodel.blocks)):
            assert torch.allclose(fp_suffix(fp, i, qmodel.forward_to(i, x)), expected, atol=1e-4, rtol=1e-4), i
