"""Tests for fedunlearn.models: every architecture builds and maps inputs to class logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedunlearn.models import MODEL_NAMES, build_model, default_model_for

SMALL_MODELS = ("mlp", "cnn", "mcmahan-cnn")
SHAPES = ((1, 8, 8), (1, 28, 28), (3, 32, 32))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_models_output_shape(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 7)
    out = model(torch.rand(3, *shape))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_resnet18_output_shape(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", shape, 10)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    assert out.shape == (2, 10)
    assert model.conv1.in_channels == shape[0]
    # Small-image stem: 3x3 stride 1, no max-pool.
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)


def test_resnet18_large_single_channel_keeps_imagenet_stem() -> None:
    model = build_model("resnet18", (1, 64, 64), 5)
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (7, 7)
    assert isinstance(model.maxpool, nn.MaxPool2d)


def test_mcmahan_cnn_matches_paper_parameter_count() -> None:
    model = build_model("mcmahan-cnn", (1, 28, 28), 10)
    assert sum(p.numel() for p in model.parameters()) == 1_663_370


def test_mlp_layer_sizes() -> None:
    model = build_model("mlp", (1, 8, 8), 10)
    widths = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    assert widths == [128, 64, 10]


def test_unknown_model_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        build_model("vgg", (1, 8, 8), 10)
    for name in MODEL_NAMES:
        assert repr(name) in str(info.value)


@pytest.mark.parametrize(
    ("shape", "classes", "needle"),
    [((1, 8), 10, "input_shape"), ((1, 0, 8), 10, "input_shape"), ((1, 8, 8), 0, "num_classes")],
)
def test_bad_build_arguments(shape: tuple[int, ...], classes: int, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        build_model("cnn", shape, classes)  # type: ignore[arg-type]


def test_models_are_freshly_initialised() -> None:
    torch.manual_seed(0)
    a = build_model("cnn", (1, 8, 8), 10)
    b = build_model("cnn", (1, 8, 8), 10)
    assert not torch.equal(a[0].weight, b[0].weight)


def test_default_model_for() -> None:
    assert default_model_for("digits") == "cnn"
    assert default_model_for("mnist") == "cnn"
    assert default_model_for("fashion-mnist") == "cnn"
    assert default_model_for("cifar10") == "resnet18"
    with pytest.raises(ValueError, match="imagenet"):
        default_model_for("imagenet")
    assert set(MODEL_NAMES) == {"mlp", "cnn", "mcmahan-cnn", "resnet18"}
