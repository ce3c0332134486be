"""SOP (carp_fast.sop): votes, probabilities and loss against computations written from the paper
(DESIGN section 11), the memory's timing and gradients, anchors on two processes, and runs of
its recipe (outputs, resume, export, `carp-fast eval`)."""

import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

from carp_fast.sop import (
    AnchorSampler, SOPConfig, SOPLoss, SOPStudentTeacher, block_masks, build_tasks, keep_anchors, mim_loss, nearest_neighbours,
    sop_loss, sop_probabilities, vit_tokens, voting_matrix,
)
from tests.conftest import run_ranks

# ---- references written from the paper, in plain Python ---------------------------------------


def reference_votes(scores, eps):
    """Y as DESIGN section 11 states it: support (a, j) gives w to column a and (1 - w) / (P' - 1) to
    the others; w = 1 - eps for the anchor itself (j = 0), else its cosine, clamped to [0, 1]."""
    n_sops = len(scores)
    rows = []
    for a, group in enumerate(scores):
        for j, s in enumerate(group):
            w = 1 - eps if j == 0 else min(max(s, 0.0), 1.0)
            rows.append([w if c == a else (1 - w) / (n_sops - 1) for c in range(n_sops)])
    return rows


def reference_probabilities(cosines, votes, tau):
    """softmax(c / tau) Y for one view and one task: a list of P' probabilities."""
    e = [math.exp(c / tau) for c in cosines]
    weights = [x / sum(e) for x in e]
    return [sum(w * row[c] for w, row in zip(weights, votes)) for c in range(len(votes[0]))]


def reference_loss(student, teacher, votes, tau_s, tau_t):
    """Mean over pairs (i, j), i != j, images and tasks of -sum_c q_jc log max(p_ic, eps).

    student [V_s][N][T][S], teacher [V_t][N][T][S], votes [T][S][P'] as nested lists."""
    eps = torch.finfo(torch.float32).eps
    total, count = 0.0, 0
    for i, s_view in enumerate(student):
        for j, t_view in enumerate(teacher):
            if i == j:
                continue
            for s_img, t_img in zip(s_view, t_view):
                for t, (s_task, t_task) in enumerate(zip(s_img, t_img)):
                    p = reference_probabilities(s_task, votes[t], tau_s)
                    q = reference_probabilities(t_task, votes[t], tau_t)
                    total += -sum(qc * math.log(max(pc, eps)) for pc, qc in zip(p, q))
                    count += 1
    return total / count


# ---- votes, probabilities and loss ------------------------------------------------------------


def test_the_votes_of_two_sops_by_hand():
    # P' = 2 SOPs, k = 2 supports each: the anchor (its own score replaced by 1 - eps) and one neighbour.
    votes = voting_matrix(torch.tensor([[[0.3, 0.8], [0.2, 0.5]]]), smoothing=0.1)
    expected = torch.tensor([[[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.5, 0.5]]])
    torch.testing.assert_close(votes, expected)


@pytest.mark.parametrize("n_sops,k", [(2, 1), (3, 2), (5, 4)])
def test_votes_match_the_reference_rows_sum_to_one_and_none_is_negative(n_sops, k):
    scores = torch.rand(n_sops, k, generator=torch.Generator().manual_seed(k)) * 2 - 1  # cosines in [-1, 1]: some negative
    votes = voting_matrix(scores[None], smoothing=0.1)[0]  # [S, P']
    torch.testing.assert_close(votes, torch.tensor(reference_votes(scores.tolist(), 0.1)))
    torch.testing.assert_close(votes.sum(-1), torch.ones(n_sops * k))
    assert (votes >= 0).all()


def test_the_official_votes_go_negative_where_ours_do_not():
    # A neighbour at cosine -0.5 with P' = 2: the official row is [s, (1 - s) / (P' - 1)] = [-0.5, 1.5].
    s = -0.5
    assert min(s, (1 - s) / 1) < 0
    votes = voting_matrix(torch.tensor([[[0.9, s], [0.9, 0.9]]]), smoothing=0.1)[0]
    torch.testing.assert_close(votes[1], torch.tensor([0.0, 1.0]))  # a vote of 0 for its anchor, the rest to the other


