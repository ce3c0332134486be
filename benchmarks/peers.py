"""CARP beside two peers on the same work: lightly's SwAV and DINO losses, same everything else.

    python benchmarks/peers.py --methods carp,swav,dino               # the recipe's minutes of training each, one after another
    python benchmarks/peers.py --methods carp,swav,dino --minutes 4   # 4 minutes each
    python benchmarks/peers.py --methods carp,swav,dino --steps 256   # 256 optimizer steps each
    python benchmarks/peers.py --methods swav --steps 128 --base-lr 3e-3
    python benchmarks/peers.py --methods carp --baselines        # adds raw pixels and random init rows

Every method trains on Fashion-MNIST with the embedded recipe's (``recipes/fashion_mnist.py``)
backbone, multi-crop views, AdamW, learning-rate and weight-decay cosines, batch and data
subset, for the same minutes of training (each method's schedules planned to them by
carp_fast's TimeBudget, so a faster step gets more steps) or the same ``--steps``, and is then scored by the recipe's k-NN (k = 20,
T = 0.07) and a linear probe (``carp_fast.eval.linear.bank_probe``, on the same cached
features) on the recipe's bank (a fixed random 20,000 training images drawn with seed + 1,
``carp_fast.run.open_sources``) and all 10k test images; ``--eval-on validation`` scores on the
10k held-out training images instead (the bank and pretraining then draw from the other 50k):
tune there, measure the test once. Scored is the teacher's backbone where there is one (CARP,
DINO), else the network's own (SwAV).

- ``carp``: carp_fast's own learner (:func:`carp_fast.carp.carp_learner`), the same-script reference.
- ``swav``: lightly's ``SwaVProjectionHead`` (backbone -> hidden_dim -> embed_dim), L2
  normalisation, ``SwaVPrototypes`` (n_prototypes, re-normalised before every step, frozen for
  ``--swav-freeze-steps``) and ``SwaVLoss`` (temperature 0.1, 3 Sinkhorn iterations, epsilon
  0.05, no queue), as lightly's examples and ImageNet benchmark.
- ``dino``: lightly's ``DINOProjectionHead`` (hidden_dim, bottleneck embed_dim, output
  n_prototypes, weight-normalised last layer whose gradients are dropped for
  ``--dino-freeze-steps``) and ``DINOLoss`` (student T 0.1, teacher T 0.04, centre momentum
  0.9), with an EMA teacher at the recipe's momentum, cosine to 1 (carp_fast's TeacherEMA).

Tuned on the validation split with 4 runs each (BENCHMARKS.md, "Issue 24: lightly's SwAV and
DINO"): SwAV is best at these defaults, DINO with ``--dino-freeze-steps 0`` (it still collapses
to a uniform output at this scale).

Training runs in fastai's Learner built by :func:`carp_fast.learner.method_learner`, the
function CARP's and MaSSL's learners are built with (precision, gradient accumulation,
progress), with carp_fast's OptimizerStepScheduler and TeacherEMA callbacks; only the model,
the loss and one small callback (step counter and freezes) are the peers' own. The lightly
losses run in float32 (their inputs cast up, autocast off): Sinkhorn's ``exp(x / 0.05)`` and
DINO's teacher softmax at T 0.04 are not bf16-safe; the networks run under the recipe's
precision (bf16 autocast on CPUs with bf16 units).

Every setting of the recipe is an option with the recipe's current value as its default (read
from ``carp_fast.recipes.fashion_mnist.DEFAULTS`` at start-up), plus the options below. One
Markdown table row per method is printed and one JSON line appended to
``runs/peers/results.jsonl``. ``lightly`` is needed for swav and dino only: ``pip install -e
'.[peers]'`` (see pyproject.toml for why it is installed without its dependencies).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn
from fastai.callback.core import Callback, CancelFitException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's benchmarks/
from benchmarks.tune_embedded import cpu_name  # noqa: E402
from carp_fast.carp import CARPConfig
from carp_fast.options import setting  # noqa: E402
from carp_fast.run import TrainSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "runs" / "peers" / "results.jsonl"
METHODS = ("carp", "swav", "dino")
# Options of carp_fast's run that a fixed-step, non-resumable, self-scored benchmark has no use for.
UNUSED = dict(resume=False, knn_every=0, knn_random_init=False, checkpoint_every=1)


@dataclass
class PeerSettings:
    """What peers.py adds to the recipe's settings."""

    methods: str = setting("carp,swav,dino", f"comma-separated methods to train one after another: {', '.join(METHODS)}")
    steps: int = setting(0, "optimizer steps per method (0: as many as fit in --minutes of training, the recipe's "
                            "budget, as TimeBudget plans them; with --minutes none, --epochs x --train-images / --global-batch)")
    baselines: bool = setting(False, "also score raw pixels and the backbone at random initialisation")
    results: str = setting(str(RESULTS), "JSON lines file the results are appended to")
    # SwAV (lightly's defaults and examples)
    swav_temperature: float = setting(0.1, "SwaVLoss temperature")
    swav_sinkhorn_iterations: int = setting(3, "SwaVLoss Sinkhorn iterations")
    swav_sinkhorn_epsilon: float = setting(0.05, "SwaVLoss Sinkhorn epsilon")
    swav_freeze_steps: int = setting(-1, "steps with frozen prototypes (-1: the first epoch, as lightly's benchmark and SwAV)")
    # DINO (lightly's defaults and examples)
    dino_student_temperature: float = setting(0.1, "DINOLoss student temperature")
    dino_teacher_temperature: float = setting(0.04, "DINOLoss teacher temperature (lightly's default, constant)")
    dino_center_momentum: float = setting(0.9, "DINOLoss centre momentum")
    dino_freeze_steps: int = setting(-1, "steps without last-layer gradients (-1: the first epoch, as lightly's benchmark and DINO)")
    dino_batch_norm: bool = setting(False, "BatchNorm in the DINO head's MLP (lightly: off, also for ResNets)")
    dino_norm_last_layer: bool = setting(True, "weight-normalised last layer with its norm fixed to 1 (lightly's default)")

    def __post_init__(self):
        unknown = set(self.method_list()) - set(METHODS)
        if unknown or not self.method_list():
            raise ValueError(f"--methods must be a comma-separated subset of {METHODS}, got {self.methods!r}")
        if self.steps < 0:
            raise ValueError(f"--steps must be >= 0, got {self.steps}")

    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


