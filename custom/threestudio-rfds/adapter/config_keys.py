"""One-line errors for config keys a class does not know, before threestudio's OmegaConf
traceback (``parse_structured`` raises deep inside with the whole dataclass printed)."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterable, Mapping, Optional


class UnknownConfigKeyError(ValueError):
    """A config block holds a key its class does not define."""


def check_config_keys(where: str, allowed: Iterable[str], cfg: Optional[Mapping[str, Any]]) -> None:
    """Raise :class:`UnknownConfigKeyError` naming the first key of ``cfg`` not in ``allowed``."""
    allowed = sorted(allowed)
    for key in (cfg or {}):
        if key not in allowed:
            raise UnknownConfigKeyError(f"{where}: unknown config key {key!r} (allowed: {', '.join(allowed)})")


def dataclass_keys(cls) -> list:
    """The field names of a (config) dataclass."""
    return [f.name for f in dataclasses.fields(cls)]


class KnownKeys:
    """Mixin (first base) for a threestudio class with a dataclass ``Config``: its ``__init__``
    checks the config block's keys, naming the class by ``registered_name``, before threestudio
    parses it."""

    registered_name: ClassVar[str] = ""

    def __init__(self, cfg: Optional[Mapping[str, Any]] = None, *args: Any, **kwargs: Any) -> None:
        check_config_keys(self.registered_name, dataclass_keys(self.Config), cfg)
        super().__init__(cfg, *args, **kwargs)
