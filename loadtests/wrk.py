"""Run wrk and turn its human-oriented report into numbers.

wrk has no machine-readable output without a Lua script, and a script would add per-request
work inside the load generator we are trying to keep out of the measurement. So the harness
parses the plain ``--latency`` report; :func:`parse_wrk_output` is pure so it can be tested
against captured real output (tests/unit/test_wrk_parse.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from loadtests.procs import LOOPBACK, HarnessError

#: wrk prints times with the unit that keeps the number short: us, ms, s, then m and h
#: (wrk's units.c). Factors convert each to milliseconds.
_TIME_UNITS_MS: dict[str, float] = {
    "us": 0.001,
    "ms": 1.0,
    "s": 1000.0,
    "m": 60_000.0,
    "h": 3_600_000.0,
}
_TIME = r"([0-9]+(?:\.[0-9]+)?)(us|ms|s|m|h)"

_RE_RPS = re.compile(r"^Requests/sec:\s+([0-9]+(?:\.[0-9]+)?)\s*$", re.MULTILINE)
_RE_PERCENTILE = re.compile(rf"^\s+([0-9]+(?:\.[0-9]+)?)%\s+{_TIME}\s*$", re.MULTILINE)
_RE_TOTAL = re.compile(rf"^\s+([0-9]+) requests in {_TIME},", re.MULTILINE)
_RE_SOCKET = re.compile(
    r"Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), timeout ([0-9]+)"
)
_RE_NON_2XX = re.compile(r"Non-2xx or 3xx responses: ([0-9]+)")


class WrkParseError(ValueError):
    """The text is not a wrk report (or wrk changed its format)."""


@dataclass(frozen=True)
class WrkResult:
    """The numbers the benchmark reports from one wrk run.

    ``non_2xx_3xx`` is wrk's own label: it counts responses with status >= 400. It is kept
    apart from the socket errors because the two point at different bugs (a gateway answering
    502 quickly versus one dropping connections), yet both are errors: wrk's Requests/sec
    counts every response, so a gateway that fails fast would otherwise look fast.
    """

    requests_per_sec: float
    requests: int
    duration_s: float
    p50_ms: float | None
    p99_ms: float | None
    non_2xx_3xx: int = 0
    socket_errors: dict[str, int] = field(
        default_factory=lambda: {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    )

    @property
    def errors(self) -> int:
        """Every failed request or connection: non-2xx/3xx responses plus socket errors."""
        return self.non_2xx_3xx + sum(self.socket_errors.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the derived total included for readers of the file."""
        data = asdict(self)
        data["errors"] = self.errors
        return data


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS_MS[unit]


def parse_wrk_output(text: str) -> WrkResult:
    """Parse the stdout of ``wrk --latency`` into a :class:`WrkResult`.

    Percentiles are None when the report has no latency distribution (wrk run without
    ``--latency``). The error lines are optional because wrk prints them only when non-zero.
    """
    rps = _RE_RPS.search(text)
    total = _RE_TOTAL.search(text)
    if rps is None or total is None:
        raise WrkParseError(f"not a wrk report (no Requests/sec or totals line):\n{text[:500]}")

    percentiles: dict[float, float] = {
        float(pct): _to_ms(value, unit) for pct, value, unit in _RE_PERCENTILE.findall(text)
    }
    socket_errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    if sock := _RE_SOCKET.search(text):
        socket_errors = dict(zip(socket_errors, map(int, sock.groups()), strict=True))
    non_2xx = _RE_NON_2XX.search(text)

    return WrkResult(
        requests_per_sec=float(rps.group(1)),
        requests=int(total.group(1)),
        duration_s=_to_ms(total.group(2), total.group(3)) / 1000.0,
        p50_ms=percentiles.get(50.0),
        p99_ms=percentiles.get(99.0),
        non_2xx_3xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=socket_errors,
    )


def find_wrk(explicit: str | None = None) -> str:
    """Locate the wrk binary."""
    found = explicit or shutil.which("wrk") or "/usr/bin/wrk"
    if not shutil.which(found):
        raise HarnessError("wrk not found (install the wrk package or pass --wrk PATH)")
    return found


def wrk_version(wrk: str) -> str:
    """First line of ``wrk -v``, recorded with results (wrk exits 1 on -v, hence no check)."""
    proc = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def run_wrk(
    wrk: str,
    url: str,
    *,
    threads: int,
    connections: int,
    duration_s: int,
    latency: bool = True,
) -> tuple[WrkResult, str]:
    """Run one wrk load against ``url`` and return the parsed result and the raw report.

    Refuses any target other than 127.0.0.1: this is a load generator, and pointing it at a
    shared or remote host by mistake is a denial of service, not a benchmark.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname != LOOPBACK:
        raise HarnessError(f"refusing to load {url!r}: only http://{LOOPBACK} may be a target")
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s}s"]
    if latency:
        argv.append("--latency")
    argv.append(url)
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, check=False, timeout=duration_s + 30
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"wrk did not finish: {' '.join(argv)}") from exc
    if proc.returncode != 0:
        raise HarnessError(
            f"wrk failed (status {proc.returncode}): {' '.join(argv)}\n"
            f"{(proc.stderr or proc.stdout).strip()}"
        )
    try:
        return parse_wrk_output(proc.stdout), proc.stdout
    except WrkParseError as exc:
        raise HarnessError(f"{exc}\nstderr: {proc.stderr.strip()}") from exc
