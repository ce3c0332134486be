"""The MaSSL memory: FIFO writes, what is written and when, state, and the networks around it."""

import pytest
import torch
import torch.nn.functional as F

from carp_fast.massl.memory import Memory
from carp_fast.backbones import build_backbone
from carp_fast.massl import MaSSLStudentTeacher


def tiny_vit(drop_path: float = 0.0):
    """A 2-block timm ViT for 16 px crops (8 px locals go through the same weights)."""
    from timm.models.vision_transformer import VisionTransformer

    net = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                            dynamic_img_size=True, drop_path_rate=drop_path)
    net.feature_dim = net.num_features
    return net


def tiny_model(**kwargs):
    torch.manual_seed(0)
    return MaSSLStudentTeacher(tiny_vit, **{"memory_size": 16, "block_size": 4, "hidden_dim": 24, "embed_dim": 8, "drop_path": 0.0, **kwargs})


def crops(n_images=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n_images, 3, 16, 16, generator=gen) for _ in range(2)] + [torch.randn(n_images, 3, 8, 8, generator=gen) for _ in range(3)]


def test_memory_starts_with_unit_vectors_in_buffers():
    memory = Memory(32, 6, seed=3)
    assert memory.embeddings.shape == (32, 6) and int(memory.pointer) == 0
    torch.testing.assert_close(memory.embeddings.norm(dim=1), torch.ones(32))
    assert set(memory.state_dict()) == {"embeddings", "pointer"}
    assert torch.equal(Memory(32, 6, seed=3).embeddings, memory.embeddings)  # same on every rank
    assert not torch.equal(Memory(32, 6, seed=4).embeddings, memory.embeddings)


def test_writes_are_first_in_first_out_and_wrap_around():
    memory = Memory(8, 2)
    initial = memory.embeddings.clone()
    batches = [torch.full((4, 2), float(k)) for k in (1, 2, 3)]
    memory.write(batches[0])
    assert int(memory.pointer) == 4
    assert torch.equal(memory.embeddings[:4], batches[0]) and torch.equal(memory.embeddings[4:], initial[4:])
    memory.write(batches[1])
    assert int(memory.pointer) == 0  # wrapped
    memory.write(batches[2])  # overwrites the oldest rows
    assert int(memory.pointer) == 4
    assert torch.equal(memory.embeddings[:4], batches[2]) and torch.equal(memory.embeddings[4:], batches[1])


@pytest.mark.parametrize("rows", [3, 5, 16])
def test_a_batch_that_does_not_divide_the_memory_is_refused(rows):
    memory = Memory(8, 2)
    with pytest.raises(ValueError, match=f"K=8 must be a multiple of the images written per step .* = {rows}"):
        memory.write(torch.zeros(rows, 2))
    assert int(memory.pointer) == 0


def test_block_logits_are_similarities_to_the_permuted_memory():
    memory = Memory(12, 4, seed=1)
    z = torch.randn(5, 4)
    partition = torch.randperm(12).view(3, 4)
    expected = torch.stack([torch.stack([z @ memory.embeddings[k] for k in block], -1) for block in partition.tolist()], 1)
    torch.testing.assert_close(memory.block_logits(z, partition), expected)  # [M, P, B]


def test_training_forward_computes_logits_first_then_writes_the_second_global_view():
    model = tiny_model().train()
    x = crops()
    before = model.memory.embeddings.clone()
    out = model(*x)
    n = x[0].shape[0]

    # Logits came from the memory as it was before the write.
    with torch.no_grad():
        z = model.student.embed(x)  # [V_s*N, D]
        w = model.teacher.embed(x[:2])  # [V_t*N, D]
    rows = before[out.partition.flatten()]  # [P*B, D]
    torch.testing.assert_close(out.teacher, (w @ rows.t()).view(2, n, *out.partition.shape))
    torch.testing.assert_close(out.student.detach(), (z @ rows.t()).view(5, n, *out.partition.shape), rtol=1e-4, atol=1e-5)

    # Then the teacher's second global view was written at slots 0..N-1, and only it.
    torch.testing.assert_close(model.memory.embeddings[:n], w[n : 2 * n])
    assert not torch.allclose(model.memory.embeddings[:n], w[:n])
    assert torch.equal(model.memory.embeddings[n:], before[n:])
    assert int(model.memory.pointer) == n
    torch.testing.assert_close(model.memory.embeddings[:n].norm(dim=1), torch.ones(n))
    assert out.student.shape == (5, n, 4, 4) and out.teacher.shape == (2, n, 4, 4)


def test_evaluation_forward_leaves_the_memory_alone():
    model = tiny_model().eval()
    before = model.memory.state_dict()
    model(*crops())
    assert all(torch.equal(v, model.memory.state_dict()[k]) for k, v in before.items())


