"""Checks of single input values that raise a one-line InputError naming the key, the value and what is allowed.

  checks.integer("config.data.seq_len", value, minimum=1)
  checks.number("config.optimizer.b1", value, minimum=0, below=1)
  checks.choice("config.model.remat", value, ("none", "full", "dots"))
"""

import math

import numpy as np

from errors import InputError


def is_int(value) -> bool:
    """A Python or numpy integer, not a bool (which Python counts as an int)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def integer(key: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if not is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise InputError(f"{key}={value!r} must be an integer{_bounds(minimum, maximum)}")
    return int(value)


def number(key: str, value, *, minimum: float | None = None, above: float | None = None,
           maximum: float | None = None, below: float | None = None) -> float:
    """A finite real number within the given bounds (minimum/maximum inclusive, above/below exclusive)."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (above is None or value > above)
    ok = ok and (maximum is None or value <= maximum) and (below is None or value < below)
    if not ok:
        bounds = [f">= {minimum}" if minimum is not None else "", f"> {above}" if above is not None else "",
                  f"<= {maximum}" if maximum is not None else "", f"< {below}" if below is not None else ""]
        bounds = " and ".join(b for b in bounds if b)
        raise InputError(f"{key}={value!r} must be a finite number" + (f" {bounds}" if bounds else ""))
    return float(value)


def choice(key: str, value, allowed):
    if value not in allowed:
        raise InputError(f"{key}={value!r} is not one of {', '.join(repr(a) for a in allowed)}")
    return value


def multiple(key: str, value: int, of: int, of_key: str) -> None:
    if value % of:
        raise InputError(f"{key}={value} must be a multiple of {of_key}={of}")


def _bounds(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    return f" <= {maximum}" if maximum is not None else ""
