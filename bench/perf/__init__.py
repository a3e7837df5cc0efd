"""``glad perf``: benchmark a running GLAD endpoint the way Triton users do (issue 28).

* :mod:`bench.perf.rules`: the pure rules (ranges, arrival schedules, latency summaries, perf_analyzer's stability
  rule, statistics and metrics deltas, CSV columns);
* :mod:`bench.perf.load`: load generation and the measurement of one point against a server (closed and open
  loop, unary gRPC / HTTP and gRPC streams, the server's statistics as deltas, the count reconciliation);
* :mod:`bench.perf.run`: runs of many points (sweeps over a load range, ``--compare`` of two targets interleaved,
  the tool's own overhead on a no-op model), the reports (CSV, JSON, Markdown, plot) and the perf_analyzer input;
* :mod:`bench.perf.sweep`: ``glad perf --sweep``, the Model Analyzer job on a bundle (a local server per
  configuration, the best one under a p99 budget as a ``glad serve`` command line, re-measured).

The CLI is ``glad_cli/commands/perf.py``; ``bench.inflight_load`` is a use of :func:`bench.perf.run.run_points`.
"""