def test_probabilities_and_loss_on_a_hand_case():
    g = torch.Generator().manual_seed(0)
    n_sops, k, n_tasks = 3, 2, 2
    scores = torch.rand(n_tasks, n_sops, k, generator=g)
    votes = voting_matrix(scores, smoothing=0.1)  # [T, S, P']
    student = torch.randn(3, 2, n_tasks, n_sops * k, generator=g).tanh()  # [V_s, N, T, S] cosines
    teacher = torch.randn(2, 2, n_tasks, n_sops * k, generator=g).tanh()
    p = sop_probabilities(student, votes, 0.1)
    for v in range(3):
        for n in range(2):
            for t in range(n_tasks):
                expected = reference_probabilities(student[v, n, t].tolist(), votes[t].tolist(), 0.1)
                torch.testing.assert_close(p[v, n, t], torch.tensor(expected), rtol=1e-5, atol=1e-6)
    loss = sop_loss(student, teacher, votes, student_temperature=0.1, teacher_temperature=0.04)
    expected = reference_loss(student.tolist(), teacher.tolist(), votes.tolist(), 0.1, 0.04)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_one_support_per_sop_and_no_smoothing_is_a_plain_softmax_over_the_anchors():
    # k = 1, eps = 0: Y is the identity and the loss is MaSSL's over one block of anchors.
    g = torch.Generator().manual_seed(1)
    votes = voting_matrix(torch.rand(1, 4, 1, generator=g), smoothing=0.0)
    torch.testing.assert_close(votes[0], torch.eye(4))
    # cosines within 0.5 of each other: every p above the log's floor eps, where the clamp is inactive
    student, teacher = torch.rand(2, 3, 1, 4, generator=g) / 2, torch.rand(2, 3, 1, 4, generator=g) / 2
    loss = sop_loss(student, teacher, votes, student_temperature=0.1, teacher_temperature=0.04)
    plain = -(F.softmax(teacher.flip(0) / 0.04, -1) * F.log_softmax(student / 0.1, -1)).sum(-1).mean()  # pairs (0, 1), (1, 0)
    torch.testing.assert_close(loss, plain)


def test_the_log_is_clamped_no_nan_where_a_probability_underflows():
    votes = torch.eye(2)[None]  # [T=1, S=2, P'=2]
    student = torch.tensor([[1.0, -1.0], [1.0, -1.0]]).view(2, 1, 1, 2).requires_grad_()  # p = [1, exp(-20 / tau_s)] = [1, 0]
    teacher = torch.tensor([[-1.0, 1.0], [-1.0, 1.0]]).view(2, 1, 1, 2)  # q = [0, 1]: the official -log(0) is inf
    assert sop_probabilities(student, votes, 0.001)[0, 0, 0, 1] == 0
    loss = sop_loss(student, teacher, votes, student_temperature=0.001, teacher_temperature=0.04)
    loss.backward()
    assert loss.item() == pytest.approx(-math.log(torch.finfo(torch.float32).eps), rel=1e-4)
    assert torch.isfinite(student.grad).all()


def test_the_loss_is_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(2)
    votes = voting_matrix(torch.rand(2, 4, 3, generator=g), smoothing=0.1)
    student, teacher = torch.randn(2, 5, 2, 12, generator=g).tanh(), torch.randn(2, 5, 2, 12, generator=g).tanh()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sop_loss(student.bfloat16(), teacher.bfloat16(), votes)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, sop_loss(student.bfloat16().float(), teacher.bfloat16().float(), votes))


# ---- anchors, neighbours and the selection ----------------------------------------------------


