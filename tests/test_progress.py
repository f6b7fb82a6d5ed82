"""The search's progress bar: the time-left estimate, and the bar's text over a stopped and resumed fit."""

from __future__ import annotations

import re

import pytest

from evolq_pl.progress import SearchClock, SearchProgressBar, search_plan
from evolq_pl.search.engine import SearchEngine
from evolq_pl.search.schedule import SearchConfig
from evolq_pl.testing import ToyEvaluator

BAR = re.compile(r"Search: +\d+%\|[^|]*\| (\d+)/(\d+) generations \[\d\d:\d\d, block=(\d), pass=1/1, gen=(\d)/2, "
                 r"best=(-|\d+\.\d{5}), ETA=(\?|\d\d:\d\d), v_num=0\]")


def test_clock_scales_unmeasured_blocks_by_the_blocks_after_them_and_adds_the_untimed_share():
    clock = SearchClock(num_blocks=3, remaining=[2, 2, 1, 1, 0, 0])
    assert clock.eta(0.0) is None  # nothing timed yet
    clock.tick(2, 1.0)  # the last block: 1 block to the output
    assert clock.block_seconds(1) == pytest.approx(2.0) and clock.block_seconds(0) == pytest.approx(3.0)
    assert clock.eta(1.0) == pytest.approx(1.0 + 2 * 2.0 + 2 * 3.0)
    assert clock.eta(2.0) == pytest.approx(2 * 11.0)  # half the wall time went to what generations do not time
    clock.tick(2, 3.0)
    clock.tick(1, 3.0)
    # timed: block 2 at 2.0 s (its mean), block 1 at 3.0 s; block 0 on the line through them
    assert clock.block_seconds(0) == pytest.approx(4.0)
    assert clock.eta(7.0) == pytest.approx(3.0 + 2 * 4.0)
    clock.tick(1, 2.5)
    clock.tick(0, 4.0)
    clock.tick(0, 4.0)
    assert clock.eta(20.0) == 0.0


def test_clock_falls_back_to_proportional_when_the_fitted_line_makes_no_sense():
    clock = SearchClock(num_blocks=4, remaining=[3, 2, 0])
    clock.tick(3, 2.0)  # 1 block to the output
    clock.tick(2, 1.0)  # 2 blocks, yet faster: noise; the line would fall
    assert clock.block_seconds(0) == pytest.approx(3.0 / 3 * 4)


def test_plan_counts_the_generations_done_and_lists_the_blocks_still_to_run():
    config = SearchConfig(population_size=4, tournament_size=3, num_cycles=2, num_passes=2, eps=2e-2)
    engine = SearchEngine(3, [2e-2] * 3, config, "evolq", 0, evaluator=ToyEvaluator())
    assert search_plan(engine, 6) == (0, [2, 2, 1, 1, 0, 0, 2, 2, 1, 1, 0, 0])
    for _ in range(3):  # one visit and the first generation of the next
        engine.step()
    assert search_plan(engine, 6) == (3, [1, 0, 0, 2, 2, 1, 1, 0, 0])
    assert search_plan(engine, 3) == (3, [1, 0, 0])  # a fit cut to 3 visits


def bar_lines(stdout: str) -> list[re.Match]:
    lines = [line.strip() for line in re.split(r"[\r\n]", stdout) if line.strip().startswith("Search:")]
    matches = [BAR.fullmatch(line) for line in lines]
    assert lines and all(matches), [line for line, m in zip(lines, matches, strict=True) if not m]
    return matches


def test_the_bar_shows_the_whole_search_and_a_resumed_run_counts_only_what_is_left(resumed_tiny_search):
    _, runs = resumed_tiny_search
    stopped = bar_lines(runs["stopped"][1])
    assert {(m[1], m[2]) for m in stopped} == {("0", "2"), ("1", "2"), ("2", "2")}  # max_epochs 1: one visit
    assert (stopped[0][4], stopped[0][5], stopped[0][6]) == ("0", "-", "?")  # a new search: nothing ran yet
    assert stopped[-1][6] == "00:00"

    resumed = bar_lines(runs["resumed"][1])
    assert [int(m[1]) for m in resumed] == sorted(int(m[1]) for m in resumed)
    assert {m[1] for m in resumed} == {"2", "3", "4", "5", "6"} and {m[2] for m in resumed} == {"6"}
    first = resumed[0]  # where the checkpoint left the search: the next block, no generation in it yet
    assert (first[3], first[4], first[5], first[6]) == ("1", "0", stopped[-1][5], "?")
    assert {(m[1], m[3], m[4]) for m in resumed[1:]} == {("3", "1", "1"), ("4", "1", "2"), ("5", "0", "1"),
                                                          ("6", "0", "2")}
    assert all(m[6] != "?" for m in resumed[1:])

    bar = runs["resumed"][0].trainer.progress_bar_callback
    assert isinstance(bar, SearchProgressBar)
    assert (bar.train_progress_bar.initial, bar.train_progress_bar.n, bar.train_progress_bar.total) == (2, 6, 6)
    assert sum(len(s) for s in bar.clock.seconds.values()) == 4 and not bar.clock.remaining  # timed: 4 generations
