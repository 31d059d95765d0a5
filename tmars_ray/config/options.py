"""The one way a Config option is declared: a dataclass field whose metadata carries its help
text and its CLI group (which commands show it); `choices` lists the allowed values."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def opt(default: Any, help: str, group: str, **kw: Any) -> Any:
    """A Config field: `default`, `--help` text, group (see cli.GROUPS_BY_COMMAND), extras."""
    meta = {"help": help, "group": group, **kw}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)
