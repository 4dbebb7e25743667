"""Tests for fedunlearn.models: every architecture builds and maps inputs to class logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedunlearn.errors import ConfigError
from fedunlearn.models import (
    MODEL_NAMES,
    build_model,
    check_model_fits,
    default_model_for,
    model_factory,
    register_model,
    registered_models,
)

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


def test_builtins_go_through_the_registry() -> None:
    assert registered_models()[: len(MODEL_NAMES)] == MODEL_NAMES
    calls = []

    def spy(input_shape, num_classes):
        calls.append((input_shape, num_classes))
        return nn.Linear(2, num_classes)

    original = model_factory("mlp")
    register_model("mlp", spy)
    try:
        assert isinstance(build_model("mlp", (1, 8, 8), 4), nn.Linear) and calls == [((1, 8, 8), 4)]
    finally:
        register_model("mlp", original)
    assert isinstance(build_model("mlp", (1, 8, 8), 4), nn.Sequential)


def test_too_small_input_for_a_pooling_model_names_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"model='mcmahan-cnn' needs height and width >= 4.*mlp fits any shape"):
        build_model("mcmahan-cnn", (1, 3, 3), 10)


def test_check_model_fits_accepts_a_fitting_model_and_rejects_the_wrong_width() -> None:
    check_model_fits("cnn", torch.rand(2, 1, 8, 8), 10)
    with pytest.raises(ConfigError, match=r"expected \(2, 7\)"):
        _fits_with_other_classes()


def _fits_with_other_classes() -> None:
    """A model built for 10 classes checked against 7: the shape check must see it."""
    register_model("ten-classes", lambda shape, k: build_model("cnn", shape, 10))
    check_model_fits("ten-classes", torch.rand(2, 1, 8, 8), 7)


def test_default_model_for_a_plugin_dataset_is_the_cnn() -> None:
    assert default_model_for("mylab.data:load") == "cnn"
