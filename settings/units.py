"""Human-friendly durations and sizes used throughout the configuration.

Config files say ``250ms`` or ``10MiB`` because that is what operators think in;
the rest of the gateway wants plain ``float`` seconds and ``int`` bytes so that no
other module ever has to parse a unit.  Everything unit-related lives here so the
accepted spellings (and the wording of the error when one is wrong) are defined
in exactly one place.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

__all__ = ["DURATION_HINT", "SIZE_HINT", "parse_duration", "parse_size"]

#: Appended to every duration error so the user sees what a valid value looks like.
DURATION_HINT = "use e.g. 250ms, 5s, 5m, 1h"
#: Appended to every size error, same reason.
SIZE_HINT = "use e.g. 512KiB, 10MiB, 1GB"

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"

# Seconds per unit.  ``ms`` must be tried before ``m`` (the alternation order).
_DURATION_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_DURATION_PART = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")
_DURATION_FULL = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h|d))+")
_BARE_NUMBER = re.compile(rf"[+-]?{_NUMBER}")

# Bytes per unit, keyed by the lower-cased spelling: decimal (KB) and binary (KiB).
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(rf"({_NUMBER})\s*([A-Za-z]*)")


def parse_duration(value: str | int | float) -> float:
    """Return ``value`` as seconds.

    Accepts a bare number (already seconds, from YAML ints/floats or strings like
    ``"30"``) or a sequence of ``<number><unit>`` parts with units ms, s, m, h, d,
    so ``1h30m`` and ``1.5s`` both work.  Negative durations are refused because no
    timeout or interval in the gateway has a meaning for them.

    Raises:
        ValueError: with a message naming the bad value and showing valid ones.
    """
    if isinstance(value, bool):  # bool is an int subclass; ``timeout: yes`` is a mistake
        raise ValueError(f"invalid duration {value!r} ({DURATION_HINT})")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if _BARE_NUMBER.fullmatch(text):
            seconds = float(text)
        elif text.startswith("-") and _DURATION_FULL.fullmatch(text[1:]):
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        elif _DURATION_FULL.fullmatch(text):
            seconds = sum(
                float(number) * _DURATION_UNITS[unit]
                for number, unit in _DURATION_PART.findall(text)
            )
        else:
            raise ValueError(f"invalid duration {value!r} ({DURATION_HINT})")
    else:
        raise ValueError(f"invalid duration {value!r} ({DURATION_HINT})")
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"invalid duration {value!r} ({DURATION_HINT})")
    if seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    return seconds


def parse_size(value: str | int | float) -> int:
    """Return ``value`` as a whole number of bytes.

    Accepts a bare number (bytes) or ``<number><unit>`` where the unit is B, KB,
    MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), in any
    letter case and with optional space: ``512KiB``, ``10 MB``, ``100B``.
    Fractions are fine as long as they come out as whole bytes (``1.5KiB``).

    Raises:
        ValueError: with a message naming the bad value and showing valid ones.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r} ({SIZE_HINT})")
    # Decimal, not float: ``1.1KB`` must be exactly 1100 bytes, not 1100.0000000000002.
    if isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, float) and math.isfinite(value):
        amount = Decimal(repr(value))
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(f"invalid size {value!r} ({SIZE_HINT})")
        amount = Decimal(match.group(1)) * _SIZE_UNITS[unit]
    else:
        raise ValueError(f"invalid size {value!r} ({SIZE_HINT})")
    if amount < 0:
        raise ValueError(f"invalid size {value!r}: must not be negative")
    if amount != amount.to_integral_value():
        raise ValueError(f"invalid size {value!r}: not a whole number of bytes")
    return int(amount)
