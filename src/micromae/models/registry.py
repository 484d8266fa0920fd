"""A registry of model factories by name (like timm's ``@register_model``).

Each factory builds one architecture of :mod:`micromae.architectures` and takes keyword overrides::

    create_model("mae_maester", mask_ratio=0.75)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from micromae.errors import input_error

__all__ = ["MODELS", "create_model", "list_models", "register_model"]

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn`` under its own name (refusing a second factory of the same name)."""
    if fn.__name__ in MODELS:
        raise ValueError(f"model factory {fn.__name__!r} is registered twice")
    MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """The registered factory names, sorted."""
    return sorted(MODELS)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """The model of factory ``name`` with constructor ``overrides``."""
    if name not in MODELS:
        raise input_error("model", "one of " + ", ".join(list_models()), repr(name), "Pick a registered model")
    return MODELS[name](**overrides)
