"""Model zoo: small networks for the image datasets used in the unlearning experiments."""

from __future__ import annotations

from torch import nn

__all__ = ["MODEL_NAMES", "build_model", "default_model_for"]

MODEL_NAMES: tuple[str, ...] = ("mlp", "cnn", "mcmahan-cnn", "resnet18")

_DEFAULT_MODELS: dict[str, str] = {
    "digits": "cnn",
    "mnist": "cnn",
    "fashion-mnist": "cnn",
    "cifar10": "resnet18",
}


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


_BUILDERS = {
    "mlp": _mlp,
    "cnn": _cnn,
    "mcmahan-cnn": _mcmahan_cnn,
    "resnet18": _resnet18,
}


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A freshly initialised model called name for inputs of shape (C, H, W) and num_classes outputs."""
    if name not in _BUILDERS:
        allowed = ", ".join(repr(n) for n in MODEL_NAMES)
        raise ValueError(f"model name={name!r}: must be one of {allowed}")
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"input_shape={input_shape!r}: must be three positive integers (C, H, W)")
    channels, height, width = shape
    # Floor-dividing max-pools would leave an empty feature map (and a zero-width Linear) on
    # tinier inputs; ResNet's strided convs round up, so it accepts any size.
    min_side = {"mlp": 1, "cnn": 2, "mcmahan-cnn": 4, "resnet18": 1}[name]
    if min(height, width) < min_side:
        raise ValueError(
            f"input_shape={input_shape!r}: model {name!r} needs height and width >= {min_side}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: must be an integer >= 1")
    return _BUILDERS[name]((channels, height, width), num_classes)


def default_model_for(dataset: str) -> str:
    """The model name used for dataset when none is given."""
    if dataset not in _DEFAULT_MODELS:
        allowed = ", ".join(repr(d) for d in _DEFAULT_MODELS)
        raise ValueError(f"dataset={dataset!r}: must be one of {allowed}")
    return _DEFAULT_MODELS[dataset]