def unit_memory(k=64, d=8, seed=0):
    return F.normalize(torch.randn(k, d, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize("n_tasks,n_anchors,k", [(1, 1, 1), (3, 5, 4)])
def test_neighbours_are_the_brute_force_top_k_of_the_pool_disjoint_from_the_anchors(n_tasks, n_anchors, k):
    memory = unit_memory()
    anchors = AnchorSampler(64, n_tasks, n_anchors, seed=3)()
    assert all(len(set(row)) == n_anchors for row in anchors.tolist())  # distinct within a task
    scores, slots = nearest_neighbours(memory, anchors, k)
    m64 = memory.double()
    for t in range(n_tasks):
        pool = [i for i in range(64) if i not in anchors[t].tolist()]
        for p, a in enumerate(anchors[t].tolist()):
            ranked = sorted(pool, key=lambda i: -float(m64[a] @ m64[i]))[:k]
            assert slots[t, p].tolist() == ranked
            assert not set(slots[t, p].tolist()) & set(anchors[t].tolist())
            torch.testing.assert_close(scores[t, p].double(), torch.stack([m64[a] @ m64[i] for i in ranked]), rtol=0, atol=1e-6)


def test_neighbour_search_is_float32_and_ranks_as_float64_under_bf16_autocast():
    memory, anchors = unit_memory(k=512, d=32), torch.arange(16).view(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, slots = nearest_neighbours(memory, anchors, 5)
    assert scores.dtype == torch.float32
    _, reference = nearest_neighbours(memory.double(), anchors, 5)
    assert torch.equal(slots, reference)


def test_build_tasks_puts_each_anchor_first_and_votes_with_the_cosines_to_it():
    memory, anchors = unit_memory(), torch.tensor([[3, 9, 27, 40]])
    supports, votes = build_tasks(memory, anchors, kept=2, neighbours=3, smoothing=0.1)  # [1, 6], [1, 6, 2]
    groups = supports.view(1, 2, 3)
    assert groups[0, :, 0].tolist() == [3, 9]  # uniform: the first P' anchors (already in random order)
    _, slots = nearest_neighbours(memory, anchors, 2)
    assert torch.equal(groups[..., 1:], slots[:, :2])
    cosines = [[float(memory[a] @ memory[s]) for s in group] for a, group in zip([3, 9], groups[0].tolist())]
    torch.testing.assert_close(votes[0], torch.tensor(reference_votes(cosines, 0.1)))


def test_the_spread_selection_weights_by_mean_over_std_and_never_crashes():
    # Neighbour scores [T=1, P=3, k-1=3]: anchor 0 has mean 0.8 and a tiny spread, anchor 1 a large spread,
    # anchor 2 a negative mean (the official weight, mean / |mean|, is -1: torch.multinomial refuses it).
    scores = torch.tensor([[[0.8, 0.8001, 0.7999], [0.9, 0.1, 0.5], [-0.2, -0.3, -0.1]]])
    with pytest.raises(RuntimeError):
        torch.multinomial(scores.mean(-1) / scores.mean(-1).abs().neg(), 1)  # the official weights of the negative case
    picks = [keep_anchors(scores, 1, "spread", torch.Generator().manual_seed(s)).item() for s in range(50)]
    assert picks.count(0) >= 49  # weight 0.8 / 1e-4 against 0.5 / 0.4 and 0
    assert sorted(keep_anchors(scores, 3, "spread", torch.Generator().manual_seed(0))[0].tolist()) == [0, 1, 2]
    all_negative = -scores.abs()
    assert keep_anchors(all_negative, 2, "spread", torch.Generator().manual_seed(0)).unique().numel() == 2


def test_the_anchor_sampler_resumes_from_its_state():
    sampler = AnchorSampler(100, 2, 10, seed=5)
    sampler()
    state = sampler.state_dict()
    expected = sampler()
    restored = AnchorSampler(100, 2, 10, seed=99)
    restored.load_state_dict(state)
    assert torch.equal(restored(), expected)


def _anchor_worker(rank, port, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # the global generators differ
    same_seed = AnchorSampler(4096, 4, 64, seed=0)
    other_seeds = AnchorSampler(4096, 4, 64, seed=rank)  # a rank seeded apart still gets rank 0's anchors
    drawn = [same_seed() for _ in range(3)] + [other_seeds() for _ in range(2)]
    memory = unit_memory(k=4096, d=16)
    supports, _ = build_tasks(memory, drawn[0], kept=32, neighbours=5, selection="spread",
                              generator=torch.Generator().manual_seed(rank))
    dist.destroy_process_group()
    queue.put((rank, ([a.numpy() for a in drawn], supports.numpy())))


def test_two_processes_draw_identical_anchors():
    results = run_ranks(_anchor_worker, 2, timeout=120)
    (anchors0, supports0), (anchors1, supports1) = results[0], results[1]
    for a, b in zip(anchors0, anchors1):
        assert (a == b).all()
    assert (supports0 == supports1).all()
    assert not (anchors0[0] == anchors0[1]).all()  # a fresh draw each step


# ---- the model: memory, gradients, timing -----------------------------------------------------


def tiny_model(**kw):
    torch.manual_seed(0)
    kw = dict(arch="resnet10_tiny", memory_size=64, tasks=2, anchors=8, sops=4, neighbours=3, hidden_dim=16, embed_dim=8) | kw
    return SOPStudentTeacher(**kw)


def crops(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 16, 16, generator=g), torch.randn(n, 3, 16, 16, generator=g), torch.randn(n, 3, 8, 8, generator=g)]


def test_no_gradient_reaches_the_memory_or_the_teacher():
    model = tiny_model().train()
    out = model(*crops())
    SOPLoss()(out).backward()
    assert not model.memory.embeddings.requires_grad and model.memory.embeddings.grad is None
    assert not out.teacher.requires_grad and not out.votes.requires_grad
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())


def test_the_memory_write_comes_after_and_changes_nothing_the_step_used():
    model, x = tiny_model().train(), crops()
    before = model.memory.embeddings.clone()
    generator_state = model.anchor_sampler.state_dict()
    out = model(*x)
    loss = SOPLoss()(out)
    loss.backward()
    grads = [p.grad.clone() for p in model.student.parameters()]
    # The memory now holds the second global view's teacher embeddings at slots 0..7.
    with torch.no_grad():
        w = model.teacher.embed(x[:2])
    torch.testing.assert_close(model.memory.embeddings[:8], w[8:16])
    assert torch.equal(model.memory.embeddings[8:], before[8:]) and int(model.memory.pointer) == 8
    # The step's cosines are those to the memory as it was before the write.
    z = model.student.embed(x).detach()
    rows = before[out.partition.flatten()]
    torch.testing.assert_close(out.student.flatten(0, 1).flatten(1), z @ rows.t())
    torch.testing.assert_close(out.teacher.flatten(0, 1).flatten(1), w @ rows.t())
    # The same step with no write at all gives the same gradients.
    again = tiny_model().train()
    again.anchor_sampler.load_state_dict(generator_state)
    again.memory.write = lambda embeddings: None
    SOPLoss()(again(*x)).backward()
    for a, b in zip(grads, (p.grad for p in again.student.parameters())):
        torch.testing.assert_close(a, b)


def test_evaluation_forwards_leave_the_memory_alone():
    model = tiny_model().eval()
    before = model.memory.embeddings.clone()
    model(*crops())
    assert torch.equal(model.memory.embeddings, before) and int(model.memory.pointer) == 0


def test_a_few_steps_on_fixed_supports_lower_the_loss():
    # The memory filled with teacher embeddings of the data, the anchors redrawn from one state
    # every step: what changes is the student only, and its loss must fall.
    model, x = tiny_model(memory_size=16).train(), crops(n=16)
    with torch.no_grad():
        model.memory.embeddings.copy_(model.teacher.embed(x[:1]))
    memory, state = model.memory.embeddings.clone(), model.anchor_sampler.state_dict()
    opt = torch.optim.AdamW(model.student.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        model.memory.embeddings.copy_(memory)
        model.anchor_sampler.load_state_dict(state)
        loss = SOPLoss()(model(*x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses  # the teacher's entropy, fixed here, is the floor it falls toward


# ---- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad,match", [
    (dict(sops=1), "sops must be in"),
    (dict(sops=65), "sops must be in"),
    (dict(anchor_selection="low_energy"), "anchor_selection must be one of"),
    (dict(anchor_selection="spread", neighbours=2), "needs neighbours >= 3"),
    (dict(vote_smoothing=1.0), "vote_smoothing"),
    (dict(partition="fixed"), "partition must be 'random'"),
])
def test_bad_settings_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        SOPConfig(**bad)


def test_the_imagenet_recipe_is_the_official_vit_s_run():
    from carp_fast.options import parse_settings
    from carp_fast.recipes import in1k_sop
    from carp_fast.run import TrainSettings

    settings, config = parse_settings((TrainSettings, SOPConfig), {**in1k_sop.DEFAULTS, "data": "fashion-mnist"}, [])
    assert (config.arch, config.memory_size, config.tasks, config.block_size, config.sops, config.neighbours) == (
        "vit_small", 65536, 4, 64, 32, 9)
    assert (config.vote_smoothing, config.student_temperature, config.teacher_temperature, config.warmup_teacher_temperature) == (0.1, 0.1, 0.04, 0.04)
    assert (config.base_lr, config.final_lr, config.warmup_epochs, config.weight_decay, config.final_weight_decay) == (5e-4, 1e-6, 10, 0.04, 0.4)
    assert (config.clip_grad, config.teacher_momentum, config.drop_path, config.batch_size) == (3.0, 0.996, 0.1, 128)
    assert (settings.epochs, settings.local_crops, settings.global_scale, config.anchor_selection) == (100, 0, (0.14, 1.0), "uniform")
    assert (config.mim, config.patch_memory_size, config.patch_anchors, config.mask_ratio) == (True, 8192, 512, 0.3)
    assert config.memory_size % config.global_batch == 0 and config.patch_memory_size % config.global_batch == 0


# ---- runs of the recipe -----------------------------------------------------------------------

SMALL = [
    "--device", "cpu", "--arch", "resnet10_tiny", "--memory-size", "256", "--block-size", "16", "--sops", "8",
    "--neighbours", "3", "--hidden-dim", "64", "--embed-dim", "32", "--batch-size", "64", "--global-batch", "64",
    "--train-images", "256", "--knn-bank", "600", "--knn-queries", "300", "--workers", "1", "--log-every", "2",
    "--precision", "fp32", "--no-progress", "--minutes", "none", "--warmup-epochs", "0",
]


@pytest.fixture(scope="module")
def sop_run(tmp_path_factory):
    from carp_fast.recipes import fashion_mnist_sop

    out = tmp_path_factory.mktemp("sop")
    summary = fashion_mnist_sop.main([*SMALL, "--epochs", "2", "--knn-every", "1", "--out", str(out)])
    return out, summary


def test_a_run_writes_its_memory_anchor_state_metrics_and_a_strict_export(sop_run):
    out, summary = sop_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if "loss" in r]
    assert len(epochs) == 2 and all(math.isfinite(r["loss"]) for r in epochs)
    assert 0 < epochs[-1]["loss"] < math.log(8) + 1  # near or below log P' (8 SOPs), never NaN
    assert {"teacher_temperature", "slots_hit", "agreement", "cls_loss", "mim_loss"} <= set(epochs[0])
    # a ResNet: no MIM; the rest of the loss is the recipe's KoLeo term at its weight 0.1
    assert epochs[0]["mim_loss"] == 0 and epochs[0]["koleo"] != 0
    assert epochs[0]["loss"] == pytest.approx(epochs[0]["cls_loss"] + 0.1 * epochs[0]["koleo"], rel=1e-4)
    state = torch.load(out / "checkpoint.pth", weights_only=False)
    assert state["model"]["memory.embeddings"].shape == (256, 32)
    assert int(state["model"]["memory.pointer"]) == (2 * 4 * 64) % 256
    assert "anchor_sampler._extra_state" in state["model"] and not any(k.startswith("partitioner") for k in state["model"])
    assert summary["method"] == "sop" and 0 <= summary["knn_top1"] <= 100

    from carp_fast.backbones import build_backbone

    build_backbone("resnet10_tiny").load_state_dict(torch.load(out / "backbone_teacher.pth", weights_only=True))  # strict


def test_a_run_resumes_and_carp_fast_eval_reads_its_checkpoint(sop_run, tmp_path):
    from carp_fast.eval.checkpoints import load_backbone
    from carp_fast.eval.cli import main as eval_main
    from carp_fast.recipes import fashion_mnist_sop

    out, _ = sop_run
    summary = fashion_mnist_sop.main([*SMALL, "--epochs", "3", "--out", str(out), "--resume"])
    state = torch.load(out / "checkpoint.pth", weights_only=False)
    assert summary["epochs_run"] == 3 and state["epoch"] == 3 and state["train_iter"] == 3 * 256 // 64
    teacher = {k.removeprefix("teacher.backbone."): v for k, v in state["model"].items() if k.startswith("teacher.backbone.")}
    assert all(torch.equal(v, teacher[k]) for k, v in load_backbone(out / "checkpoint.pth").state_dict().items())
    result = tmp_path / "knn.json"
    assert eval_main(["knn", "--checkpoint", str(out / "checkpoint.pth"), "--data", "fashion-mnist", "--train-limit", "300",
                      "--test-limit", "100", "--k", "5", "--out", str(result), "--cache-dir", str(tmp_path / "cache"),
                      "--no-progress", "--backend", "torchvision", "--workers", "1"]) == 0
    assert 0 <= json.loads(result.read_text())["results"][0]["top1"] <= 100


@pytest.mark.slow  # about 80 s on 2 CPU cores
@pytest.mark.filterwarnings("ignore:SOP assignments are collapsing")  # 8 SOPs over 64 slots, early steps
def test_the_embedded_recipe_with_the_small_image_vit_trains_sop_mim_and_its_loss_falls(tmp_path):
    """The embedded recipe's other backbone (BENCHMARKS.md: the ResNet did better on the validation
    split at equal minutes): a short run of vit_mini_p2 with SOP-MIM on the same 256 images."""
    from carp_fast.recipes import fashion_mnist_sop

    # memories of one step's 64 writes: real teacher embeddings from the second step on
    small_vit = [*SMALL, "--arch", "vit_mini_p2", "--memory-size", "64", "--patch-memory-size", "64", "--patch-anchors", "32",
                 "--epochs", "6", "--knn-every", "0", "--out", str(tmp_path)]
    summary = fashion_mnist_sop.main(small_vit)
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in epochs if "loss" in r]  # one per epoch: 6.04 -> 5.51 when it was written
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert all(r["mim_loss"] > 0 for r in epochs if "loss" in r)
    assert losses[-1] < 0.97 * losses[0], losses
    assert summary["method"] == "sop"


# ---- two processes through Accelerate ---------------------------------------------------------

STEPS, GLOBAL, MEMORY = 3, 8, 16  # the memory wraps around during the run


def _train(rows_per_step, batch_size):
    """STEPS steps of a tiny ViT SOP; step k uses images rows_per_step[k]. Returns (losses, student parameters, memory)."""
    from fastai.data.core import DataLoaders
    from torch.utils.data import DataLoader, Subset

    from carp_fast.sop import sop_learner
    from tests.conftest import crop_dataset
    from tests.test_massl_memory import tiny_vit

    data = crop_dataset(n_images=STEPS * GLOBAL, seed=3)
    train = DataLoader(Subset(data, [i for rows in rows_per_step for i in rows]), batch_size=batch_size, shuffle=False)
    dls = DataLoaders(train, DataLoader(Subset(data, []), batch_size=batch_size))
    config = SOPConfig(arch="resnet10_tiny", memory_size=MEMORY, block_size=4, sops=2, neighbours=3, tasks=2, hidden_dim=24,
                       embed_dim=8, batch_size=batch_size, global_batch=GLOBAL, base_lr=0.05, warmup_epochs=0, log_every=1,
                       precision="fp32", drop_path=0.0, teacher_momentum=0.9)
    torch.manual_seed(0)
    model = SOPStudentTeacher(tiny_vit, memory_size=MEMORY, tasks=2, anchors=4, sops=2, neighbours=3, hidden_dim=24,
                              embed_dim=8, drop_path=0.0, mim=False)  # each rank masks its own images: the [CLS] loss alone
    learn = sop_learner(dls, config, progress=False, model=model)
    learn.fit(1)
    model = getattr(learn.model, "module", learn.model)
    return ([r["loss"] for r in learn.sop_stats.history], [p.detach().clone() for p in model.student.parameters()],
            model.memory.embeddings.clone())


def _run_worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", ACCELERATE_USE_CPU="1")
    half = GLOBAL // 2
    losses, params, memory = _train([list(range(k * GLOBAL + rank * half, k * GLOBAL + (rank + 1) * half)) for k in range(STEPS)], half)
    queue.put((rank, (losses, [p.numpy() for p in params], memory.numpy())))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:SOP assignments are collapsing")  # 2 SOPs, 8 images: expected
def test_a_two_process_run_takes_the_steps_of_one_process():
    results = run_ranks(_run_worker, 2, timeout=300)
    losses, params, memory = _train([list(range(k * GLOBAL, (k + 1) * GLOBAL)) for k in range(STEPS)], GLOBAL)
    memories = [torch.from_numpy(results[r][2]) for r in (0, 1)]
    torch.testing.assert_close(memories[0], memories[1], rtol=0, atol=0)  # the same memory on every rank
    torch.testing.assert_close(memories[0], memory, rtol=1e-4, atol=1e-5)
    for a, b, c in zip(results[0][1], results[1][1], params):
        torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), rtol=0, atol=0)
        torch.testing.assert_close(torch.from_numpy(a), c, rtol=1e-4, atol=1e-5)
    for step in range(STEPS):  # equal halves: the ranks' losses average to the one process's
        assert (results[0][0][step] + results[1][0][step]) / 2 == pytest.approx(losses[step], rel=1e-5)