def recipe_defaults() -> dict:
    """The embedded recipe's current defaults, with the options a fixed-step run ignores unset."""
    from carp_fast.recipes.fashion_mnist import DEFAULTS

    return {**DEFAULTS, **UNUSED, "out": "runs/peers", "progress": False}


def parse(argv=None) -> tuple[TrainSettings, CARPConfig, PeerSettings]:
    """``(TrainSettings, CARPConfig, PeerSettings)`` from the command line over the recipe's defaults."""
    from carp_fast.options import parse_settings

    settings, config, peers = parse_settings((TrainSettings, CARPConfig, PeerSettings), recipe_defaults(), argv, __doc__)
    ignored = {name: getattr(settings, name) for name, value in UNUSED.items() if getattr(settings, name) != value}
    if ignored:
        raise SystemExit(f"peers.py: error: {sorted(ignored)} have no effect here (fixed --steps, scored once at the end)")
    return settings, config, peers


def steps_per_epoch(sources, config: CARPConfig) -> int:
    """Optimizer steps in one epoch of the pretraining subset (drop-last batches)."""
    return len(sources.train) // config.global_batch


# ---- the peers' networks -------------------------------------------------------------------


class SwAVNetwork(nn.Module):
    """backbone -> lightly's SwAV head -> L2 normalisation -> lightly's prototypes.

    ``forward(*crops)`` returns the prototype logits ``[V, N, K]`` of every crop (one backbone
    pass per resolution, as CARP's networks); ``self.step`` (set by :class:`PeerSteps`) is
    what ``SwaVPrototypes`` reads to keep the prototypes frozen for their first steps.
    """

    def __init__(self, config: CARPConfig, freeze_steps: int):
        super().__init__()
        from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes

        from carp_fast.backbones import build_backbone

        backbone = build_backbone(config.arch)
        self.student = nn.Module()  # the k-NN scores self.student.backbone
        self.student.backbone = backbone
        self.student.head = SwaVProjectionHead(backbone.feature_dim, config.hidden_dim, config.embed_dim)
        self.student.prototypes = SwaVPrototypes(config.embed_dim, config.n_prototypes, n_steps_frozen_prototypes=freeze_steps)
        self.step = 0

    def forward(self, *crops: torch.Tensor) -> torch.Tensor:
        from carp_fast.networks import batches_by_resolution

        with torch.no_grad():
            self.student.prototypes.normalize()  # on the unit sphere before every step (lightly, SwAV)
        features = torch.cat([self.student.backbone(x) for x in batches_by_resolution(crops)])
        z = nn.functional.normalize(self.student.head(features), dim=1)
        logits = self.student.prototypes(z, step=self.step)  # [V*N, K]
        return logits.view(len(crops), crops[0].shape[0], -1)


