"""benchmarks/sop_cost.py times SOP's own forward with the networks replaced by stored embeddings."""

import pytest
import torch

from carp_fast.sop.loss import SOPLoss
from carp_fast.sop.method import SOPStudentTeacher


def test_the_stand_in_networks_leave_sops_own_work_whole():
    from benchmarks import sop_cost

    model = SOPStudentTeacher(sop_cost.stand_in_backbone, memory_size=64, tasks=2, anchors=8, sops=4, neighbours=3,
                              hidden_dim=8, embed_dim=16, mim=False).train()
    z = sop_cost.without_networks(model, n_images=8, n_student=3, n_teacher=2, dim=16)
    before = model.memory.embeddings.clone()
    seconds = sop_cost.sop_work(model, SOPLoss(), [torch.zeros(8, 1, 1, 1)] * 3, lambda: torch.autocast("cpu", enabled=False))
    assert seconds > 0
    assert z.grad is not None and z.grad.abs().sum() > 0  # the backward reached the embeddings
    assert int(model.memory.pointer) == 8 and not torch.equal(before[:8], model.memory.embeddings[:8])  # written


@pytest.mark.slow
def test_the_benchmark_reports_a_share_of_the_step():
    from benchmarks import sop_cost

    result = sop_cost.embedded(steps=1, warmup=1, rounds=1, batch_size=8, log=lambda _: None)
    assert result["batch"] == 8 and result["step_ms"] > 0 and 0 < result["sop_share"]