# ---- SOP-MIM ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n,h,w,ratio", [(1, 4, 4, 0.3), (6, 14, 14, 0.3), (3, 7, 5, 0.5)])
def test_block_masks_mask_about_the_ratio_in_blocks(n, h, w, ratio):
    masks = block_masks(n, h, w, ratio, rng=random.Random(0))
    assert masks.shape == (n, h, w) and masks.dtype == torch.bool
    counts = masks.flatten(1).sum(1)
    assert (counts <= round(ratio * h * w)).all() and (counts >= 1).all()


def test_vit_tokens_are_the_backbone_s_without_a_mask_and_ignore_masked_pixels():
    from tests.test_massl_memory import tiny_vit

    torch.manual_seed(0)
    vit, images = tiny_vit().eval(), torch.randn(2, 3, 16, 16)
    cls, patches = vit_tokens(vit, images)
    torch.testing.assert_close(cls, vit(images))
    assert patches.shape == (2, 16, 32)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1:3, 0:2] = True  # patches (1, 0), (1, 1), (2, 0), (2, 1) of image 0: pixels 4-11 x 0-7
    token = torch.randn(32)
    changed = images.clone()
    changed[0, :, 4:12, 0:8] = torch.randn(3, 8, 8)  # only pixels under the mask
    for a, b in zip(vit_tokens(vit, images, mask, token), vit_tokens(vit, changed, mask, token)):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(vit_tokens(vit, changed)[0], cls)  # unmasked, those pixels matter


