"""Block schedule, default eps and SearchConfig validation."""

from __future__ import annotations

import pytest

from evolq_pl.search.schedule import SearchConfig, block_schedule, default_eps


def test_block_schedule_last_to_first_repeated() -> None:
    assert block_schedule(3, 2) == [2, 1, 0, 2, 1, 0]
    assert block_schedule(1, 1) == [0]
    assert len(block_schedule(12, 10)) == 120


@pytest.mark.parametrize("blocks, passes", [(0, 1), (1, 0), (-2, 3)])
def test_block_schedule_errors(blocks: int, passes: int) -> None:
    with pytest.raises(ValueError, match=">= 1"):
        block_schedule(blocks, passes)


def test_default_eps() -> None:
    assert default_eps(3) == 1e-3
    assert default_eps(4) == 1e-3
    assert default_eps(8) == 1e-4
    with pytest.warns(UserWarning, match="6-bit"):
        assert default_eps(6) == 1e-3


def test_search_config_defaults_and_eps() -> None:
    cfg = SearchConfig()
    assert (cfg.population_size, cfg.tournament_size, cfg.num_cycles, cfg.num_passes) == (15, 10, 3, 10)
    assert cfg.eps is None and cfg.relative_mutation is False
    assert cfg.resolve_eps(8) == 1e-4
    assert SearchConfig(eps=5e-4).resolve_eps(8) == 5e-4


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"population_size": 0}, "population_size"),
        ({"tournament_size": 0}, "tournament_size"),
        ({"num_cycles": 1.5}, "num_cycles"),
        ({"num_passes": True}, "num_passes"),
        ({"eps": 0.0}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"relative_mutation": 1}, "relative_mutation"),
    ],
)
def test_search_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SearchConfig(**kwargs)


def test_search_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        SearchConfig().num_passes = 3  # type: ignore[misc]
