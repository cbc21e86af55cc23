"""The two checks every config section uses: a lower bound and a closed set of values, each one line naming the key."""
from __future__ import annotations

import difflib
from typing import Any

from jaxinfra.core.errors import UserError


def at_least(values: dict[str, float], low: float, what: str) -> None:
    """Each key=value must be >= low; raises UserError naming the first that is not."""
    for key, value in values.items():
        if value < low:
            raise UserError(f"{key}={value} must {what}")


def one_of(key: str, value: Any, options: tuple[str, ...]) -> None:
    """value must be one of options; the error names the closest one."""
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"{key}={value!r} is not one of {', '.join(options)}{hint}")
