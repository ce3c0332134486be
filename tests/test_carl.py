"""CARL (carp_fast.carl) and CARP without a teacher: the loss against the paper's formulas written
out by hand, no gradient into the targets, no teacher built or saved, lambda_e's schedule, and
runs through the recipes (resume, export, `carp-fast eval` on a checkpoint with no teacher)."""

import json
import math

import pytest
import torch

from carp_fast.callbacks import EntropyWeightSchedule, TeacherEMA, entropy_weight
from carp_fast.carl import CARL, CARLConfig
from carp_fast.carp import CARP, CARPConfig, CARPStudentTeacher
from carp_fast.eval.checkpoints import load_backbone
from carp_fast.loss import BlockLogits, CARPLoss
from carp_fast.recipes import fashion_mnist, fashion_mnist_carl, in1k_carl

# A Fashion-MNIST run of a few seconds per epoch on 2 CPU cores.
SMALL = [
    "--arch", "resnet10_tiny", "--hidden-dim", "64", "--embed-dim", "32", "--batch-size", "64", "--global-batch", "64",
    "--train-images", "384", "--knn-bank", "600", "--knn-queries", "300", "--workers", "1", "--log-every", "2",
    "--precision", "fp32", "--no-progress", "--minutes", "none",
]
K = 128


# ---- the loss, written from the paper ---------------------------------------------------------


def softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def carl_loss_by_hand(logits, n_global, lam):
    """CARP's eq. 3-4 with one block and no teacher (its appendix B.2, "w/o mom. enc."): the
    targets are the student's own probabilities of the global views. ``logits`` [V][N][K] of
    Python floats. consistency: mean over pairs (student view i, target view j), i != j, and
    over the images, of -log <s_i, t_j>; entropy: log K + sum_k pbar_k log pbar_k, pbar the
    mean of all student and all target probabilities; total: consistency + lam * entropy."""
    s = [[softmax(x) for x in view] for view in logits]
    t = s[:n_global]
    pair_losses = []
    for i, s_i in enumerate(s):
        for j, t_j in enumerate(t):
            if i != j:
                dots = [sum(a * b for a, b in zip(s_i[n], t_j[n])) for n in range(len(s_i))]
                pair_losses.append(sum(-math.log(d) for d in dots) / len(dots))
    consistency = sum(pair_losses) / len(pair_losses)
    rows = [p for view in s + t for p in view]
    k = len(rows[0])
    pbar = [sum(r[c] for r in rows) / len(rows) for c in range(k)]
    entropy = math.log(k) + sum(p * math.log(p) for p in pbar)
    return consistency, entropy, consistency + lam * entropy


