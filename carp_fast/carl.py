"""CARL on the method seam: CARP with no teacher, one block of all K prototypes, and lambda_e.

Silva & Ramirez Rivera, "Representation Learning via Consistent Assignments of Views to
Clusters", SAC 2022 (arXiv 2112.15421; its code could not be read). As CARP's paper describes
it (section 3.1, appendix B.2-B.3): the loss is CARP's eq. 3 over one block of all K
prototypes, the consistency of the views' assignments plus lambda_e times the entropy term (the
KL of the batch-mean assignment to uniform), and there is **no teacher stream**: the target of
a view is the student's own assignment of the other view under stop-gradient (table B.2's
"w/o mom. enc." row, eta = 0 in the EMA update, whose last cell "is equivalent to CARL"). So
no teacher network is built or saved, no EMA runs and there is no teacher forward pass: the
student's block logits of the global crops, detached, are the targets
(:class:`~carp_fast.networks.StudentTeacher` with ``ema_teacher=False``). With one block,
everything hangs on lambda_e (too small: every view goes to one prototype; too large: uniform
assignments); CARL decays it during training, here by a cosine from ``entropy_weight`` to
``final_entropy_weight`` (:func:`carp_fast.callbacks.entropy_weight`).

CARL is :data:`carp_fast.carp.CARP` with ``teacher=False``, ``block_size = K`` and lambda_e:
the network, loss, optimiser and schedules are CARP's; only the defaults differ. Its K,
lambda_e schedule and temperature are not known from its paper's code; the lambda_e cosine
below was chosen on the validation split against a constant 1 (FIDELITY.md, "CARL").
"""

from __future__ import annotations

from dataclasses import dataclass

from .carp import CARPConfig, build_model, callbacks, loss, opt_func
from .learner import method_learner
from .method import Method
from .options import setting


@dataclass
class CARLConfig(CARPConfig):
    """Settings of a CARL run: :class:`~carp_fast.carp.CARPConfig` with no teacher, one block and
    a decaying lambda_e. Model and optimisation defaults are CARP's ImageNet ones."""

    block_size: int | None = setting(None, "B; None: K, one block of all prototypes (CARL); smaller is teacher-off CARP")
    teacher: bool = setting(False, "CARL has no teacher (one block with an EMA teacher is CARP with --block-size K)")
    entropy_weight: float = setting(2.0, "lambda_e at the start of its cosine (chosen on the validation split against a constant 1)")
    final_entropy_weight: float | None = setting(1.0, "lambda_e at the end of its cosine; None: constant --entropy-weight")

    def __post_init__(self):
        if self.block_size is None:
            self.block_size = self.n_prototypes  # one block
        super().__post_init__()

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (not self.teacher, "CARL has no teacher: for one block with an EMA teacher run CARP with --block-size equal to "
                               "--n-prototypes"),
        ]


CARL = Method(name="carl", config=CARLConfig, build_model=build_model, loss=loss, optimizer=opt_func, callbacks=callbacks)


def carl_learner(dls, config: CARLConfig, **kwargs):
    """:func:`carp_fast.learner.method_learner` for CARL: a Learner that trains CARL on ``dls``.

    Besides the shared callbacks: the lr and weight-decay schedules, the lambda_e schedule
    (:class:`~carp_fast.callbacks.EntropyWeightSchedule`) and CARPStats; no TeacherEMA.
    """
    return method_learner(CARL, dls, config, **kwargs)
