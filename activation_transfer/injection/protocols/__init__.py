"""The evaluation protocols by ``model.protocol`` name; a new one is a class implementing ``base.EvalProtocol``
(with its conditions) and one entry here, or :func:`register` from outside the package."""

from __future__ import annotations

from activation_transfer.errors import UsageError
from activation_transfer.injection.protocols.base import EvalProtocol
from activation_transfer.injection.protocols.kv import KVProtocol
from activation_transfer.injection.protocols.paper import PaperProtocol
from activation_transfer.injection.protocols.split import SplitProtocol

PROTOCOLS: dict[str, type[EvalProtocol]] = {cls.name: cls for cls in (PaperProtocol, SplitProtocol, KVProtocol)}


def register(cls: type[EvalProtocol]) -> type[EvalProtocol]:
    """Add a protocol class under its ``name`` (usable as a class decorator); another class of that name is refused."""
    if not (isinstance(cls, type) and issubclass(cls, EvalProtocol)):
        raise TypeError(f"{cls!r} is not an EvalProtocol subclass")
    if PROTOCOLS.get(cls.name, cls) is not cls:
        raise ValueError(f"protocol {cls.name!r} is already registered as {PROTOCOLS[cls.name].__qualname__}")
    PROTOCOLS[cls.name] = cls
    return cls


def protocol_for(name: str, **options) -> EvalProtocol:
    """The protocol ``name`` configured with the module's protocol options (``slots``, ...).

    Raises:
        ValueError: An unknown name, naming the known ones.
    """
    if name not in PROTOCOLS:
        raise UsageError(f"model.protocol must be one of {', '.join(PROTOCOLS)}, got {name!r}")
    return PROTOCOLS[name].configured(**options)


__all__ = ["PROTOCOLS", "EvalProtocol", "KVProtocol", "PaperProtocol", "SplitProtocol", "protocol_for", "register"]