def test_the_mim_loss_counts_only_masked_tokens_as_the_paper_states():
    g = torch.Generator().manual_seed(4)
    votes = voting_matrix(torch.rand(1, 3, 1, generator=g), smoothing=0.1)  # one task, k = 1, 3 SOPs
    student = torch.rand(2, 2, 4, 1, 3, generator=g)  # [V_t, N, L, T, S]
    teacher = torch.rand(2, 2, 4, 1, 3, generator=g)
    mask = torch.tensor([[[1, 0, 1, 0], [0, 0, 0, 0]], [[1, 1, 1, 1], [0, 1, 0, 0]]], dtype=torch.bool)
    loss = mim_loss(student, teacher, votes, mask, student_temperature=0.1, teacher_temperature=0.04)
    per_image = []
    for v in range(2):
        for n in range(2):
            terms = []
            for l in range(4):
                if mask[v, n, l]:
                    p = reference_probabilities(student[v, n, l, 0].tolist(), votes[0].tolist(), 0.1)
                    q = reference_probabilities(teacher[v, n, l, 0].tolist(), votes[0].tolist(), 0.04)
                    terms.append(-sum(qc * math.log(pc) for pc, qc in zip(p, q)))
            per_image.append(sum(terms) / max(len(terms), 1))  # an image with no masked token counts 0
    assert loss.item() == pytest.approx(sum(per_image) / 4, rel=1e-5)
    other = student.clone()
    other[~mask] = torch.rand(int((~mask).sum()), 1, 3, generator=g)  # unmasked tokens do not matter
    torch.testing.assert_close(mim_loss(other, teacher, votes, mask, student_temperature=0.1, teacher_temperature=0.04), loss)


