"""The validation split (``--eval-on validation``) and the linear probe beside the k-NN (issue 24).

The held-out images are found by index: a stand-in training split whose every image carries
its own index in its pixels goes through ``carp_fast.run.open_sources`` exactly as
Fashion-MNIST does.
"""

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

from carp_fast.eval.features import Features
from carp_fast.eval.linear import RUN_PROBE, bank_probe
from carp_fast.eval.pixels import raw_pixel_features
from carp_fast.pipelines import ArraySource, eval_loader, open_split
from carp_fast.pipelines.validation import VALIDATION_IMAGES, split_validation, validation_indices
from carp_fast.run import open_sources, parse_settings

RECIPES = {"fashion_mnist": "CARP", "fashion_mnist_massl": "MASSL", "fashion_mnist_carl": "CARL", "fashion_mnist_sop": "SOP"}
TRAIN_IMAGES = 60_000


def indexed_split(n: int = TRAIN_IMAGES) -> ArraySource:
    """``n`` 2 x 2 images whose pixels spell their index (base 256), labels ``index % 10``."""
    index = np.arange(n)
    pixels = np.stack([index % 256, index // 256 % 256, index // 65536, np.zeros(n, int)], axis=1)
    return ArraySource(pixels.reshape(n, 2, 2).astype(np.uint8), index % 10, num_classes=10)


def indices(source: ArraySource) -> np.ndarray:
    flat = source.images.reshape(len(source), 4).astype(np.int64)
    return flat[:, 0] + 256 * flat[:, 1] + 65536 * flat[:, 2]


def recipe_sources(monkeypatch, recipe: str, *argv: str):
    """``open_sources`` of a recipe's defaults under ``argv``, on the indexed training split."""
    import carp_fast.pipelines

    monkeypatch.setattr(carp_fast.pipelines, "open_split",
                        lambda data, split, **kw: indexed_split(TRAIN_IMAGES if split == "train" else 10_000))
    module = importlib.import_module(f"carp_fast.recipes.{recipe}")
    settings, config = parse_settings(module.DEFAULTS, list(argv), method=getattr(module, RECIPES[recipe]))
    return open_sources(settings, config)


def test_the_held_out_indices_are_fixed_by_their_seed():
    held = validation_indices(TRAIN_IMAGES)
    assert len(held) == VALIDATION_IMAGES == 10_000 and len(np.unique(held)) == len(held)
    assert np.array_equal(held, np.sort(held)) and 0 <= held.min() and held.max() < TRAIN_IMAGES
    assert np.array_equal(held, validation_indices(TRAIN_IMAGES))  # the same every call
    assert not np.array_equal(held, validation_indices(TRAIN_IMAGES, seed=25))
    with pytest.raises(ValueError, match="1 <= n < 100"):
        validation_indices(100, n=100)


def test_the_split_is_disjoint_and_complete():
    rest, held = split_validation(indexed_split())
    assert len(rest) == TRAIN_IMAGES - VALIDATION_IMAGES and len(held) == VALIDATION_IMAGES
    assert np.array_equal(indices(held), validation_indices(TRAIN_IMAGES))
    assert not set(indices(rest)) & set(indices(held))
    assert np.array_equal(np.sort(np.concatenate([indices(rest), indices(held)])), np.arange(TRAIN_IMAGES))
    assert np.array_equal(held.labels, indices(held) % 10)  # labels travel with their images
    with pytest.raises(ValueError, match="ArraySource"):
        split_validation(object())


def test_fashion_mnist_holds_out_its_own_training_images():
    train = open_split("fashion-mnist", "train")
    rest, held = split_validation(train)
    chosen = validation_indices(len(train))
    assert np.array_equal(held.images, train.images[chosen]) and np.array_equal(held.labels, train.labels[chosen])
    assert len(rest) == 50_000


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("seed", ["0", "1"])
def test_every_recipe_and_seed_queries_the_same_10k_kept_out_of_pretraining_and_the_bank(monkeypatch, recipe, seed):
    sources = recipe_sources(monkeypatch, recipe, "--eval-on", "validation", "--seed", seed)
    held = set(validation_indices(TRAIN_IMAGES))
    assert sources.eval_on == "validation"
    assert np.array_equal(indices(sources.queries), validation_indices(TRAIN_IMAGES))
    assert not held & set(indices(sources.train)) and not held & set(indices(sources.bank))
    assert len(sources.bank) == 20_000  # the recipes' bank, drawn from the other 50k


def test_the_test_option_keeps_the_readme_setup(monkeypatch):
    """--eval-on test (the default): pretraining and the bank from all 60k, the test split queried."""
    sources = recipe_sources(monkeypatch, "fashion_mnist")
    assert sources.eval_on == "test" and len(sources.train) == TRAIN_IMAGES and len(sources.queries) == 10_000
    assert len(sources.bank) == 20_000 and set(indices(sources.bank)) & set(validation_indices(TRAIN_IMAGES))


def test_a_bad_eval_on_is_refused():
    from carp_fast.recipes import fashion_mnist

    with pytest.raises(SystemExit) as exit_:
        parse_settings(fashion_mnist.DEFAULTS, ["--eval-on", "val"])
    assert exit_.value.code == 2


# ---- the linear probe beside the k-NN ------------------------------------------------------------


def clusters(n_per_class: int, classes: int, dim: int, seed: int) -> Features:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(classes, dim) * 10
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return Features(centres[labels] + torch.randn(len(labels), dim, generator=generator), labels)


@pytest.mark.parametrize("classes, dim", [(2, 2), (10, 64)])
def test_the_probe_separates_separable_features(classes, dim):
    result = bank_probe(clusters(50, classes, dim, seed=0), clusters(20, classes, dim, seed=1), device="cpu")
    assert result.top1 == pytest.approx(100.0) and result.settings["epochs"] == RUN_PROBE["epochs"]


def test_the_probe_on_raw_pixels_of_a_tiny_subset_beats_chance():
    rest, held = split_validation(open_split("fashion-mnist", "train"))
    kw = dict(size=18, resize=18, batch_size=256, backend="torchvision", device="cpu", workers=1)
    bank = raw_pixel_features(eval_loader(rest.subset(600, 1), **kw))
    queries = raw_pixel_features(eval_loader(held.subset(300, 2), **kw))
    assert bank.features.shape == (600, 3 * 18 * 18)
    assert bank_probe(bank, queries, device="cpu").top1 > 40.0  # chance: 10 %


def test_a_short_recipe_run_reports_both_protocols_on_the_validation_split(tmp_path):
    """A run with --eval-on validation scores its teacher, the network at initialisation and the
    raw pixels with the k-NN and the probe, all on the held-out images against the same bank."""
    from carp_fast.eval.knn import knn_accuracy
    from carp_fast.recipes import fashion_mnist

    from .test_train import SMALL

    argv = [*SMALL, "--out", str(tmp_path), "--epochs", "1", "--eval-on", "validation", "--knn-random-init", "--linear-probe"]
    summary = fashion_mnist.main(argv)
    assert summary["eval_on"] == "validation"
    for key in ("knn_top1", "linear_top1", "knn_top1_random_init", "linear_top1_random_init",
                "knn_top1_raw_pixels", "linear_top1_raw_pixels"):
        assert 0 <= summary[key] <= 100, key
    # The pixel baselines again, from the sources the run's options choose: the same numbers.
    settings, config = parse_settings(fashion_mnist.DEFAULTS, argv)
    sources = open_sources(settings, config)
    kw = dict(size=settings.eval_size, resize=settings.eval_resize, batch_size=256, backend=settings.backend,
              device="cpu", workers=1)
    bank, queries = raw_pixel_features(eval_loader(sources.bank, **kw)), raw_pixel_features(eval_loader(sources.queries, **kw))
    knn = knn_accuracy(bank.features, bank.labels, queries.features, queries.labels, k=20, temperature=0.07)
    assert summary["knn_top1_raw_pixels"] == pytest.approx(knn.top1)
    assert summary["linear_top1_raw_pixels"] == pytest.approx(bank_probe(bank, queries).top1)


@pytest.mark.parametrize("linear_probe", [False, True])
def test_the_monitor_probes_the_features_it_extracted_for_the_knn(monkeypatch, linear_probe):
    """With linear_probe the monitor trains the probe on the same cached bank and query features
    as its k-NN (one extraction each), without it no probe."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, TensorDataset

    import carp_fast.eval.features as features
    from carp_fast.callbacks import KNNMonitor

    points = clusters(10, 3, 12, seed=0)
    loader = DataLoader(TensorDataset(points.features.view(-1, 3, 2, 2), points.labels), batch_size=8)
    calls = []
    extract = features.extract_features
    monkeypatch.setattr(features, "extract_features", lambda *a, **kw: calls.append(1) or extract(*a, **kw))
    monitor = KNNMonitor(loader, loader, k=3, linear_probe=linear_probe)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 12))
    with torch.no_grad():  # the identity: the features are the separable points
        backbone[1].weight.copy_(torch.eye(12)), backbone[1].bias.zero_()
    monitor.learn = SimpleNamespace(model=SimpleNamespace(teacher=SimpleNamespace(backbone=backbone)))
    top1, _ = monitor.evaluate()
    assert len(calls) == 2 and top1 == pytest.approx(100.0)
    assert monitor.probe_top1 == (pytest.approx(100.0) if linear_probe else None)


# ---- benchmarks/tune_embedded.py tunes on the validation split -------------------------------------


def test_tune_embedded_scores_on_validation_unless_told_and_tabulates_both_protocols(monkeypatch, tmp_path):
    import json
    import subprocess
    from types import SimpleNamespace

    from benchmarks import tune_embedded

    commands = []

    def fake_run(command, **kw):  # the recipe's process: writes what a run writes
        commands.append(command)
        out = Path(command[command.index("--out") + 1])
        out.mkdir(parents=True)
        eval_on = command[command.index("--eval-on") + 1]
        (out / "summary.json").write_text(json.dumps({"knn_top1": 80.0, "linear_top1": 81.0, "eval_on": eval_on}))
        (out / "metrics.jsonl").write_text(json.dumps({"images_per_s": 400.0}) + "\n")
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(tune_embedded, "ROOT", tmp_path)
    monkeypatch.setattr(tune_embedded, "RESULTS", tmp_path / "results.jsonl")
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(tune_embedded, "cpu_name", lambda: "a CPU")
    tune_embedded.run("a", ["--base-lr", "1e-3"], recipe="fashion_mnist_massl")
    tune_embedded.run("b", [], eval_on="test")
    assert commands[0][1].endswith("recipes/fashion_mnist_massl.py") and commands[0][-4:] == ["--eval-on", "validation", "--base-lr", "1e-3"]
    assert commands[1][-2:] == ["--eval-on", "test"]
    with pytest.raises(SystemExit, match="before --"):
        tune_embedded.run("c", ["--eval-on", "test"])
    lines = tune_embedded.table().splitlines()
    assert lines[2].startswith("| a | fashion_mnist_massl | validation | `--base-lr 1e-3` | 80.00 % | 81.00 % |")
    assert lines[3].startswith("| b | fashion_mnist | test |")