@pytest.mark.parametrize("lam", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("views, n, k", [(2, 1, 3), (3, 2, 4), (4, 3, 5)])  # 2 global crops (+ local crops)
def test_the_carl_loss_is_the_papers_with_lambda_e(lam, views, n, k):
    logits = torch.randn(views, n, k, generator=torch.Generator().manual_seed(views * 10 + k), dtype=torch.float64) * 2
    expected = carl_loss_by_hand(logits.tolist(), 2, lam)
    student = logits[:, :, None, :]  # [V_s, N, P = 1, B = K]: one block of all K prototypes
    pred = BlockLogits(student, student[:2].detach(), torch.arange(k)[None])  # what the no-teacher forward returns
    loss = CARPLoss(entropy_weight=lam)
    total = loss(pred)
    assert torch.allclose(torch.stack(list(loss.parts)), torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert math.isclose(total.item(), expected[2], rel_tol=1e-10, abs_tol=1e-12)


def tiny_model(teacher=False, block_size=K, local_crops=1):
    torch.manual_seed(0)
    return CARPStudentTeacher("resnet10_tiny", n_prototypes=K, block_size=block_size, hidden_dim=16, embed_dim=8,
                              teacher=teacher), [torch.randn(4, 3, 16, 16)] * 2 + [torch.randn(4, 3, 8, 8)] * local_crops


def test_without_a_teacher_the_targets_are_the_students_global_crops_detached():
    model, crops = tiny_model()
    pred = model(*crops)
    assert pred.student.shape == (3, 4, 1, K) and pred.teacher.shape == (2, 4, 1, K)
    assert torch.equal(pred.teacher, pred.student[:2].detach())
    assert not pred.teacher.requires_grad and pred.teacher.grad_fn is None


def test_no_gradient_reaches_the_targets():
    """The gradient of the loss equals that of the hand formula with the targets as constants,
    and a target tensor that asks for a gradient gets none."""
    logits = torch.randn(3, 2, 1, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    student = logits.clone().requires_grad_()
    targets = logits[:2].clone().requires_grad_()
    CARPLoss(entropy_weight=1.5)(BlockLogits(student, targets, torch.arange(6)[None])).backward()
    assert targets.grad is None

    reference = logits.clone().requires_grad_()
    s, t = reference.softmax(-1), logits[:2].softmax(-1)  # t: constants
    pairs = [(i, j) for i in range(3) for j in range(2) if i != j]
    consistency = sum(-(s[i] * t[j]).sum(-1).log().mean() for i, j in pairs) / len(pairs)
    pbar = torch.cat([s, t]).mean(dim=(0, 1))
    (consistency + 1.5 * (math.log(6) + (pbar * pbar.log()).sum())).backward()
    assert torch.allclose(student.grad, reference.grad, rtol=1e-10, atol=1e-14)

    model, crops = tiny_model()  # and through the network: the student alone has gradients
    pred = model(*crops)
    CARPLoss()(pred).backward()
    assert all(p.grad is not None for p in model.student.parameters() if p.requires_grad)


def test_a_model_without_a_teacher_builds_none():
    model, _ = tiny_model()
    assert "teacher" not in dict(model.named_children()) and model.teacher is model.student
    assert not any(k.startswith("teacher.") for k in model.state_dict())
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from torch.utils.data import DataLoader, TensorDataset

    crops = torch.randn(8, 3, 16, 16)
    loader = DataLoader(TensorDataset(crops, crops, torch.zeros(8)), batch_size=4)
    learn = Learner(DataLoaders(loader, loader), model, loss_func=CARPLoss(), cbs=[TeacherEMA()])
    with pytest.raises(ValueError, match="no teacher network"):  # an EMA callback on it is a clear error
        learn.fit(1)
    with_teacher, _ = tiny_model(teacher=True)
    assert sum(p.numel() for p in with_teacher.parameters()) == 2 * sum(p.numel() for p in model.parameters())


# ---- lambda_e ---------------------------------------------------------------------------------


@pytest.mark.parametrize("progress, expected", [
    (0.0, 2.0), (0.25, 1 + 0.5 * (1 + math.sqrt(0.5))), (0.5, 1.5), (0.75, 1 + 0.5 * (1 - math.sqrt(0.5))), (1.0, 1.0),
    (-0.1, 2.0), (1.5, 1.0),
])
def test_the_entropy_weight_is_a_cosine_from_start_to_end(progress, expected):
    assert math.isclose(entropy_weight(progress, 2.0, 1.0), expected, rel_tol=1e-12)
    assert entropy_weight(progress, 0.7, None) == 0.7  # no end: constant


def test_the_defaults_are_carp_with_no_teacher_one_block_and_a_decaying_weight():
    config = CARLConfig(n_prototypes=256)
    assert (config.block_size, config.teacher, config.entropy_weight, config.final_entropy_weight) == (256, False, 2.0, 1.0)
    callbacks = CARL.callbacks(config)
    assert not any(isinstance(cb, TeacherEMA) for cb in callbacks)
    assert [(cb.start, cb.end) for cb in callbacks if isinstance(cb, EntropyWeightSchedule)] == [(2.0, 1.0)]
    assert CARL.build_model(config).ema_teacher is False
    with pytest.raises(ValueError, match="CARL has no teacher"):
        CARLConfig(n_prototypes=256, teacher=True)
    carp = CARPConfig()  # CARP itself: a teacher, lambda_e = 1, no schedule
    assert carp.teacher and carp.entropy_weight == 1.0 and carp.final_entropy_weight is None
    assert any(isinstance(cb, TeacherEMA) for cb in CARP.callbacks(carp))
    assert not any(isinstance(cb, EntropyWeightSchedule) for cb in CARP.callbacks(carp))


# ---- runs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def carl_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("carl")
    summary = fashion_mnist_carl.main([*SMALL, "--n-prototypes", str(K), "--epochs", "3", "--knn-random-init", "--out", str(out)])
    return out, summary


def test_a_carl_run_creates_and_saves_no_teacher(carl_run):
    out, summary = carl_run
    state = torch.load(out / "checkpoint.pth", weights_only=False)
    assert {k.split(".")[0] for k in state["model"]} == {"student", "partitioner"}
    assert state["model"]["student.prototypes.weight"].shape == (K, 32)
    assert state["settings"]["teacher"] is False and state["settings"]["block_size"] == K  # one block
    # The exported backbone is the student's, and the evaluation loads it as "the teacher" too.
    exported = torch.load(out / "backbone_teacher.pth", weights_only=True)
    student = {k.removeprefix("student.backbone."): v for k, v in state["model"].items() if k.startswith("student.backbone.")}
    assert exported.keys() == student.keys() and all(torch.equal(exported[k], student[k]) for k in student)
    for which in ("teacher", "student"):
        backbone = load_backbone(out / "checkpoint.pth", which=which)
        assert all(torch.equal(v, student[k]) for k, v in backbone.state_dict().items())
    assert summary["method"] == "carl" and 0 <= summary["knn_top1"] <= 100


def test_a_carl_run_decays_lambda_e_and_its_loss_falls(carl_run):
    out, _ = carl_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if "loss" in r]
    steps = 3 * 384 // 64
    for r in epochs:  # the value of the epoch's last step s - 1, at progress (s - 1) / S
        assert r["momentum"] == 0.0  # eta = 0: the teacher is the student
        assert math.isclose(r["entropy_weight"], 1 + 0.5 * (1 + math.cos(math.pi * (r["step"] - 1) / steps)), rel_tol=1e-9)
    assert epochs[-1]["consistency"] < epochs[0]["consistency"] and epochs[-1]["loss"] < epochs[0]["loss"]


def test_a_carl_run_resumes_and_carp_fast_eval_reads_its_checkpoint(carl_run, tmp_path):
    out, _ = carl_run
    summary = fashion_mnist_carl.main([*SMALL, "--n-prototypes", str(K), "--epochs", "4", "--out", str(out), "--resume"])
    state = torch.load(out / "checkpoint.pth", weights_only=False)
    assert summary["epochs_run"] == 4 and state["epoch"] == 4 and state["train_iter"] == 4 * 384 // 64
    assert not any(k.startswith("teacher.") for k in state["model"])

    from carp_fast.eval.cli import main as eval_main

    result = tmp_path / "knn.json"
    assert eval_main(["knn", "--checkpoint", str(out / "checkpoint.pth"), "--data", "fashion-mnist", "--train-limit", "300",
                      "--test-limit", "100", "--k", "5", "--out", str(result), "--cache-dir", str(tmp_path / "cache"),
                      "--no-progress", "--backend", "torchvision", "--workers", "1"]) == 0
    assert 0 <= json.loads(result.read_text())["results"][0]["top1"] <= 100


def test_carp_with_the_teacher_off_runs(tmp_path):
    summary = fashion_mnist.main([*SMALL, "--n-prototypes", str(K), "--block-size", "16", "--no-teacher", "--epochs", "1",
                                  "--out", str(tmp_path)])
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert summary["method"] == "carp" and state["settings"]["block_size"] == 16 and not state["settings"]["teacher"]
    assert not any(k.startswith("teacher.") for k in state["model"])
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(line["loss"]) and "entropy_weight" not in line  # lambda_e = 1, no schedule


def test_the_imagenet_recipe_is_the_carp_recipe_without_a_teacher():
    from carp_fast.options import parse_settings
    from carp_fast.recipes import in1k_mc
    from carp_fast.run import TrainSettings

    settings, config = parse_settings((TrainSettings, CARLConfig), {**in1k_carl.DEFAULTS, "data": "fashion-mnist"}, [])
    _, carp = parse_settings((TrainSettings, CARPConfig), {**in1k_mc.DEFAULTS, "data": "fashion-mnist"}, [])
    assert (config.arch, config.n_prototypes, config.block_size, config.teacher) == ("resnet50", 65536, 65536, False)
    for name in ("optimizer", "base_lr", "final_lr", "global_batch", "batch_size", "weight_decay"):
        assert getattr(config, name) == getattr(carp, name), name
    assert (settings.global_size, settings.local_size, settings.local_crops) == (224, 96, 6)


@pytest.mark.slow  # about 25 s on 2 CPU cores
def test_the_ablation_suite_runs_in_its_quick_mode(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.ablation_suite import main

    table = main(["--quick", "--out", str(tmp_path)])
    rows = {(t["suite"], t["label"]) for t in table}
    assert ("a", "K=64 B=64 random (one block)") in rows and ("a", "K=64 B=64 random (one block, no teacher: CARL)") in rows
    assert {("b", f"K=64 B=8 {p}, {n} steps") for p in ("random", "fixed") for n in (2, 4)} <= rows
    assert ("c", "K=64 B=64 random (one block, no teacher: CARL) lambda_e=2->1") in rows
    assert ("-", "random initialisation (no training)") in rows
    assert all(0 <= t["knn_mean"] <= 100 for t in table)
    assert (tmp_path / "ablations.png").stat().st_size > 0 and "| suite |" in (tmp_path / "table.md").read_text()
    # (a) 2 blocks x teacher on/off, (b) 2 partitions x 2 lengths, (c) 3 schedules, less the two runs
    # that are (a)'s and are trained once: (b)'s random partition at (a)'s 2 steps and block 8, and
    # (c)'s constant lambda_e = 1, which is (a)'s one block without a teacher
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2 * 2 + 2 * 2 + 3 - 2
    # a second call (an interrupted suite started again) reads the finished runs back and trains none
    again = main(["--quick", "--out", str(tmp_path)])
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2 * 2 + 2 * 2 + 3 - 2
    assert [(t["label"], t["knn_mean"]) for t in again] == [(t["label"], t["knn_mean"]) for t in table]


def test_the_ablations_train_and_bank_outside_the_validation_split_and_score_on_it():
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import ablations
    from carp_fast.pipelines import load_fashion_mnist
    from carp_fast.pipelines.validation import validation_indices

    images = load_fashion_mnist("train").images
    held = validation_indices(len(images))  # the split, computed apart from the module
    rest = np.setdiff1d(np.arange(len(images)), held)
    np.testing.assert_array_equal(ablations.fashion_mnist("validation").images, images[held])
    np.testing.assert_array_equal(ablations.fashion_mnist("train").images, images[rest])  # training and the bank draw here
    assert ablations.AblationSetting().eval_on == "validation"
    with pytest.raises(ValueError, match="eval_on"):
        ablations.knn_loaders(10, 10, "train")
