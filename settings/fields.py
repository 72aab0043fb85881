"""Building blocks shared by every settings model.

The base model, the annotated field types (durations, sizes, ports) and the
"located" error that lets a validator point at a key *below* the one it
validates.  Keeping them together means every section behaves the same way on
unknown keys, ``x-`` extensions and bad values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from settings.paths import KeyPath, format_path
from settings.units import parse_duration, parse_size

__all__ = [
    "LOCATED_ERROR",
    "ConfigModel",
    "Duration",
    "Int",
    "NonNegativeInt",
    "Port",
    "PositiveInt",
    "Ratio",
    "Size",
    "located_error",
]

#: pydantic error type whose ``ctx["issues"]`` holds ``(relative path, message)`` pairs.
LOCATED_ERROR = "octopus_located"


def _is_extension(key: object) -> bool:
    return isinstance(key, str) and key.startswith("x-")


class ConfigModel(BaseModel):
    """Base of all settings sections.

    * Unknown keys are errors (``extra="forbid"``): a typo must not silently fall
      back to a default.
    * Keys starting with ``x-`` are dropped before validation at every level, so
      users and FARP tooling can annotate configs.  Free-form ``dict`` fields are
      plain data, not models, and keep such keys.
    * Numbers are accepted where strings are expected, because ``${VAR}`` values
      are re-typed (a password of ``1234`` arrives as an int).
    """

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_extension_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(_is_extension(key) for key in data):
            return {key: value for key, value in data.items() if not _is_extension(key)}
        return data


def located_error(issues: Sequence[tuple[KeyPath, str]]) -> PydanticCustomError:
    """An error for several problems, each at a path relative to the validated value.

    pydantic pins a validator's error to the validated field; cross-checks (route
    names an unknown upstream, ``tls.cert`` missing when TLS is on) need to point
    deeper.  The loader expands ``ctx["issues"]`` into one located line each; when
    a model is built directly the summary still reads sensibly.
    """
    summary = "; ".join(
        f"{format_path(path)}: {message}" if path else message for path, message in issues
    )
    return PydanticCustomError(
        LOCATED_ERROR,
        "{summary}",
        {"summary": summary, "issues": [(tuple(path), message) for path, message in issues]},
    )


def _reject_bool(value: Any) -> Any:
    # pydantic's lax mode turns True into 1; ``http_port: yes`` is a typo, not port 1.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


def _duration(value: Any) -> Any:
    # Other types (None, lists) fall through so pydantic names the type problem.
    return parse_duration(value) if isinstance(value, float | int | str) else value


def _size(value: Any) -> Any:
    return parse_size(value) if isinstance(value, float | int | str) else value


#: An int that refuses booleans.
Int = Annotated[int, BeforeValidator(_reject_bool)]
NonNegativeInt = Annotated[Int, Field(ge=0)]
PositiveInt = Annotated[Int, Field(ge=1)]
#: 0 is allowed: it asks the OS for a free port, which tests rely on.
Port = Annotated[Int, Field(ge=0, le=65535)]
#: A fraction between 0 and 1 inclusive.
Ratio = Annotated[float, BeforeValidator(_reject_bool), Field(ge=0.0, le=1.0)]
#: Seconds, written as ``250ms``/``5s``/``1h30m`` or a bare number.
Duration = Annotated[float, BeforeValidator(_duration)]
#: Bytes, written as ``512KiB``/``10MB`` or a bare number.
Size = Annotated[int, BeforeValidator(_size)]
