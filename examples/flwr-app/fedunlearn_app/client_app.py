"""The ClientApp: fedunlearn's client side (train, evaluate filling the gradient cache, gradient queries)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.clientapp import ClientApp

from strategies.client_app import build_client_app


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """The ClientApp; it reads its settings from the run config, then `overrides` (same keys as the server's)."""
    return build_client_app(None, overrides=overrides)


# What `flwr run` loads ([tool.flwr.app.components] clientapp = "fedunlearn_app.client_app:app").
app = make_client_app()