def test_a_vit_trains_the_mask_token_and_writes_the_patch_memory():
    from tests.test_massl_memory import tiny_vit

    torch.manual_seed(0)
    model = SOPStudentTeacher(tiny_vit, memory_size=64, tasks=2, anchors=8, sops=4, neighbours=3, hidden_dim=16, embed_dim=8,
                              drop_path=0.0, patch_memory_size=32, patch_anchors=8).train()
    patch_before = model.patch_memory.embeddings.clone()
    out = model(*crops())
    assert out.patch_student.shape == (2, 8, 16, 1, 8) and out.patch_votes.shape == (1, 8, 8) and out.mask.any()
    loss = SOPLoss()(out)
    cls_only = sop_loss(out.student, out.teacher, out.votes, student_temperature=0.1, teacher_temperature=0.04)
    assert loss.item() > cls_only.item()  # L_CLS + L_MIM
    loss.backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert int(model.patch_memory.pointer) == 8 and not torch.equal(model.patch_memory.embeddings[:8], patch_before[:8])
    assert torch.equal(model.patch_memory.embeddings[8:], patch_before[8:])
    assert not model.patch_memory.embeddings.requires_grad
    assert "mask_token" in model.state_dict() and not any("mask_token" in k for k in model.student.state_dict())
    resnet = tiny_model()
    assert not resnet.mim and SOPLoss()(resnet.train()(*crops())).isfinite()  # a ResNet: the [CLS] loss alone


