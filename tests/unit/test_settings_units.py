"""Durations and sizes: the spellings config authors may use, and the refusals."""

from __future__ import annotations

import pytest

from settings import parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        ("1d", 86400.0),
        ("30", 30.0),
        (" 2s ", 2.0),
        (0, 0.0),
        (3, 3.0),
        (2.5, 2.5),
    ],
)
def test_duration_spellings_become_float_seconds(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize("text", ["5 parsecs", "", "s", "1.2.3s", "5x", "1h 30m", "ms5"])
def test_bad_duration_names_value_and_shows_examples(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == f"invalid duration {text!r} (use e.g. 250ms, 5s, 5m, 1h)"


@pytest.mark.parametrize("value", ["-5s", "-1", -2])
def test_negative_duration_is_refused(value: str | int) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration(value)


def test_boolean_is_not_a_duration() -> None:
    with pytest.raises(ValueError, match="invalid duration True"):
        parse_duration(True)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512KiB", 512 * 1024),
        ("10MiB", 10 * 1024**2),
        ("1GiB", 1024**3),
        ("10MB", 10_000_000),
        ("1KB", 1000),
        ("1.1KB", 1100),
        ("1.5KiB", 1536),
        ("100B", 100),
        ("100", 100),
        ("10 mib", 10 * 1024**2),
        (100, 100),
        (2048.0, 2048),
    ],
)
def test_size_spellings_become_int_bytes(text: str | int, size: int) -> None:
    assert parse_size(text) == size
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize("text", ["10 zB", "lots", "", "KiB", "1.2.3MB", "10MiBs"])
def test_bad_size_names_value_and_shows_examples(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert str(info.value) == f"invalid size {text!r} (use e.g. 512KiB, 10MiB, 1GB)"


def test_fractional_bytes_are_refused() -> None:
    with pytest.raises(ValueError, match="not a whole number of bytes"):
        parse_size("1.5B")


def test_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        parse_size(-1)
