"""Model zoo and the model registry: the built-in networks and any user factory `PKG.MODULE:FACTORY`.

A model is named by a string everywhere (ExperimentConfig.model, ClientSpec.model), so the driver
and every Ray worker build it the same way: a registered name, or a factory imported by path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError
from .plugins import is_plugin_path, load_callable

__all__ = [
    "MODEL_NAMES",
    "ModelFactory",
    "build_model",
    "check_model_fits",
    "default_model_for",
    "model_factory",
    "register_model",
    "registered_models",
]

ModelFactory = Callable[[tuple[int, int, int], int], nn.Module]
FACTORY_CONTRACT = "a function FACTORY(input_shape: (C, H, W), num_classes: int) -> torch.nn.Module"

_DEFAULT_MODELS: dict[str, str] = {
    "digits": "cnn",
    "mnist": "cnn",
    "fashion-mnist": "cnn",
    "cifar10": "resnet18",
}
# `auto` for a plug-in dataset: the small CNN, which fits any input of at least 2x2 pixels.
_PLUGIN_DATASET_DEFAULT = "cnn"


@dataclass(frozen=True)
class _Registered:
    factory: ModelFactory
    # Smallest height and width the factory accepts (checked before building, with a message that says so).
    min_side: int


_REGISTRY: dict[str, _Registered] = {}


def register_model(name: str, factory: ModelFactory, min_side: int = 1) -> None:
    """Make `factory` available as `--model name` in this process (the built-in models are registered so).

    A name registered at run time exists only in the process that registered it; for Ray runs name the
    factory by path instead (`--model PKG.MODULE:FACTORY`), which every worker imports itself.
    """
    if not isinstance(name, str) or not name or is_plugin_path(name) or name == "auto":
        raise ConfigError(f"model name={name!r}: must be a non-empty name without ':' other than 'auto'")
    if not callable(factory):
        raise ConfigError(f"model {name!r}: factory {factory!r} is not callable; pass {FACTORY_CONTRACT}")
    _REGISTRY[name] = _Registered(factory, min_side)


def _mlp(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Two-hidden-layer perceptron (128, 64)."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * height * width, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def _cnn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Two 3x3 conv layers, one 2x2 max-pool, then a 128-unit classifier head."""
    channels, height, width = input_shape
    # padding=1 keeps H, W through the convs; the single pool halves them (floor).
    flat = 64 * (height // 2) * (width // 2)
    return nn.Sequential(
        nn.Conv2d(channels, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def _mcmahan_cnn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The CNN of McMahan et al. (2017): conv5x5-32, pool, conv5x5-64, pool, fc-512, fc-classes."""
    channels, height, width = input_shape
    # 'same' padding (2) reproduces the paper's 1,663,370 parameters on 28x28 MNIST and keeps
    # inputs as small as 8x8 valid (8 -> 4 -> 2 after the two pools).
    flat = 64 * (height // 2 // 2) * (width // 2 // 2)
    return nn.Sequential(
        nn.Conv2d(channels, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def _resnet18(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """torchvision's ResNet-18, with the stem adapted to the input's channels and size."""
    # Imported lazily: torchvision's import cost is only worth paying when a ResNet is built.
    from torchvision.models import resnet18

    channels, height, width = input_shape
    model = resnet18(weights=None, num_classes=num_classes)
    if max(height, width) <= 32:
        # The ImageNet stem (7x7 stride 2 + max-pool) would shrink small images 4x before the
        # first block; the usual CIFAR variant keeps full resolution instead.
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


register_model("mlp", _mlp)
# Floor-dividing max-pools would leave an empty feature map (and a zero-width Linear) on tinier inputs;
# ResNet's strided convs round up, so it accepts any size.
register_model("cnn", _cnn, min_side=2)
register_model("mcmahan-cnn", _mcmahan_cnn, min_side=4)
register_model("resnet18", _resnet18)
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)  # the built-in models


def registered_models() -> tuple[str, ...]:
    """Every model name registered in this process: the built-ins, then any `register_model` added."""
    return tuple(_REGISTRY)


def model_factory(name: str) -> ModelFactory:
    """The factory behind a model name: a registered one, or `PKG.MODULE:FACTORY` imported (ConfigError otherwise)."""
    if name in _REGISTRY:
        return _REGISTRY[name].factory
    if isinstance(name, str) and ":" in name:
        return load_callable("model", name, FACTORY_CONTRACT)
    allowed = ", ".join(repr(n) for n in _REGISTRY)
    raise ConfigError(f"model name={name!r}: must be one of {allowed}, or PKG.MODULE:FACTORY naming {FACTORY_CONTRACT}")


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A freshly initialised model called name for inputs of shape (C, H, W) and num_classes outputs."""
    factory = model_factory(name)
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"input_shape={input_shape!r}: must be three positive integers (C, H, W)")
    channels, height, width = shape
    min_side = _REGISTRY[name].min_side if name in _REGISTRY else 1
    if min(height, width) < min_side:
        raise ConfigError(
            f"model={name!r} needs height and width >= {min_side}, the data has input_shape={input_shape!r}; "
            "pick another --model (mlp fits any shape)"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: must be an integer >= 1")
    try:
        model = factory((channels, height, width), num_classes)
    except Exception as err:  # a user factory's own error, on one line, with the arguments it was given
        text = " ".join(str(err).split())
        raise ConfigError(
            f"model={name!r}: FACTORY(input_shape={shape}, num_classes={num_classes}) raised "
            f"{type(err).__name__}: {text}; it must accept (C, H, W) and the number of classes"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model={name!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module; "
            f"return the network, e.g. `return MyNet(...)`"
        )
    params = list(model.parameters())
    if not params:
        raise ConfigError(f"model={name!r}: the module has no parameters, so there is nothing to train or unlearn")
    wrong = sorted({str(p.dtype) for p in params if not p.dtype.is_floating_point})
    if wrong:
        raise ConfigError(
            f"model={name!r}: parameters of dtype {', '.join(wrong)}; every parameter must be floating point "
            "(e.g. call .float() on the module)"
        )
    return model


def check_model_fits(name: str, x: torch.Tensor, num_classes: int) -> None:
    """Build model `name` for inputs like `x` (a batch, N >= 1) and check it maps them to (N, num_classes) logits.

    Called once before the simulation starts, so a factory that does not fit the data fails with one
    line instead of inside every Ray worker. Runs in eval mode without gradients on a copy of the RNG
    state: building here does not change the initial weights the run draws later.
    """
    if x.dim() != 4 or x.shape[0] < 1:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected a batch (N, C, H, W) with N >= 1")
    shape = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
    with torch.random.fork_rng(devices=[]):
        model = build_model(name, shape, num_classes)
        model.eval()
        try:
            with torch.no_grad():
                out = model(x.float())
        except Exception as err:  # a shape mismatch inside the user's forward, reported on one line
            text = " ".join(str(err).split())
            raise ConfigError(
                f"model={name!r}: forward on a batch of the data, shape {tuple(x.shape)}, raised "
                f"{type(err).__name__}: {text}; build the network for input_shape={shape}"
            ) from None
    expected = (int(x.shape[0]), num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"model={name!r}: output on a batch of shape {tuple(x.shape)} is {got}, expected {expected} "
            f"(batch, num_classes={num_classes}): end the network with num_classes logits"
        )


def default_model_for(dataset: str) -> str:
    """The model name used for dataset when none is given (`cnn` for a plug-in dataset `PKG.MODULE:LOADER`)."""
    if is_plugin_path(dataset):
        return _PLUGIN_DATASET_DEFAULT
    if dataset not in _DEFAULT_MODELS:
        allowed = ", ".join(repr(d) for d in _DEFAULT_MODELS)
        raise ValueError(f"dataset={dataset!r}: must be one of {allowed}")
    return _DEFAULT_MODELS[dataset]
