"""`make bench`: Octopus versus an nginx reverse proxy on the same upstream, same machine.

Absolute req/s depend on the machine, so the number that matters is the ratio between Octopus
and nginx proxying to the same trivial upstream under the same wrk load. The two targets are
measured alternately (nginx, octopus, nginx, octopus, ...) so that drift on the machine, such
as thermal throttling or a noisy neighbour, lands on both sides instead of on one. The upstream
is also measured directly once, which shows how much headroom the upstream has left and so
whether it, rather than the proxy, could be the bottleneck.

Run ``python -m loadtests.bench --help`` for options; see loadtests/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from loadtests.nginx import find_nginx, nginx_version, start_nginx
from loadtests.octopus import REPO_ROOT, start_octopus
from loadtests.procs import LOOPBACK, HarnessError, ManagedProcess, stop_all
from loadtests.wrk import WrkResult, find_wrk, run_wrk, wrk_version

RESULTS_DIR = Path(__file__).resolve().parent / "results"

UPSTREAM = "upstream-direct"
BASELINE = "nginx-proxy"
OCTOPUS = "octopus"
#: Stand-in for Octopus under --skip-octopus: a second, identical nginx proxy. Running the
#: full alternation against it is a null test of the harness; its ratio should be close to 1.
NGINX_TWIN = "nginx-proxy-b"

#: Exit statuses, so `make bench` and CI can tell a broken setup from a bad result.
EXIT_OK = 0
EXIT_TARGET_ERRORS = 1
EXIT_HARNESS_FAILED = 2
EXIT_INTERRUPTED = 130


@dataclass
class TargetRuns:
    """All measured wrk runs of one target, in order."""

    name: str
    port: int
    runs: list[WrkResult] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)

    @property
    def mean_rps(self) -> float:
        """Mean req/s over rounds: the figure the ratio is computed from."""
        return statistics.fmean(r.requests_per_sec for r in self.runs)

    def mean_ms(self, attr: str) -> float | None:
        """Mean of a latency percentile over rounds, or None if wrk did not report it."""
        values = [getattr(r, attr) for r in self.runs]
        present = [v for v in values if v is not None]
        return statistics.fmean(present) if present else None

    @property
    def errors(self) -> int:
        """Errors summed over all rounds (never averaged away)."""
        return sum(r.errors for r in self.runs)

    def error_breakdown(self) -> dict[str, int]:
        """Non-zero error counts by kind, summed over rounds."""
        totals = {"non-2xx/3xx": sum(r.non_2xx_3xx for r in self.runs)}
        for kind in ("connect", "read", "write", "timeout"):
            totals[kind] = sum(r.socket_errors[kind] for r in self.runs)
        return {kind: count for kind, count in totals.items() if count}

    def summary(self) -> dict[str, Any]:
        """The aggregated figures shown in the table, for the JSON file."""
        return {
            "port": self.port,
            "rounds": len(self.runs),
            "mean_requests_per_sec": self.mean_rps,
            "per_round_requests_per_sec": [r.requests_per_sec for r in self.runs],
            "mean_p50_ms": self.mean_ms("p50_ms"),
            "mean_p99_ms": self.mean_ms("p99_ms"),
            "errors": self.errors,
            "error_breakdown": self.error_breakdown(),
        }


def _duration(text: str) -> int:
    """Parse a wrk-style duration ("10", "10s", "2m") into whole seconds."""
    value = text.strip().lower()
    scale = 1
    if value.endswith("m"):
        value, scale = value[:-1], 60
    elif value.endswith("s"):
        value = value[:-1]
    try:
        seconds = int(value) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 10s)") from None
    if seconds < 1:
        raise argparse.ArgumentTypeError("duration must be at least 1s")
    return seconds


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line; defaults match the DESIGN.md reference measurements."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description="Benchmark Octopus against an nginx reverse proxy on the same upstream.",
    )
    parser.add_argument(
        "--duration", type=_duration, default=10, help="wrk duration per run (default 10s)"
    )
    parser.add_argument(
        "--warmup", type=_duration, default=2, help="wrk warm-up per target (default 2s)"
    )
    parser.add_argument("--connections", type=_positive_int, default=64, help="wrk -c (default 64)")
    parser.add_argument("--threads", type=_positive_int, default=1, help="wrk -t (default 1)")
    parser.add_argument(
        "--rounds",
        type=_positive_int,
        default=2,
        help="alternating nginx/octopus rounds (default 2)",
    )
    parser.add_argument(
        "--server",
        choices=("uvicorn", "granian"),
        default=None,
        help="ASGI server for Octopus, passed through as `--server` (default: gateway's own)",
    )
    parser.add_argument(
        "--skip-octopus",
        action="store_true",
        help=(
            f"do not start Octopus; measure a second identical nginx proxy ({NGINX_TWIN}) in "
            "its place. A null test of the harness: the ratio should be close to 1.00"
        ),
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"also write the results JSON here (it is always saved under {RESULTS_DIR})",
    )
    parser.add_argument("--nginx", default=None, help="path to the nginx binary")
    parser.add_argument("--wrk", default=None, help="path to the wrk binary")
    return parser


def _log(message: str) -> None:
    """Progress goes to stderr so stdout carries only the markdown report."""
    print(message, file=sys.stderr, flush=True)


def _check_alive(procs: Sequence[ManagedProcess]) -> None:
    """Fail if any server died during a run; its numbers would be meaningless."""
    for proc in procs:
        if not proc.alive():
            raise HarnessError("a benchmark server died mid-run\n" + proc.describe_failure())


def _git_revision() -> str:
    """Commit being measured, marked -dirty for uncommitted changes (the usual case here)."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{rev}-dirty" if dirty else rev


