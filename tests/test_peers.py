"""benchmarks/peers.py: the parts that are ours (options, data, step budget); no lightly needed."""

import numpy as np
import pytest

from benchmarks import peers
from carp_fast.recipes.fashion_mnist import DEFAULTS


def test_every_recipe_setting_is_an_option_with_the_recipes_value():
    settings, config, extra = peers.parse([])
    values = {**vars(settings), **config.to_dict()}
    for name, value in DEFAULTS.items():
        if name in peers.UNUSED or name in ("out", "progress"):
            continue
        assert values[name] == (tuple(value) if isinstance(value, list) else value), name
    assert extra.method_list() == ["carp", "swav", "dino"] and extra.steps == 0
    assert settings.minutes == DEFAULTS["minutes"] and not settings.resume  # the recipe's budget, of training


def test_options_override_the_recipe_and_bad_ones_exit_2(capsys):
    settings, config, extra = peers.parse(["--base-lr", "3e-3", "--local-crops", "4", "--methods", "swav, dino", "--steps", "10"])
    assert config.base_lr == 3e-3 and settings.local_crops == 4
    assert extra.method_list() == ["swav", "dino"] and extra.steps == 10
    for argv in (["--methods", "byol"], ["--steps", "-1"]):
        with pytest.raises(SystemExit) as exit_:
            peers.parse(argv)
        assert exit_.value.code == 2
    with pytest.raises(SystemExit, match="no effect"):
        peers.parse(["--knn-every", "1"])


@pytest.mark.parametrize("eval_on", ["test", "validation"])
def test_the_data_and_the_knn_bank_are_the_recipes(eval_on):
    from carp_fast.run import open_sources, parse_settings

    recipe_settings, recipe_config = parse_settings(DEFAULTS, ["--eval-on", eval_on])
    settings, config, _ = peers.parse(["--eval-on", eval_on])
    ours, theirs = open_sources(settings, config), open_sources(recipe_settings, recipe_config)
    for name in ("train", "bank", "queries"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert len(a) == len(b)
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.images, b.images), name
    assert len(ours.bank) == 20_000 and len(ours.queries) == 10_000 and ours.eval_on == eval_on
    assert peers.steps_per_epoch(ours, config) == len(theirs.train) // recipe_config.global_batch


def test_training_stops_after_the_steps_with_schedules_sized_to_them(tiny_dls, tiny_config):
    import dataclasses

    from carp_fast.carp import carp_learner

    tiny_config = dataclasses.replace(tiny_config, optimizer="adamw", base_lr=1e-3, final_lr=1e-5)  # the recipe's optimizer
    learn = carp_learner(tiny_dls, tiny_config, progress=False)  # 4 steps an epoch
    learn.add_cb(peers.StopAfter(6))
    lrs = []
    learn.add_cb(type("LearningRates", (peers.Callback,), {"after_step": lambda self: lrs.append(self.opt.hypers[-1]["lr"])})())
    learn.fit(2)
    assert len(lrs) == 6 and learn.planned_steps is None  # sized to 6 during the fit (below), reset after it
    assert lrs[0] == pytest.approx(tiny_config.peak_lr())
    # Step 5 of 6 sits at 5/6 of the cosine, not at 5/8 of two full epochs.
    final, peak = tiny_config.final_lr, tiny_config.peak_lr()
    assert lrs[-1] == pytest.approx(final + (peak - final) * (1 + np.cos(np.pi * 5 / 6)) / 2)


def test_the_table_row():
    row = peers.table_row({"method": "swav", "eval_on": "validation", "knn_top1": 71.234, "linear_top1": 70.5, "steps": 256,
                           "train_s": 300.4, "images_per_s": 218.2, "scored": "student backbone"})
    assert row == "| swav | validation | 71.23 | 70.50 | 256 | 300 | 218 | student backbone |"
    assert peers.HEADER.splitlines()[0].count("|") == row.count("|")


@pytest.mark.slow
def test_swav_and_dino_train_and_are_scored(tmp_path):
    """The peers' own code paths with lightly (installed by setup.sh): a few steps each."""
    results = peers.main(["--methods", "swav,dino", "--steps", "3", "--train-images", "768", "--knn-bank", "300",
                          "--knn-queries", "200", "--precision", "fp32", "--workers", "1", "--out", str(tmp_path),
                          "--results", str(tmp_path / "results.jsonl"), "--swav-freeze-steps", "1", "--dino-freeze-steps", "1"])
    assert [r["method"] for r in results] == ["swav", "dino"]
    for r in results:
        assert r["steps"] == 3 and 0 <= r["knn_top1"] <= 100 and 0 <= r["linear_top1"] <= 100 and r["lightly"] == "1.6.0"
        assert np.isfinite(r["final_loss"])
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2