def test_an_sop_vit_s_exports_to_timm_strictly_without_the_mask_token(tmp_path):
    import timm

    from carp_fast.export import export_backbone
    from carp_fast.sop import build_model

    model = build_model(SOPConfig(arch="vit_small", memory_size=256, block_size=16, sops=8, hidden_dim=16, embed_dim=8,
                                  patch_memory_size=64, patch_anchors=8))
    assert model.mim and "mask_token" in model.state_dict()
    export_backbone(model, tmp_path / "b.pth", arch="vit_small")
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    vit.load_state_dict(torch.load(tmp_path / "b.pth", weights_only=True))  # strict: no mask token, timm's keys
    # carp-fast eval's loader reads the teacher out of a checkpoint that holds the mask token and the memories
    from carp_fast.eval.checkpoints import load_backbone

    torch.save({"model": model.state_dict(), "settings": {"arch": "vit_small"}}, tmp_path / "checkpoint.pth")
    backbone = load_backbone(tmp_path / "checkpoint.pth")
    assert all(torch.equal(v, model.teacher.backbone.state_dict()[k]) for k, v in backbone.state_dict().items())


@pytest.mark.filterwarnings("ignore:SOP assignments are collapsing")  # 4 SOPs, 8 images: expected
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("vit", [False, True])
def test_sop_trains_through_fastai_in_fp16_and_bf16(tiny_dls, precision, vit):
    # fastai's MixedPrecision rebuilds the outputs with to_float: both output types must survive it.
    from carp_fast.sop import sop_learner
    from tests.test_massl_memory import tiny_vit

    config = SOPConfig(arch="resnet10_tiny", memory_size=64, block_size=8, sops=4, neighbours=3, tasks=2, hidden_dim=16,
                       embed_dim=8, batch_size=8, global_batch=8, warmup_epochs=0, log_every=1, precision=precision,
                       patch_memory_size=32, patch_anchors=8)
    torch.manual_seed(0)
    model = SOPStudentTeacher(tiny_vit if vit else "resnet10_tiny", memory_size=64, tasks=2, anchors=8, sops=4, neighbours=3,
                              hidden_dim=16, embed_dim=8, drop_path=0.0, patch_memory_size=32, patch_anchors=8)
    learn = sop_learner(tiny_dls, config, progress=False, model=model)
    learn.fit(1)
    history = learn.sop_stats.history
    assert len(history) == 4 and all(math.isfinite(r["loss"]) for r in history)
    assert (history[-1]["mim_loss"] > 0) == vit


