"""The strategy report applies the pre-registered rule: best mean held-out top-1, a margin within the noise is a
tie won by the first listed candidate, and the test set never decides."""

from benchmarks.strategy_report import baseline_check, groups, pick, table


def _row(strategy: str, seed: int, heldout: float, test: float, base: float = 80.0, settings: str = "",
         kl: float = 0.05) -> dict:
    return {"checkpoint": "m.pth", "w_bits": 2, "seed": seed, "strategy": strategy, "settings": settings,
            "passes": 10, "evaluations": 361, "search_s": 1.0, "fitness_before": 1.0,
            "fp": {"top1": 90.0}, "baseline": {"top1": base}, "evolq": {"top1": test},
            "heldout": {"evolq": {"top1": heldout, "kl_fp": kl}}}


def test_the_best_heldout_candidate_is_picked_whatever_its_test_top1():
    rows = [_row("multifidelity", s, 84.0, 89.0) for s in range(3)] + [_row("cmaes", s, 84.5, 81.0)
                                                                         for s in range(3)]
    chosen, how = pick(groups(rows)[("m.pth", 2)], [0, 1, 2], ("multifidelity", "cmaes"), 0.18)
    assert chosen == "cmaes" and "margin 0.50" in how


def test_a_margin_within_the_noise_goes_to_the_first_listed():
    rows = [_row("multifidelity", s, 84.0, 81.0) for s in range(3)] + [_row("cmaes", s, 84.1, 89.0)
                                                                         for s in range(3)]
    chosen, how = pick(groups(rows)[("m.pth", 2)], [0, 1, 2], ("multifidelity", "cmaes"), 0.18)
    assert chosen == "multifidelity" and "tie, first listed" in how
    out = table(groups(rows), [0, 1, 2], ("multifidelity", "cmaes"), 0.18)
    assert "| multifidelity | 361 | 84.00 | 80.00 → 81.00 | +1.00 ± 0.00 | 10% |" in out


def test_a_candidate_missing_a_seed_cannot_be_picked_and_differing_baselines_are_flagged():
    rows = [_row("multifidelity", s, 84.0, 81.0) for s in range(2)] + [_row("cmaes", s, 83.0, 81.0, base=79.0)
                                                                         for s in range(3)]
    grouped = groups(rows)
    assert pick(grouped[("m.pth", 2)], [0, 1, 2], ("multifidelity", "cmaes"), 0.18)[0] == "cmaes"
    assert len(baseline_check(grouped, [0, 1, 2])) == 2  # seeds 0 and 1 start from different baselines


def test_each_model_is_judged_against_its_own_standing_pick():
    """Round 6: one command for two models whose standing picks differ; each group takes the first standing name
    it has rows of, so one model's candidate is not held against the other's pick."""
    grid = " strategy.local_grid=[0.5]"
    models = (("a_fmnist.pth", "search_head=true", 85.0, 85.5), ("b_fmnist.pth", "search_mlp=true", 86.0, 86.1))
    rows = [{**_row("gradient", s, heldout, test, settings=settings + extra), "checkpoint": ckpt}
            for ckpt, settings, old, new in models for s in range(3)
            for extra, heldout, test in (("", old, 81.0), (grid, new, 82.0))]
    out = table(groups(rows), [0, 1, 2], ("gradient-head-grid", "gradient-mlp-grid"), 0.18,
                standing=("gradient-head", "gradient-mlp"))
    assert "| a | W2A8 | gradient-head-grid |" in out and "+0.50 over gradient-head: replaces it" in out
    assert "| a | W2A8 | gradient-head | 361 | 85.00 | 80.00 → 81.00 | +1.00 ± 0.00 | 10% | 1 | replaced |" in out
    assert "+0.10 over gradient-mlp: gradient-mlp stands" in out
    assert "| b | W2A8 | gradient-mlp-grid | 361 | 86.10 | 80.00 → 82.00 | +2.00 ± 0.00 | 20% | 1 | not picked |" in out


