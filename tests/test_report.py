"""The run report: what the record keeps of a search, the picture, and report.png after a stopped and resumed fit."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from evolq_pl.callbacks import RunReport
from evolq_pl.report import SearchRecord, acceptance_per_pass, plot_report
from evolq_pl.search.engine import SearchEngine
from evolq_pl.search.schedule import SearchConfig
from evolq_pl.testing import ToyEvaluator

CONFIG = SearchConfig(population_size=4, tournament_size=3, num_cycles=2, num_passes=2, eps=2e-2)


def toy_search() -> list:
    """Every generation's report of a whole search on the toy evaluator (3 blocks x 2 passes x 2 generations)."""
    engine = SearchEngine(3, [CONFIG.eps] * 3, CONFIG, "evolq", 7, evaluator=ToyEvaluator())
    reports = []
    while not engine.done:
        reports.append(engine.step())
    return reports


def test_record_keeps_every_generation_visit_and_heldout_score():
    reports = toy_search()
    record = SearchRecord()
    for i, report in enumerate(reports):
        record.add(report, CONFIG.num_cycles)
        if i % 4 == 3:
            record.add_heldout(80.0 + i)
    assert record.generation == list(range(1, 13))
    assert record.best_fitness == [r.best_fitness for r in reports]
    assert record.visit == list(range(6)) and record.visit_block == [2, 1, 0, 2, 1, 0]
    assert record.visit_pass == [0, 0, 0, 1, 1, 1]
    assert record.visit_after == [r.visit_summary.fitness_after for r in reports if r.visit_summary]
    assert record.heldout_generation == [4, 8, 12] and record.heldout_top1 == [83.0, 87.0, 91.0]
    kept = [sum(r.accepted for r in reports if r.pass_index == p) / 6 * 100 for p in (0, 1)]
    assert acceptance_per_pass(record) == pytest.approx({0: kept[0], 1: kept[1]})

    again = SearchRecord()
    again.load_state_dict(record.state_dict())
    assert again == record


def test_a_generation_recorded_twice_replaces_its_entry_and_what_followed():
    reports = toy_search()
    record = SearchRecord()
    for report in reports[:5]:
        record.add(report, CONFIG.num_cycles)
    record.add_heldout(70.0)
    record.add_heldout(71.0)  # a second measurement after the same generation replaces the first
    for report in reports[3:]:  # generations 4 and 5 again (the last of visit 1, then visit 2), then the rest
        record.add(report, CONFIG.num_cycles)
    whole = SearchRecord()
    for report in reports:
        whole.add(report, CONFIG.num_cycles)
    assert record == whole  # the held-out score taken after generation 5 went with it


def test_the_report_has_a_heldout_panel_only_where_one_was_measured():
    record = SearchRecord()
    for report in toy_search():
        record.add(report, CONFIG.num_cycles)
    assert len(plot_report(record, 1.0, "toy").axes) == 3
    record.add_heldout(50.0)
    assert len(plot_report(record, 1.0, "toy").axes) == 4
    with pytest.raises(ValueError, match="no generation ran"):
        plot_report(SearchRecord(), 1.0, "toy")


def report_of(cli) -> RunReport:
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, RunReport))


def test_a_resumed_fit_draws_the_whole_search(resumed_tiny_search):
    _, runs = resumed_tiny_search
    stopped, resumed = report_of(runs["stopped"][0]).record, report_of(runs["resumed"][0]).record
    folder = Path(runs["resumed"][0].trainer.log_dir)
    assert folder == Path(runs["stopped"][0].trainer.log_dir)  # the resume continued the run's folder
    assert stopped.generation == [1, 2] and stopped.visit == [0]
    # the resumed process ran generations 3-6 only; the checkpoint brought the first two
    assert resumed.generation == [1, 2, 3, 4, 5, 6] and resumed.visit == [0, 1, 2] and resumed.visit_block == [2, 1, 0]
    assert resumed.best_fitness[:2] == stopped.best_fitness
    assert resumed.heldout_generation == [2, 4, 6] and all(0 <= t <= 100 for t in resumed.heldout_top1)

    events = EventAccumulator(str(folder))  # both processes' event files
    events.Reload()
    assert resumed.best_fitness == pytest.approx([s.value for s in events.Scalars("search/best_fitness")])
    assert resumed.heldout_top1 == pytest.approx([s.value for s in events.Scalars("heldout/top1")])
    with Image.open(folder / "report.png") as image:
        assert image.format == "PNG" and image.size == (1100, 700)