def test_memory_and_pointer_travel_in_the_state_dict():
    model = tiny_model().train()
    model(*crops())
    state = model.state_dict()
    assert {"memory.embeddings", "memory.pointer"} <= set(state)
    fresh = tiny_model()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.memory.embeddings, model.memory.embeddings) and int(fresh.memory.pointer) == 4


def test_student_and_teacher_start_equal_and_only_the_student_learns():
    model = tiny_model(drop_path=0.1)
    assert all(torch.equal(s, t) for s, t in zip(model.student.state_dict().values(), model.teacher.state_dict().values()))
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert model.student.backbone.blocks[1].drop_path1.drop_prob > 0
    assert isinstance(model.teacher.backbone.blocks[1].drop_path1, torch.nn.Identity)


def test_one_global_crop_is_refused():
    with pytest.raises(ValueError, match="global_crops must be >= 2"):
        tiny_model(global_crops=1)


def test_head_output_is_unit_length():
    model = tiny_model()
    z = model.student.embed(crops())
    torch.testing.assert_close(z.norm(dim=1), torch.ones(z.shape[0]))


@pytest.mark.parametrize("arch,width", [("vit_small", 384), ("vit_mini_p2", 128), ("resnet10_tiny", 256)])
def test_backbones_take_global_and_local_crops_through_the_same_weights(arch, width):
    net = build_backbone(arch).eval()
    sizes = {"vit_small": (224, 96), "vit_mini_p2": (16, 10, 18, 28)}.get(arch, (28, 14))
    with torch.no_grad():
        for size in sizes:
            assert net(torch.randn(1, 3, size, size)).shape == (1, width)
    assert net.feature_dim == width


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="arch must be one of"):
        build_backbone("vit_huge")


def test_vit_backbone_keys_are_the_official_vits():
    """timm's ViT-S/16 keys are those of MaSSL's (DINO's) vision_transformer.py, so exports load both ways."""
    keys = set(build_backbone("vit_small").state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"} <= keys
    block = {k.removeprefix("blocks.0.") for k in keys if k.startswith("blocks.0.")}
    assert block == {f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")}
    assert len(keys) == 4 + 12 * 12 + 2
    assert build_backbone("vit_small").pos_embed.shape == (1, 197, 384)


def test_the_small_image_vit_is_timms_vit_with_2_px_patches_width_128_and_6_blocks():
    net = build_backbone("vit_mini_p2")
    assert net.patch_embed.proj.kernel_size == (2, 2) and net.patch_embed.proj.stride == (2, 2)
    assert net.pos_embed.shape == (1, 1 + 8 * 8, 128) and len(net.blocks) == 6 and net.blocks[0].attn.num_heads == 4
    assert build_backbone("vit_mini_p2", drop_path=0.1).blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_a_plain_fastai_learner_trains_a_toy_model_with_the_memory_and_the_loss():
    """Reuse: no carp_fast Learner, model or callback besides the temperature schedule."""
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from torch.utils.data import DataLoader, TensorDataset

    from carp_fast.loss import BlockLogits
    from carp_fast.massl import MaSSLLoss, TeacherTemperatureWarmup

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.student, self.teacher = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
            self.teacher.requires_grad_(False)
            self.memory = Memory(16, 4)

        def forward(self, a, b):
            z = F.normalize(self.student(torch.cat([a, b])), dim=1)  # [2N, D]
            w = F.normalize(self.teacher(torch.cat([a, b])), dim=1).detach()
            partition = torch.randperm(16).view(4, 4)
            s, t = self.memory.block_logits(z, partition), self.memory.block_logits(w, partition)
            if self.training:
                self.memory.write(w[a.shape[0]:])
            return BlockLogits(s.view(2, a.shape[0], 4, 4), t.view(2, a.shape[0], 4, 4), partition)

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 6), torch.randn(32, 6), torch.zeros(32))
    dls = DataLoaders(DataLoader(data, batch_size=8, drop_last=True), DataLoader(data, batch_size=8))
    model = Toy()
    start = model.student.weight.detach().clone()
    learn = Learner(dls, model, loss_func=MaSSLLoss(), cbs=[TeacherTemperatureWarmup(0.04, 0.07, warmup_epochs=2)])
    with learn.no_logging():
        learn.fit(2, lr=1e-2)
    assert not torch.equal(model.student.weight, start)
    assert int(model.memory.pointer) == 0  # 8 training batches of 8 rows wrote 64 = 4 x K rows
    assert learn.teacher_temperature == pytest.approx(0.04 + 0.03 * (1 + 3 / 4) / 2)
    assert torch.isfinite(torch.tensor(learn.recorder.losses)).all()