class DINONetwork(nn.Module):
    """Student (backbone -> lightly's DINO head) and its EMA teacher (a copy, no gradients).

    ``forward(*crops)`` returns ``(teacher [V_t, N, K], student [V, N, K])``: the teacher sees
    the ``global_crops`` leading crops. The teacher's BatchNorm runs on batch statistics in
    training, as in lightly's Lightning module (the whole module in train mode) and CARP.
    """

    def __init__(self, config: CARPConfig, settings: PeerSettings, freeze_steps: int):
        super().__init__()
        from lightly.models.modules import DINOProjectionHead

        from carp_fast.backbones import build_backbone

        def branch() -> nn.Module:
            net = nn.Module()
            net.backbone = build_backbone(config.arch)
            net.head = DINOProjectionHead(
                net.backbone.feature_dim, config.hidden_dim, config.embed_dim, config.n_prototypes,
                batch_norm=settings.dino_batch_norm, freeze_last_layer=freeze_steps, norm_last_layer=settings.dino_norm_last_layer,
            )
            return net

        self.global_crops = config.global_crops
        self.student = branch()
        # Not copy.deepcopy: torch refuses to deep-copy the head's weight_norm layer (its
        # computed weight is not a leaf); a second branch takes the student's values instead.
        self.teacher = branch()
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

    def embed(self, branch: nn.Module, crops) -> torch.Tensor:
        from carp_fast.networks import batches_by_resolution

        features = torch.cat([branch.backbone(x) for x in batches_by_resolution(crops)])
        return branch.head(features).view(len(crops), crops[0].shape[0], -1)

    def forward(self, *crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            teacher = self.embed(self.teacher, crops[: self.global_crops])
        return teacher, self.embed(self.student, crops)


class Float32Loss(nn.Module):
    """A lightly loss called on float32 inputs with autocast off; ``(pred, labels) -> loss``."""

    def __init__(self, loss: nn.Module, method: str):
        super().__init__()
        self.loss, self.method = loss, method

    def forward(self, pred, *labels) -> torch.Tensor:
        with torch.autocast(pred[0].device.type, enabled=False):
            if self.method == "swav":  # logits [V, N, K]: global crops first
                views = list(pred.float().unbind(0))
                return self.loss(views[:2], views[2:]).squeeze()
            teacher, student = pred
            return self.loss(list(teacher.float().unbind(0)), list(student.float().unbind(0)))


class PeerSteps(Callback):
    """The optimizer step for the peers' freezes: SwAV's prototypes read ``model.step`` in
    their forward; DINO's last-layer gradients are dropped after the backward pass while the
    step is below the head's ``freeze_last_layer`` (lightly's ``cancel_last_layer_gradients``)."""

    run_valid = False

    def before_batch(self):
        from carp_fast.callbacks.accumulation import optimizer_steps

        self.current_step = optimizer_steps(self.learn)
        getattr(self.learn.model, "module", self.learn.model).step = self.current_step

    def after_backward(self):
        head = getattr(getattr(self.learn.model, "student", None), "head", None)
        if hasattr(head, "cancel_last_layer_gradients"):
            head.cancel_last_layer_gradients(self.current_step)


class StopAfter(Callback):
    """Ends the fit after ``steps`` optimizer steps and sizes the schedules to them
    (``learn.planned_steps``, which carp_fast's step schedules read)."""

    order, run_valid = 100, False  # after_batch: after fastai's TrainEvalCallback has counted the batch

    def __init__(self, steps: int):
        self.steps = steps

    def before_fit(self):
        self.learn.planned_steps = self.steps

    def after_batch(self):
        from carp_fast.callbacks.accumulation import optimizer_steps

        if optimizer_steps(self.learn) >= self.steps:  # every micro-batch of the last step is done
            raise CancelFitException()

    def after_fit(self):
        "A later fit without this callback uses its own length (as TimeBudget leaves it)."
        self.learn.planned_steps = None


def peer_learner(method: str, dls, config: CARPConfig, peers: PeerSettings, accelerator, out: str, freeze_default: int, progress: bool):
    """A fastai Learner training ``method`` ('swav' or 'dino') with the recipe's optimizer and schedules."""
    from carp_fast.callbacks.teacher_ema import TeacherEMA
    from carp_fast.carp import lr_wd_schedules, opt_func
    from carp_fast.learner import method_learner
    from carp_fast.method import Method

    callbacks = [lr_wd_schedules(config), PeerSteps()]
    if method == "swav":
        from lightly.loss import SwaVLoss

        freeze = freeze_default if peers.swav_freeze_steps < 0 else peers.swav_freeze_steps
        model = SwAVNetwork(config, freeze)
        loss = SwaVLoss(temperature=peers.swav_temperature, sinkhorn_iterations=peers.swav_sinkhorn_iterations,
                        sinkhorn_epsilon=peers.swav_sinkhorn_epsilon)
    else:
        from lightly.loss import DINOLoss

        freeze = freeze_default if peers.dino_freeze_steps < 0 else peers.dino_freeze_steps
        model = DINONetwork(config, peers, freeze)
        loss = DINOLoss(output_dim=config.n_prototypes, warmup_teacher_temp=peers.dino_teacher_temperature,
                        teacher_temp=peers.dino_teacher_temperature, student_temp=peers.dino_student_temperature,
                        center_momentum=peers.dino_center_momentum)
        callbacks.append(TeacherEMA(config.teacher_momentum))
    loss_func = Float32Loss(loss, method).to(accelerator.device)
    # The peer as a method on the seam: its network and loss, CARP's optimizer and schedules.
    peer = Method(name=method, config=CARPConfig, build_model=lambda config: model, loss=lambda config: loss_func,
                  optimizer=opt_func, callbacks=lambda config: callbacks)
    return method_learner(peer, dls, config, accelerator=accelerator, path=out, progress=progress), freeze


# ---- one method, end to end ----------------------------------------------------------------


def knn_loaders(sources, settings: TrainSettings, accelerator):
    """The recipe's k-NN bank and queries as evaluation loaders (as ``carp_fast.run.run_callbacks``)."""
    from carp_fast.pipelines import eval_loader

    kw = dict(size=settings.eval_size, resize=settings.eval_resize, batch_size=256, backend=settings.backend,
              device=accelerator.device, workers=settings.workers)
    return eval_loader(sources.bank, **kw), eval_loader(sources.queries, **kw)


def scores(bank, queries) -> tuple[float, float]:
    """k-NN top-1 (percent, k = 20, T = 0.07) and the linear probe's top-1 on cached features, as the recipe scores."""
    from carp_fast.eval import bank_probe, knn_accuracy

    knn = knn_accuracy(bank.features, bank.labels, queries.features, queries.labels, k=20, temperature=0.07).top1
    return knn, bank_probe(bank, queries).top1


def knn_top1(backbone: nn.Module, bank_dl, query_dl, device) -> tuple[float, float]:
    """:func:`scores` of ``backbone``'s features, extracted once for both protocols."""
    from carp_fast.eval import extract_features

    bank = extract_features(backbone, bank_dl, device=device, progress=False)
    queries = extract_features(backbone, query_dl, device=device, progress=False)
    return scores(bank, queries)


def run_method(method: str, settings: TrainSettings, config: CARPConfig, peers: PeerSettings) -> dict:
    """Train ``method`` for the run's steps and score it; returns its result line."""
    from carp_fast.carp import carp_learner
    from carp_fast.run import open_sources, pretraining_dataloaders, start

    settings, config = copy.deepcopy(settings), copy.deepcopy(config)
    settings.out = str(Path(settings.out) / method)
    accelerator = start(settings, config)  # devices, precision, seed (the same for every method)
    sources = open_sources(settings, config)  # the recipe's pretraining subset, k-NN bank and queries
    per_epoch = steps_per_epoch(sources, config)
    steps = peers.steps or settings.epochs * per_epoch
    dls = pretraining_dataloaders(sources, settings, config, accelerator)
    freeze = None
    if method == "carp":
        learn = carp_learner(dls, config, accelerator=accelerator, path=settings.out, progress=settings.progress)
    else:
        learn, freeze = peer_learner(method, dls, config, peers, accelerator, settings.out, per_epoch, settings.progress)
    if settings.minutes and not peers.steps:  # the same training time for every method, each schedule complete
        from carp_fast.callbacks import TimeBudget

        learn.add_cb(TimeBudget(settings.minutes))
    else:
        learn.add_cb(StopAfter(steps))
    bank_dl, query_dl = knn_loaders(sources, settings, accelerator)
    scored = "teacher" if hasattr(learn.model, "teacher") else "student"
    result = {}
    if peers.baselines:
        from carp_fast.eval.pixels import raw_pixel_features

        pixels = scores(raw_pixel_features(bank_dl), raw_pixel_features(query_dl))
        init = knn_top1(getattr(learn.model, scored).backbone, bank_dl, query_dl, accelerator.device)
        result.update(knn_top1_raw_pixels=pixels[0], linear_top1_raw_pixels=pixels[1],
                      knn_top1_random_init=init[0], linear_top1_random_init=init[1])
    start_time = time.perf_counter()
    learn.fit(settings.epochs if settings.minutes and not peers.steps else math.ceil(steps / per_epoch))
    train_s = time.perf_counter() - start_time
    from carp_fast.callbacks.accumulation import optimizer_steps

    done = optimizer_steps(learn)
    start_time = time.perf_counter()
    top1, linear = knn_top1(getattr(learn.model, scored).backbone, bank_dl, query_dl, accelerator.device)
    return {
        "method": method, "knn_top1": top1, "linear_top1": linear, "eval_on": sources.eval_on, **result, "steps": done, "images": done * config.global_batch,
        "train_s": train_s, "images_per_s": done * config.global_batch / train_s, "knn_s": time.perf_counter() - start_time,
        "scored": f"{scored} backbone", "freeze_steps": freeze, "precision": config.resolved_precision(accelerator.device),
        "final_loss": float(learn.recorder.losses[-1]) if getattr(learn, "recorder", None) is not None and learn.recorder.losses else None,
        "lightly": _lightly_version() if method != "carp" else None, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": cpu_name(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {**dataclasses.asdict(settings), **config.to_dict(), **dataclasses.asdict(peers)},
    }


def _lightly_version() -> str:
    import lightly

    return lightly.__version__


HEADER = ("| method | queries | k-NN top-1 % | linear probe top-1 % | steps | train s | images/s | scored |\n"
          "|---|---|---:|---:|---:|---:|---:|---|")


def table_row(result: dict) -> str:
    return (f"| {result['method']} | {result['eval_on']} | {result['knn_top1']:.2f} | {result['linear_top1']:.2f} "
            f"| {result['steps']} | {result['train_s']:.0f} | {result['images_per_s']:.0f} | {result['scored']} |")


def main(argv=None) -> list[dict]:
    settings, config, peers = parse(argv)
    results = []
    for method in peers.method_list():
        result = run_method(method, settings, config, peers)
        results.append(result)
        path = Path(peers.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        if "knn_top1_raw_pixels" in result:
            print(f"k-NN / linear probe: raw pixels {result['knn_top1_raw_pixels']:.2f} / {result['linear_top1_raw_pixels']:.2f} %, "
                  f"{method} at random initialisation {result['knn_top1_random_init']:.2f} / {result['linear_top1_random_init']:.2f} %")
    print(HEADER)
    for result in results:
        print(table_row(result))
    return results


if __name__ == "__main__":
    main()