def run_benchmark(
    args: argparse.Namespace, workdir: Path
) -> tuple[dict[str, TargetRuns], str, dict[str, Any]]:
    """Start all servers, warm them, measure, and return runs per target.

    Returns ``(targets, candidate_name, environment)``; targets are keyed by name in display
    order. Servers are left running; the caller's cleanup stops them.
    """
    nginx = find_nginx(args.nginx)
    wrk = find_wrk(args.wrk)
    environment = {
        "nginx": nginx_version(nginx),
        "wrk": wrk_version(wrk),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "git": _git_revision(),
    }

    procs: list[ManagedProcess] = []
    upstream, upstream_port = start_nginx(nginx, "upstream", "nginx_upstream.conf", workdir)
    procs.append(upstream)
    _log(f"upstream nginx      http://{LOOPBACK}:{upstream_port}/")
    proxy, proxy_port = start_nginx(
        nginx, BASELINE, "nginx_proxy.conf", workdir, upstream_port=upstream_port
    )
    procs.append(proxy)
    _log(f"{BASELINE:<19} http://{LOOPBACK}:{proxy_port}/")

    if args.skip_octopus:
        candidate = NGINX_TWIN
        twin, candidate_port = start_nginx(
            nginx, NGINX_TWIN, "nginx_proxy.conf", workdir, upstream_port=upstream_port
        )
        procs.append(twin)
    else:
        candidate = OCTOPUS
        _log("starting octopus (up to 20 s) ...")
        octopus, candidate_port = start_octopus(workdir, upstream_port, server=args.server)
        procs.append(octopus)
    _log(f"{candidate:<19} http://{LOOPBACK}:{candidate_port}/")

    targets = {
        UPSTREAM: TargetRuns(UPSTREAM, upstream_port),
        BASELINE: TargetRuns(BASELINE, proxy_port),
        candidate: TargetRuns(candidate, candidate_port),
    }

    def measure(target: TargetRuns, duration_s: int, record: bool) -> WrkResult:
        result, raw = run_wrk(
            wrk,
            f"http://{LOOPBACK}:{target.port}/",
            threads=args.threads,
            connections=args.connections,
            duration_s=duration_s,
            latency=record,
        )
        _check_alive(procs)
        if record:
            target.runs.append(result)
            target.raw.append(raw)
        return result

    for target in targets.values():
        _log(f"warm-up {target.name} ({args.warmup}s)")
        measure(target, args.warmup, record=False)

    _log(f"measuring {UPSTREAM} ({args.duration}s, reference)")
    _log(f"  {_one_line(measure(targets[UPSTREAM], args.duration, record=True))}")
    for round_no in range(1, args.rounds + 1):
        for name in (BASELINE, candidate):
            _log(f"round {round_no}/{args.rounds}: {name} ({args.duration}s)")
            _log(f"  {_one_line(measure(targets[name], args.duration, record=True))}")
    return targets, candidate, environment


