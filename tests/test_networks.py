"""Backbones, head, prototypes and the student/teacher module."""

import pytest
import torch
import torchvision

from carp_fast.backbones import build_backbone
from carp_fast.carp import CARPStudentTeacher
from carp_fast.networks import Prototypes, ProjectionHead, batches_by_resolution
from carp_fast.partition import PartitionSampler


def small_model(**kw):
    args = dict(arch="resnet18_small", n_prototypes=64, block_size=16, hidden_dim=32, embed_dim=8)
    args.update(kw)
    return CARPStudentTeacher(**args)


def crops(n=2, n_global=2, n_local=3, g=16, l=8):
    return [torch.randn(n, 3, g, g) for _ in range(n_global)] + [torch.randn(n, 3, l, l) for _ in range(n_local)]


def test_resnet50_backbone_is_torchvisions_without_fc():
    net = build_backbone("resnet50")
    assert net.feature_dim == 2048 and isinstance(net.fc, torch.nn.Identity)
    reference = torchvision.models.resnet50()
    missing, unexpected = reference.load_state_dict(net.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    # zero_init_residual: the last BN of every bottleneck starts at zero.
    assert torch.all(net.layer1[0].bn3.weight == 0)


def test_small_backbone_keeps_resolution_for_28px():
    net = build_backbone("resnet18_small").eval()
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net(torch.randn(2, 3, 28, 28)).shape == (2, 512)


def test_unknown_arch_is_an_error():
    with pytest.raises(ValueError, match="arch must be one of"):
        build_backbone("vit_b")


def test_projection_head_layers():
    head = ProjectionHead(2048)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    assert head.mlp[0].in_features == 2048 and head.mlp[0].out_features == 2048 and head.mlp[-1].out_features == 256


def test_prototypes_are_unit_vectors_and_block_logits_gather():
    protos = Prototypes(dim=5, n_prototypes=12)
    with torch.no_grad():
        protos.weight.mul_(torch.rand(12, 1) * 10)  # norms far from 1
    z = torch.randn(3, 5)
    expected = torch.stack([torch.stack([torch.dot(zi, c / c.norm()) for c in protos.weight]) for zi in z]).detach()
    torch.testing.assert_close(protos(z), expected, rtol=1e-5, atol=1e-5)
    partition = torch.randperm(12)[:8].view(2, 4)
    torch.testing.assert_close(protos.block_logits(z, partition), protos(z)[:, partition])


def test_embed_runs_one_backbone_pass_per_resolution():
    model = small_model()
    calls = []
    model.student.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    z = model.student.embed(crops(n=2, n_global=2, n_local=3))
    assert z.shape == (10, 8)
    assert calls == [torch.Size([4, 3, 16, 16]), torch.Size([6, 3, 8, 8])]


def test_batches_by_resolution_keeps_order_and_groups_only_neighbours():
    xs = [torch.full((2, 3, s, s), float(i)) for i, s in enumerate([16, 16, 8, 16])]
    batches = batches_by_resolution(xs)
    assert [tuple(b.shape) for b in batches] == [(4, 3, 16, 16), (2, 3, 8, 8), (2, 3, 16, 16)]
    assert [b[:, 0, 0, 0].tolist() for b in batches] == [[0, 0, 1, 1], [2, 2], [3, 3]]


def test_forward_shapes_and_teacher_gets_no_gradient():
    model = small_model()
    out = model(*crops(n=2))
    assert out.student.shape == (5, 2, 4, 16) and out.teacher.shape == (2, 2, 4, 16)
    assert out.partition.shape == (4, 16)
    out.student.sum().backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not out.teacher.requires_grad
    assert all(not p.requires_grad for p in model.teacher.parameters())


def test_teacher_starts_as_copy_of_student():
    model = small_model()
    for (name, s), t in zip(model.student.state_dict().items(), model.teacher.state_dict().values()):
        assert torch.equal(s, t), name


def test_teacher_mode_is_decided_by_the_module():
    model = small_model(teacher_batch_stats=False)
    model.train()
    assert model.student.training and not model.teacher.training
    model = small_model(teacher_batch_stats=True).train()
    assert model.teacher.training
    model.eval()
    assert not model.teacher.training and not model.student.training


def test_partition_sampler_modes_and_resume():
    fixed = PartitionSampler(12, 4, mode="fixed")
    assert torch.equal(fixed(), torch.arange(12).view(3, 4)) and torch.equal(fixed(), fixed())
    sampler = PartitionSampler(12, 4, mode="random", seed=3)
    first = sampler()
    state = sampler.state_dict()
    expected = [sampler() for _ in range(3)]
    resumed = PartitionSampler(12, 4, mode="random", seed=3)
    resumed.load_state_dict(state)
    assert [torch.equal(a, resumed()) for a in expected] == [True] * 3
    assert not torch.equal(first, expected[0])
    with pytest.raises(ValueError, match="partition mode"):
        PartitionSampler(12, 4, mode="sequential")


def test_one_block_is_carl():
    model = small_model(block_size=64)
    out = model(*crops(n=2))
    assert out.partition.shape == (1, 64)


def test_state_dict_holds_both_networks_and_partition_state():
    keys = small_model().state_dict().keys()
    assert any(k.startswith("student.backbone.") for k in keys)
    assert any(k.startswith("teacher.prototypes.") for k in keys)
    assert "partitioner._extra_state" in keys


def test_too_few_crops_is_an_error():
    with pytest.raises(ValueError, match="at least 2 crops"):
        small_model()(torch.randn(2, 3, 16, 16))


@pytest.mark.slow
def test_paper_configuration_runs_forward_and_backward_on_cpu():
    """ResNet-50, K = 65,536, B = 512, 2x224 + 6x96, batch 2."""
    from carp_fast.loss import carp_block_loss

    torch.manual_seed(0)
    model = CARPStudentTeacher("resnet50", n_prototypes=65536, block_size=512).train()
    views = [torch.randn(2, 3, 224, 224) for _ in range(2)] + [torch.randn(2, 3, 96, 96) for _ in range(6)]
    out = model(*views)
    assert out.student.shape == (8, 2, 128, 512) and out.teacher.shape == (2, 2, 128, 512)
    loss = carp_block_loss(out.student, out.teacher).total
    assert torch.isfinite(loss)
    loss.backward()
    grad = model.student.prototypes.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.student.backbone.conv1.weight.grad.abs().sum() > 0
