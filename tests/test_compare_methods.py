"""benchmarks/compare_methods.py: every method's recipe per seed, and a mean ± std table of what they reached."""

import json

import pytest


def _row(name, knn, probe, steps, eval_on="test"):
    summary = dict(knn_top1=knn, linear_top1=probe, steps_run=steps, knn_top1_raw_pixels=83.0, linear_top1_raw_pixels=84.0,
                   knn_top1_random_init=68.0, linear_top1_random_init=70.0)
    return dict(name=name, eval_on=eval_on, knn_top1=knn, linear_top1=probe, summary=summary)


def test_the_table_gives_mean_and_sample_std_over_seeds(tmp_path, monkeypatch):
    from benchmarks import compare_methods

    results = tmp_path / "results.jsonl"
    rows = [_row("p-carp-s0", 80.0, 82.0, 100), _row("p-carp-s1", 84.0, 86.0, 110), _row("p-carp-s2", 82.0, 84.0, 105),
            _row("p-sop-s0", 70.0, 71.0, 90), _row("other-carp-s0", 10.0, 10.0, 1), _row("p-carp-s2", 83.0, 84.0, 105)]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(compare_methods, "RESULTS", results)
    lines = compare_methods.table("p").splitlines()
    carp = next(line for line in lines if line.startswith("| carp "))
    # seeds 80, 84, 83 (the re-run of seed 2 replaces its first row): mean 82.33, sample std 2.08
    assert "| 3 | test | 82.33 ± 2.08 | 84.00 ± 2.00 | 100-110 |" in carp
    sop = next(line for line in lines if line.startswith("| sop "))
    assert "| 1 | test | 70.00 ± 0.00 |" in sop
    assert not any(line.startswith("| massl ") for line in lines)  # no runs recorded: no row


def test_runs_go_seed_by_seed_through_every_method_at_the_same_minutes(monkeypatch, tmp_path):
    from benchmarks import compare_methods

    calls = []
    monkeypatch.setattr(compare_methods, "RESULTS", tmp_path / "none.jsonl")
    monkeypatch.setattr(compare_methods, "run", lambda name, options, recipe, eval_on: calls.append((name, options, recipe, eval_on))
                        or dict(name=name, knn_top1=1.0, linear_top1=2.0))
    compare_methods.main(["--methods", "carp", "sop", "--seeds", "0", "1", "--minutes", "3", "--eval-on", "test", "--", "--workers", "1"])
    assert [c[0] for c in calls] == ["compare-test-m3-carp-s0", "compare-test-m3-sop-s0", "compare-test-m3-carp-s1", "compare-test-m3-sop-s1"]
    assert calls[1][1:] == (["--minutes", "3.0", "--seed", "0", "--workers", "1"], "fashion_mnist_sop", "test")


def test_a_budget_of_no_minutes_is_refused_by_name(capsys):
    from benchmarks import compare_methods

    with pytest.raises(SystemExit):
        compare_methods.main(["--minutes", "0"])
    assert "--minutes" in capsys.readouterr().err