def test_a_later_rounds_pick_replaces_the_standing_one_only_beyond_the_noise():
    """Round 2: gradient and gradient with MLP scales (told apart by their settings), then the pick against round
    1's multifidelity, which stands unless the new pick's held-out margin exceeds the noise."""
    mlp = "search_mlp=true strategy=gradient"
    rows = ([_row("multifidelity", s, 84.0, 81.0) for s in range(3)] + [_row("gradient", s, 84.15, 85.0)
                                                                         for s in range(3)]
            + [_row("gradient", s, 84.1, 89.0, settings=mlp) for s in range(3)])
    by_label = groups(rows)[("m.pth", 2)]
    assert set(by_label) == {"multifidelity", "gradient", "gradient-mlp"}
    large = groups([_row("gradient", 0, 84.0, 85.0, settings="search_mlp=true strategy.steps=[0.1,0.3]")])
    assert set(large[("m.pth", 2)]) == {"gradient-large-mlp"}
    joint = groups([_row("gradient", 0, 84.0, 85.0, settings="search_head=true search_jointly=true search_mlp=true")])
    assert set(joint[("m.pth", 2)]) == {"gradient-joint-head-mlp"}
    stem = groups([_row("gradient", 0, 84.0, 85.0, settings="search_head=true search_jointly=true search_stem=true "
                        "strategy.mutation_units={stem:4}")])
    assert set(stem[("m.pth", 2)]) == {"gradient-joint-head-stem4"}
    grid = groups([_row("gradient", s, 84.0, 85.0, settings=settings) for s, settings in enumerate([
        "search_head=true search_jointly=true search_stem=true strategy.mutation_units={stem:4} "
        "strategy.local_grid=[0.5,0.6,1.2]", "search_head=true search_mlp=true search_stem=true "
        "strategy.local_grid=[0.8]"])])
    assert set(grid[("m.pth", 2)]) == {"gradient-joint-head-stem4-grid", "gradient-head-mlp-stem-grid"}
    chosen, how = pick(by_label, [0, 1, 2], ("gradient", "gradient-mlp"), 0.18, standing="multifidelity")
    assert chosen == "multifidelity" and "+0.15 over multifidelity: multifidelity stands" in how
    for r in rows[3:6]:
        r["heldout"]["evolq"]["top1"] = 84.5
    chosen, how = pick(by_label, [0, 1, 2], ("gradient", "gradient-mlp"), 0.18, standing="multifidelity")
    assert chosen == "gradient" and "replaces it" in how


def test_round_4_breaks_a_tie_by_a_held_out_kl_lower_beyond_its_noise():
    """A tie between candidates, or with the standing pick, goes to the lower held-out KL to FP only where it is
    more than ``kl_tie`` lower; a margin beyond the top-1 noise still decides alone."""
    joint = "search_head=true search_jointly=true"
    rows = ([_row("multifidelity", s, 84.0, 81.0, kl=0.050) for s in range(3)]
            + [_row("gradient", s, 84.1, 80.0, settings=joint, kl=0.048) for s in range(3)]
            + [_row("gradient", s, 84.05, 82.0, settings=joint + " search_mlp=true", kl=0.040) for s in range(3)])
    by_label = groups(rows)[("m.pth", 2)]
    candidates = ("gradient-joint-head", "gradient-joint-head-mlp")
    chosen, how = pick(by_label, [0, 1, 2], candidates, 0.18, "multifidelity", kl_tie=0.06)
    assert chosen == "gradient-joint-head-mlp" and "tie, held-out KL more than 6% lower" in how
    assert "a tie; held-out KL 0.0400 vs 0.0500, replaces it" in how
    assert pick(by_label, [0, 1, 2], candidates, 0.18, "multifidelity")[0] == "multifidelity"  # round 3's rule
    for r in rows[6:]:
        r["heldout"]["evolq"]["kl_fp"] = 0.0475  # 1% below the first listed's, 5% below multifidelity's
    chosen, how = pick(by_label, [0, 1, 2], candidates, 0.18, "multifidelity", kl_tie=0.06)
    assert chosen == "multifidelity" and "tie, first listed" in how and "multifidelity stands" in how
    for r in rows[:3]:
        r["heldout"]["evolq"]["top1"] = 83.8  # the first listed is now 0.30 ahead: beyond the noise, KL aside
    assert pick(by_label, [0, 1, 2], candidates, 0.18, "multifidelity", kl_tie=0.06)[0] == "gradient-joint-head"
