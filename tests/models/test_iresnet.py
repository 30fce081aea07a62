"""iResNet: insightface-compatible parameter layout, depths, input sizes, checkpointing, AMP."""
from __future__ import annotations

import copy

import pytest
import torch

from broadface.models import build_model, recalibrate_batchnorm
from broadface.models.iresnet import IBasicBlock, expand_layers

INSIGHTFACE_DEPTHS = {"iresnet18": [2, 2, 2, 2], "iresnet34": [3, 4, 6, 3], "iresnet50": [3, 4, 14, 3],
                      "iresnet100": [3, 13, 30, 3], "iresnet200": [6, 26, 60, 6]}


def insightface_layout(layers: list[int], emb: int = 512, side: int = 7) -> dict[str, tuple]:
    """Parameter/buffer names and shapes of an insightface arcface_torch iResNet, written out
    independently from its published structure (IBasicBlock: bn1 conv1 bn2 prelu conv2 bn3)."""
    spec: dict[str, tuple] = {}

    def bn(prefix: str, c: int) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            spec[f"{prefix}.{k}"] = (c,)
        spec[f"{prefix}.num_batches_tracked"] = ()

    spec["conv1.weight"] = (64, 3, 3, 3)
    bn("bn1", 64)
    spec["prelu.weight"] = (64,)
    cin = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            bn(f"{p}.bn1", cin)
            spec[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
            bn(f"{p}.bn2", planes)
            spec[f"{p}.prelu.weight"] = (planes,)
            spec[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn3", planes)
            if b == 0:
                spec[f"{p}.downsample.0.weight"] = (planes, cin, 1, 1)
                bn(f"{p}.downsample.1", planes)
            cin = planes
    bn("bn2", 512)
    spec["fc.weight"] = (emb, 512 * side * side)
    spec["fc.bias"] = (emb,)
    bn("features", emb)
    return spec


def shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(INSIGHTFACE_DEPTHS))
def test_state_dict_matches_insightface_checkpoint_layout(name):
    with torch.device("meta"):
        model = build_model(name)
    assert shapes(model) == insightface_layout(INSIGHTFACE_DEPTHS[name])


def test_insightface_state_dict_loads_strictly():
    """A state dict laid out like an insightface checkpoint (random values) loads with strict=True."""
    spec = insightface_layout([2, 2, 2, 2])
    state = {k: (torch.randn(s) if s else torch.tensor(0)) for k, s in spec.items()}
    model = build_model("iresnet18")
    model.load_state_dict(state)  # strict by default
    assert torch.equal(model.layer3[1].conv2.weight,
                       state["layer3.1.conv2.weight"])


@pytest.mark.parametrize("spec,expected", [([3, 13, 40], [3, 13, 40, 3]), ([6, 26, 60], [6, 26, 60, 6]),
                                           ([3, 80, 512], [3, 80, 512, 3]), ([2, 2, 2, 2], [2, 2, 2, 2])])
def test_bigface_three_stage_specs_map_to_four_stages(spec, expected):
    assert expand_layers(spec) == expected


@pytest.mark.parametrize("name,spec,depth", [("iresnet120", [3, 13, 40], 120), ("iresnet140", [3, 15, 48], 140),
                                             ("iresnet240", [3, 25, 88], 240), ("iresnet1200", [3, 80, 512], 1198)])
def test_bigface_names_build_the_quoted_depth(name, spec, depth):
    with torch.device("meta"):
        named = build_model(name)
        generic = build_model("iresnet", layers=spec)
    assert shapes(named) == shapes(generic)
    blocks = sum(isinstance(m, IBasicBlock) for m in named.modules())
    convs = sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in named.modules())
    assert convs + 1 == depth == 2 * blocks + 2  # 3x3 convs on the main path + FC


@pytest.mark.parametrize("bad", [[3, 4], [3, 0, 3, 3], [1, 2, 3, 4, 5]])
def test_bad_layers_rejected(bad):
    with pytest.raises(ValueError, match="layers"):
        build_model("iresnet", layers=bad)


@pytest.mark.parametrize("size,side", [(112, 7), (56, 4), (28, 2)])
def test_input_size_sets_fc_input(size, side):
    model = build_model("iresnet18", input_size=size, base_width=8, embedding_size=32).eval()
    assert model.fc.in_features == 64 * side * side
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 32)


def test_wrong_input_size_is_a_clear_error():
    model = build_model("iresnet18", input_size=56, base_width=8)
    with pytest.raises(ValueError, match="56 x 56"):
        model(torch.randn(1, 3, 112, 112))


def _small(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("iresnet", layers=[2, 2, 2, 1], base_width=8, input_size=28, embedding_size=16,
                       dropout=0.0, **kw)


def test_gradient_checkpointing_same_outputs_grads_and_bn_stats():
    plain = _small()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing = True
    calls = {"n": 0}
    ckpt.layer2[1].register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    x = torch.randn(4, 3, 28, 28)
    outs = []
    for model in (plain, ckpt):
        model.train()
        y = model(x)
        (y ** 2).sum().backward()
        outs.append(y)
    assert calls["n"] == 2  # forward + recomputation in backward: checkpointing really ran
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(b, c), f"BN buffer {name} differs (recompute must not update running stats)"


def test_gradient_checkpointing_via_build_model_config():
    model = build_model("iresnet18", gradient_checkpointing=True, base_width=8, input_size=28)
    assert model.gradient_checkpointing and model.config["gradient_checkpointing"] is True


def test_fp16_autocast_keeps_fp32_head_and_agrees():
    model = _small()
    recalibrate_batchnorm(model, [torch.rand(16, 3, 28, 28) * 2 - 1 for _ in range(2)])
    x = torch.rand(4, 3, 28, 28) * 2 - 1
    with torch.no_grad():
        ref = model(x)
        model.fp16 = True
        amp = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outer = model(x)
    assert amp.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(ref, amp)
    assert cos.min() > 0.98, cos
    assert torch.isfinite(outer).all()


def test_features_scale_frozen_like_insightface():
    model = build_model("iresnet18", base_width=8, input_size=28)
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(512))
