"""Translator architectures: plain ``nn.Module``s mapping sender vectors ``(..., d_s)`` to receiver vectors
``(..., d_r)``.

Each takes ``(in_dim, out_dim, **options)`` so TranslatorModule can build it once the dimensions are known (they
come from the activation store); configs pick one with ``class_path`` and set only the options.
"""

from __future__ import annotations

import importlib
import inspect
import sys

import torch
from torch import nn

from activation_transfer.errors import UsageError


class Translator(nn.Module):
    """Base of the project's translators: ``--model.translator`` offers its subclasses (not every torch module).

    A new architecture subclasses it and takes ``(in_dim, out_dim, **options)``.
    """


class LinearTranslator(Translator):
    """One affine map per token: the paper's translator (``nn.Linear(768, 1024, bias=True)``).

    Args:
        in_dim: Sender hidden size.
        out_dim: Receiver hidden size.
        bias: Learn a bias term.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class MLPTranslator(Translator):
    """A small MLP with a linear skip path (not the paper's; for checking whether nonlinearity helps).

    Args:
        in_dim: Sender hidden size.
        out_dim: Receiver hidden size.
        hidden_dim: Width of the hidden layer.
        num_layers: Number of hidden layers (>= 1).
        dropout: Dropout after each hidden activation.
        residual_linear: Add a linear map from input to output, so the MLP learns a correction to a linear map.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 1024,
        num_layers: int = 1,
        dropout: float = 0.0,
        residual_linear: bool = True,
    ):
        super().__init__()
        if num_layers < 1:
            raise UsageError(f"MLPTranslator.num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers):
            layers += [nn.Linear(d, hidden_dim), nn.GELU(), nn.Dropout(dropout)]
            d = hidden_dim
        layers.append(nn.Linear(d, out_dim))
        self.mlp = nn.Sequential(*layers)
        self.skip = nn.Linear(in_dim, out_dim) if residual_linear else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(x)
        return y + self.skip(x) if self.skip is not None else y


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def translator_spec(translator) -> dict:
    """A plain-dict description ``{class_path, init_args}`` of a translator factory.

    Accepts a class, a ``functools.partial`` of a class (what jsonargparse gives for a ``Callable`` argument),
    or a dict already in that form.
    """
    if isinstance(translator, dict):
        init = translator.get("init_args") or {}
        return {"class_path": str(translator["class_path"]), "init_args": dict(init)}
    if inspect.isclass(translator):
        return {"class_path": _class_path(translator), "init_args": {}}
    func, args, kwargs = (
        getattr(translator, "func", None),
        getattr(translator, "args", ()),
        getattr(translator, "keywords", None),
    )
    if func is not None:
        # jsonargparse wraps as partial(default_class_instantiator, cls, **init_args); a plain partial(cls, ...)
        # has the class as func.
        cls = func if inspect.isclass(func) else (args[0] if args and inspect.isclass(args[0]) else None)
        if cls is not None:
            return {"class_path": _class_path(cls), "init_args": dict(kwargs or {})}
    raise TypeError(
        f"model.translator must be a translator class, a partial of one, or {{class_path, init_args}}; got "
        f"{translator!r}"
    )


# Where translator classes lived before the library moved out of ``lightning_modules/`` (checkpoints and exported
# folders written then name them so).
MOVED_MODULES = {"lightning_modules.components.translators": __name__}  # paths before the move


def current_class_path(class_path: str) -> str:
    """``class_path`` with a module from before the move replaced by where it lives now (other paths unchanged)."""
    module_name, _, name = class_path.rpartition(".")
    return f"{MOVED_MODULES[module_name]}.{name}" if module_name in MOVED_MODULES else class_path


def resolve_class(class_path: str) -> type[nn.Module]:
    """Import ``class_path`` (a path from before the move included) and check it is an ``nn.Module`` subclass."""
    module_name, _, name = current_class_path(class_path).rpartition(".")
    if not module_name:
        module_name, name = __name__, class_path  # short names refer to this module's translators
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    cls = getattr(module, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise UsageError(f"translator class_path {class_path!r} is not an nn.Module class")
    return cls


def build_translator(spec: dict, in_dim: int, out_dim: int) -> nn.Module:
    """Instantiate a translator from its plain-dict spec."""
    return resolve_class(spec["class_path"])(in_dim, out_dim, **spec.get("init_args", {}))
