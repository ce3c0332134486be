"""fp16 mixed precision on the CPU through the Learner; the loss in fp32 under autocast (issue 12)."""

import math

import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.torch_core import to_float

from carp_fast.loss import carp_block_loss
from carp_fast.loss import BlockLogits


def test_carp_output_survives_fastai_apply():
    # fastai's MixedPrecision.after_pred calls to_float(pred), which rebuilds tuples as type(x)([...]).
    out = BlockLogits(torch.ones(2, 3, 1, 4, dtype=torch.float16), torch.ones(1, 3, 1, 4, dtype=torch.float16), torch.arange(4).view(1, 4))
    converted = to_float(out)
    assert isinstance(converted, BlockLogits)
    assert converted.student.dtype == converted.teacher.dtype == torch.float32
    assert converted.partition.dtype == torch.int64
    assert converted._replace(partition=None).partition is None


def _fp16(tiny_config):
    tiny_config.arch, tiny_config.precision, tiny_config.log_every = "resnet10_tiny", "fp16", 1  # fp16 conv backward is slow on CPUs
    return tiny_config


class _ScaleSpy(Callback):
    "Records the loss scale each batch starts with and the head's output dtype."

    order = 20

    def __init__(self, batches=None):
        self.scales, self.dtypes, self.batches = [], [], batches

    def before_fit(self):
        self.learn.model.student.head.register_forward_hook(lambda m, i, o: self.dtypes.append(o.dtype))

    def before_batch(self):
        self.scales.append(self.learn.scaler.get_scale())

    def after_batch(self):
        if self.batches is not None and len(self.scales) == self.batches:
            raise CancelFitException()


def test_fp16_trains_on_the_cpu_with_a_gradient_scaler(tiny_dls, tiny_config, tmp_path):
    from carp_fast.callbacks import Checkpointer
    from carp_fast.carp import carp_learner

    spy = _ScaleSpy()
    learn = carp_learner(tiny_dls, _fp16(tiny_config), cbs=[spy, Checkpointer(tmp_path, {})], progress=False)
    before = [p.detach().clone() for p in learn.model.student.parameters()]
    learn.fit(1)

    assert spy.dtypes and all(d == torch.float16 for d in spy.dtypes)  # autocast ran on the CPU
    assert all(math.isfinite(r["loss"]) for r in learn.carp_stats.history)
    changed = sum(not torch.equal(a, b.detach()) for a, b in zip(before, learn.model.student.parameters()))
    assert changed > 0.5 * len(before)
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=False)["scaler"]
    assert saved is not None and 0 < saved["scale"] <= spy.scales[0]  # the scaler's state is checkpointed


def test_fp16_resume_restores_the_loss_scale(tiny_dls, tiny_config, tmp_path):
    from carp_fast.callbacks import Checkpointer
    from carp_fast.carp import carp_learner

    learn = carp_learner(tiny_dls, _fp16(tiny_config), cbs=[Checkpointer(tmp_path, {})], progress=False)
    learn.fit(1)
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    state["scaler"]["scale"] = 512.0  # a scale no fresh scaler starts from (65536)
    torch.save(state, tmp_path / "checkpoint.pth")

    spy = _ScaleSpy(batches=1)
    resumed = carp_learner(tiny_dls, _fp16(tiny_config), cbs=[spy, Checkpointer(tmp_path, {}, resume=True)], progress=False)
    resumed.fit(2)  # resumes at epoch 1: the restore happens at the start of the fit, as a run does it
    assert spy.scales[0] == 512.0


# the loss under bf16 autocast -------------------------------------------------------------


def _reference_loss(s_logits, t_logits):
    """Paper eq. (4) with multi-crop, written out in float64: mean over pairs i != j, over N and P, of
    -log clamp(<s_i, t_j>, eps, 1 - eps) with float32's eps; plus mean_p KL(pbar_p || uniform)."""
    s, t = s_logits.double().softmax(-1), t_logits.double().softmax(-1)  # [V, N, P, B]
    eps = torch.finfo(torch.float32).eps
    terms = [-(s[i] * t[j]).sum(-1).clamp(eps, 1 - eps).log().mean() for i in range(len(s)) for j in range(len(t)) if i != j]
    consistency = torch.stack(terms).mean()
    pbar = torch.cat([s, t]).mean(dim=(0, 1))  # [P, B]
    entropy = (math.log(pbar.shape[-1]) + (pbar * pbar.log()).sum(-1)).mean()
    return consistency, entropy


@pytest.mark.parametrize("logit_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_images,n_blocks", [(1, 1), (4, 3)])
def test_loss_is_float32_under_bf16_autocast(logit_dtype, n_images, n_blocks):
    g = torch.Generator().manual_seed(0)
    # Confident teachers: agreements near 1, where bf16 rounds 1 - eps to 1.
    student = (4 * torch.randn(4, n_images, n_blocks, 8, generator=g)).to(logit_dtype)
    teacher = (8 * torch.randn(2, n_images, n_blocks, 8, generator=g)).to(logit_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = carp_block_loss(student, teacher)
    assert [p.dtype for p in parts] == [torch.float32] * 3
    consistency, entropy = _reference_loss(student.float(), teacher.float())
    torch.testing.assert_close(parts.consistency.double(), consistency, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.entropy.double(), entropy, rtol=1e-5, atol=1e-6)