def test_the_spread_selection_trains_through_the_model():
    model = tiny_model(selection="spread").train()
    out = model(*crops())
    SOPLoss()(out).backward()
    assert out.votes.shape == (2, 12, 4) and torch.isfinite(out.student).all()


def test_a_patch_memory_that_the_batch_does_not_divide_is_a_clear_error_before_the_first_step(tiny_dls):
    from carp_fast.sop import sop_learner
    from tests.test_massl_memory import tiny_vit

    config = SOPConfig(memory_size=64, block_size=8, sops=4, neighbours=3, hidden_dim=16, embed_dim=8, batch_size=8,
                       global_batch=8, precision="fp32", patch_memory_size=36, patch_anchors=8)
    model = SOPStudentTeacher(tiny_vit, memory_size=64, anchors=8, sops=4, neighbours=3, hidden_dim=16, embed_dim=8,
                              patch_memory_size=36, patch_anchors=8)
    with pytest.raises(ValueError, match="K=36 must be a multiple of the images written per step"):
        sop_learner(tiny_dls, config, progress=False, model=model)


def _koleo_by_hand(embeddings, eps=1e-8):
    """KoLeo from its definition, in float64 loops: per view, -mean_i log(min_{j != i} ||x_i - x_j|| + eps)."""
    views = []
    for view in embeddings.double().tolist():
        unit = [[c / math.sqrt(sum(v * v for v in x)) for c in x] for x in view]
        logs = []
        for i, x in enumerate(unit):
            nearest = min(math.sqrt(sum((a - b) ** 2 for a, b in zip(x, y))) for j, y in enumerate(unit) if j != i)
            logs.append(-math.log(nearest + eps))
        views.append(sum(logs) / len(logs))
    return sum(views) / len(views)


@pytest.mark.parametrize("views, n, d", [(1, 2, 3), (2, 5, 4), (2, 7, 16)])
def test_koleo_is_minus_the_mean_log_distance_to_the_nearest_other_embedding(views, n, d):
    from carp_fast.sop.loss import koleo_loss

    x = torch.randn(views, n, d, generator=torch.Generator().manual_seed(n))
    assert koleo_loss(x).item() == pytest.approx(_koleo_by_hand(x), rel=1e-5)
    assert koleo_loss(x.to(torch.bfloat16)).dtype == torch.float32


def test_koleo_falls_as_the_embeddings_spread_and_refuses_one_per_view():
    from carp_fast.sop.loss import koleo_loss

    spread = torch.eye(4)[None]  # 4 orthogonal unit vectors
    close = F.normalize(torch.ones(1, 4, 4) + 0.01 * torch.eye(4)[None], dim=-1)
    assert koleo_loss(spread) < koleo_loss(close)
    with pytest.raises(ValueError, match="N >= 2"):
        koleo_loss(torch.randn(2, 1, 4))


def test_the_koleo_weight_adds_its_term_to_the_loss_and_its_gradient_to_the_student():
    from carp_fast.sop.loss import koleo_loss

    model = tiny_model().train()
    out = model(*crops())
    assert out.embeddings.shape == (2, 8, out.embeddings.shape[-1]) and out.embeddings.requires_grad
    plain, weighted = SOPLoss(), SOPLoss(koleo_weight=0.5)
    expected = plain(out) + 0.5 * _koleo_by_hand(out.embeddings.detach())
    assert weighted(out).item() == pytest.approx(expected.item(), rel=1e-5)
    assert weighted.parts[3].item() == pytest.approx(_koleo_by_hand(out.embeddings.detach()), rel=1e-5)
    assert plain.parts[3].item() == 0.0  # weight 0: not computed, as the official default
    with pytest.raises(ValueError, match="koleo_weight"):
        SOPLoss(koleo_weight=-1.0)