def _one_line(result: WrkResult) -> str:
    p99 = f"{result.p99_ms:.2f}" if result.p99_ms is not None else "-"
    return f"{result.requests_per_sec:,.0f} req/s, p99 {p99} ms, errors {result.errors}"


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ratio(targets: dict[str, TargetRuns], candidate: str) -> float:
    """Candidate's mean req/s over the nginx proxy's: the headline number."""
    baseline = targets[BASELINE].mean_rps
    return targets[candidate].mean_rps / baseline if baseline > 0 else float("nan")


def render_report(targets: dict[str, TargetRuns], candidate: str) -> str:
    """The markdown table, ratio line, per-round figures and any error warnings."""
    lines = [
        "| target | req/s (mean over rounds) | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|",
    ]
    for target in targets.values():
        label = f"{target.name} (reference)" if target.name == UPSTREAM else target.name
        errors = str(target.errors)
        if breakdown := target.error_breakdown():
            errors += " (" + ", ".join(f"{k} {v}" for k, v in breakdown.items()) + ")"
        lines.append(
            f"| {label} | {target.mean_rps:,.0f} | {_fmt_ms(target.mean_ms('p50_ms'))} "
            f"| {_fmt_ms(target.mean_ms('p99_ms'))} | {errors} |"
        )
    lines.append("")
    lines.append(f"ratio {candidate}/{BASELINE}: {ratio(targets, candidate):.2f}")
    per_round = "; ".join(
        f"{name} " + ", ".join(f"{r.requests_per_sec:,.0f}" for r in targets[name].runs)
        for name in (BASELINE, candidate)
    )
    lines.append(f"per-round req/s: {per_round}")
    for target in targets.values():
        if target.errors:
            lines.append(
                f"WARNING: {target.name} had {target.errors} errors; wrk counts failed "
                "responses in req/s, so its throughput figure is not a valid result."
            )
    return "\n".join(lines)


def results_document(
    args: argparse.Namespace,
    targets: dict[str, TargetRuns],
    candidate: str,
    environment: dict[str, Any],
    started: datetime,
) -> dict[str, Any]:
    """Everything needed to compare this run with a later one, raw wrk reports included."""
    return {
        "started_at": started.isoformat(timespec="seconds"),
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "threads": args.threads,
            "rounds": args.rounds,
            "server": args.server,
            "candidate": candidate,
        },
        "environment": environment,
        "ratio": {
            "numerator": candidate,
            "denominator": BASELINE,
            "value": ratio(targets, candidate),
        },
        "targets": {
            name: {
                "summary": target.summary(),
                "runs": [r.to_dict() for r in target.runs],
                "raw_wrk_output": target.raw,
            }
            for name, target in targets.items()
        },
    }


def _save(document: dict[str, Any], started: datetime, extra: Path | None) -> list[Path]:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    paths = [RESULTS_DIR / f"bench-{started.strftime('%Y%m%dT%H%M%SZ')}.json"]
    if extra is not None:
        paths.append(extra)
    text = json.dumps(document, indent=2) + "\n"
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return paths


def _raise_on_signal(signum: int, _frame: object) -> NoReturn:
    """Turn SIGTERM/SIGHUP into an exception so the ``finally`` cleanup runs."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; always stop every server it started, whatever happens."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.connections < args.threads:
        parser.error("--connections must be >= --threads (wrk requires it)")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_on_signal)

    started = datetime.now(UTC)
    workdir = Path(tempfile.mkdtemp(prefix="octopus-bench-"))
    keep_workdir = True
    try:
        targets, candidate, environment = run_benchmark(args, workdir)
        stop_all()  # free the CPU before printing; nothing below needs the servers
        print(render_report(targets, candidate), flush=True)
        document = results_document(args, targets, candidate, environment, started)
        for path in _save(document, started, args.json):
            _log(f"results written to {path}")
        keep_workdir = False
        return EXIT_TARGET_ERRORS if any(t.errors for t in targets.values()) else EXIT_OK
    except HarnessError as exc:
        _log(f"bench failed: {exc}")
        return EXIT_HARNESS_FAILED
    except KeyboardInterrupt:
        _log("interrupted")
        keep_workdir = False  # a deliberate stop, not a failure to diagnose
        return EXIT_INTERRUPTED
    finally:
        stop_all()
        if keep_workdir:
            _log(f"server configs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
