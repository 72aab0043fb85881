"""The benchmark's wrk parser, checked against real wrk 4.1.0 reports.

The reports below were captured from wrk runs against local nginx instances, unedited, because
the parser's only job is to read exactly what wrk prints; a hand-written sample would test our
idea of the format rather than the format.
"""

from __future__ import annotations

import re

import pytest

from loadtests.wrk import WrkParseError, parse_wrk_output

# wrk -t1 -c64 -d3s --latency, through an nginx reverse proxy to the 100-byte nginx upstream.
HEALTHY = """\
Running 3s test @ http://127.0.0.1:59357/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.12ms  317.23us   5.66ms   86.44%
    Req/Sec    56.28k     7.98k   66.36k    66.67%
  Latency Distribution
     50%    1.09ms
     75%    1.16ms
     90%    1.33ms
     99%    2.35ms
  167641 requests in 3.00s, 39.81MB read
Requests/sec:  55859.11
Transfer/sec:     13.26MB
"""

# Same proxy after its upstream was stopped: every response is nginx's 502.
ALL_502 = """\
Running 3s test @ http://127.0.0.1:59357/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.93ms    1.10ms  14.59ms   95.00%
    Req/Sec    35.20k     3.89k   39.67k    83.33%
  Latency Distribution
     50%    1.72ms
     75%    1.88ms
     90%    2.18ms
     99%    8.54ms
  104988 requests in 3.00s, 31.44MB read
  Non-2xx or 3xx responses: 104988
Requests/sec:  34972.37
Transfer/sec:     10.47MB
"""

# nginx `return 444` (close without answering): no responses, only socket read errors.
CONNECTIONS_DROPPED = """\
Running 2s test @ http://127.0.0.1:38444/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 2.00s, 0.00B read
  Socket errors: connect 0, read 42682, write 0, timeout 0
Requests/sec:      0.00
Transfer/sec:       0.00B
"""

# The direct-upstream run, whose p50 is in microseconds and p99 in milliseconds.
MIXED_UNITS = """\
Running 3s test @ http://127.0.0.1:49845/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   411.23us  215.33us   4.32ms   70.82%
    Req/Sec   124.93k    24.29k  161.83k    60.00%
  Latency Distribution
     50%  394.00us
     75%  506.00us
     90%  672.00us
     99%    0.86ms
  372175 requests in 3.00s, 88.38MB read
Requests/sec: 123980.02
Transfer/sec:     29.44MB
"""


def test_healthy_run() -> None:
    result = parse_wrk_output(HEALTHY)
    assert result.requests_per_sec == pytest.approx(55859.11)
    assert result.requests == 167641
    assert result.duration_s == pytest.approx(3.0)
    assert result.p50_ms == pytest.approx(1.09)
    assert result.p99_ms == pytest.approx(2.35)
    assert result.errors == 0


def test_non_2xx_responses_are_errors() -> None:
    """wrk still counts these in Requests/sec, which is why the harness must surface them."""
    result = parse_wrk_output(ALL_502)
    assert result.non_2xx_3xx == 104988
    assert result.errors == 104988
    assert result.requests_per_sec == pytest.approx(34972.37)
    assert result.p99_ms == pytest.approx(8.54)


def test_socket_errors_are_errors() -> None:
    result = parse_wrk_output(CONNECTIONS_DROPPED)
    assert result.socket_errors == {"connect": 0, "read": 42682, "write": 0, "timeout": 0}
    assert result.non_2xx_3xx == 0
    assert result.errors == 42682
    assert result.requests == 0
    assert result.requests_per_sec == 0.0


def test_latency_units_are_converted_to_ms() -> None:
    result = parse_wrk_output(MIXED_UNITS)
    assert result.p50_ms == pytest.approx(0.394)
    assert result.p99_ms == pytest.approx(0.86)
    seconds = MIXED_UNITS.replace("99%    0.86ms", "99%    1.50s")
    assert parse_wrk_output(seconds).p99_ms == pytest.approx(1500.0)


def test_without_latency_flag_percentiles_are_none() -> None:
    """Warm-up runs omit --latency; wrk then prints no distribution block at all."""
    text = "\n".join(
        line
        for line in HEALTHY.splitlines()
        if "Latency Distribution" not in line and not re.match(r"\s+\d+%", line)
    )
    result = parse_wrk_output(text)
    assert result.p50_ms is None
    assert result.p99_ms is None
    assert result.requests_per_sec == pytest.approx(55859.11)


def test_rejects_text_that_is_not_a_wrk_report() -> None:
    with pytest.raises(WrkParseError):
        parse_wrk_output("unable to connect to 127.0.0.1:54271 Connection refused\n")
