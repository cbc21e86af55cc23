"""What every config section uses: two checks (a lower bound, a closed set; one line naming the key) and `knob`."""
from __future__ import annotations

import copy
import dataclasses
import difflib
from typing import Any

from jaxinfra.core.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")  # compute, master-weight and export dtypes


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


def knob(default: Any, help: str) -> Any:
    """A dataclass field whose metadata["help"] is its meaning (--help reads it); list and dict defaults are copied."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})
