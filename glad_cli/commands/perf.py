"""``glad perf``: benchmark a running GLAD endpoint as perf_analyzer would, with the server's own breakdown
(issue 28). The engine lives in ``bench/perf`` (``load``: one point; ``run``: many points, reports, the tool's
overhead, perf_analyzer input; ``sweep``: the configuration search)."""

from __future__ import annotations

import datetime
import re
import signal
import sys
import threading
from pathlib import Path

import click

from glad_runtime.errors import ServerUnavailableError, UsageError

_URL_LIKE = re.compile(r"^(?:[a-z]+://)?[\w.\-\[\]]+:\d+(?:/.*)?$", re.I)


def _split_target(spec: str, url: str | None) -> tuple[str, str | None]:
    """``--compare`` value -> ``(url, model or None)``: ``HOST:PORT`` / ``http://HOST:PORT`` (same model),
    ``HOST:PORT/MODEL`` (another model there) or ``MODEL`` (another model on the same server)."""
    if _URL_LIKE.match(spec):
        scheme = ""
        rest = spec
        if "://" in spec:
            scheme, rest = spec.split("://", 1)
            scheme += "://"
        host, _, model = rest.partition("/")
        return scheme + host, model or None
    if url is None:
        raise UsageError(f"--compare {spec}: a model name needs the URL argument")
    return url, spec


@click.command("perf")
@click.argument("url", required=False)
@click.option("-m", "--model", help="The entry model: P_glad (per batch: gRPC or HTTP) or P_glad_inflight (in "
              "flight: gRPC streams). Default: the one *_glad model the server serves.")
@click.option("-i", "--protocol", "transport", type=click.Choice(["grpc", "http"]), default=None,
              help="KServe v2 over gRPC (default; port 8001) or HTTP (port 8000, binary tensors). A URL with "
                   "http:// or grpc:// says it too.")
@click.option("--concurrency", "concurrency", metavar="RANGE", default=None,
              help="Closed loop: this many requests outstanding, each sent when the last came back. "
                   "start:end:step as perf_analyzer (1:16:2 = 1,3,...,15) or a list (1,2,4,8). Default 1,2,4,8.")
@click.option("--request-rate", "request_rate", metavar="RANGE", default=None,
              help="Open loop instead: requests per second, sent on schedule whatever is outstanding; latency "
                   "counts from the scheduled time. E.g. 0.5:4:0.5.")
@click.option("--arrivals", type=click.Choice(["poisson", "constant"]), default="poisson", show_default=True,
              help="--request-rate: Poisson arrivals (exponential gaps) or one every 1/rate s.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the Poisson schedule.")
@click.option("--max-threads", default=16, show_default=True, type=click.IntRange(1),
              help="--request-rate: sending threads, the most requests outstanding (perf_analyzer's --max-threads).")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1),
              help="Images per request (image_files [B, 1]); at most the model's max_images.")
@click.option("--map-size", type=click.Choice(["working", "original"]), default="working", show_default=True,
              help="The map_size request parameter: maps at the working size (D x D) or each image's size.")
@click.option("--timeout-s", default=60.0, show_default=True, type=click.FloatRange(0.001),
              help="Each request's deadline in seconds (sent as Triton's request timeout and used client-side).")
@click.option("--images", "image_paths", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Image files or folders to send as they are (repeatable). Default: ELPV cells from the "
                   "elpv-dataset package, normal and defective alternating, written as PNG into OUT/images.")
@click.option("--num-images", default=16, show_default=True, type=click.IntRange(1),
              help="How many default ELPV cells.")
@click.option("--measurement-interval-ms", default=5000, show_default=True, type=click.IntRange(100),
              help="Window length (perf_analyzer's --measurement-interval).")
@click.option("--stability-percentage", default=10.0, show_default=True, type=click.FloatRange(0),
              help="A point is stable when 3 consecutive windows agree within this on throughput and p99.")
@click.option("--max-trials", default=10, show_default=True, type=click.IntRange(3),
              help="Windows at most per point; an unstable point reports its last 3 and says so.")
@click.option("--request-count", default=0, show_default=True, type=click.IntRange(0),
              help="Instead of windows: exactly this many requests per point (the counts then reconcile with "
                   "the server's statistics for the reported window itself).")
@click.option("--warmup-requests", default=None, type=click.IntRange(0),
              help="Requests sent before each point, not counted (default: the concurrency; 2 for a rate).")
@click.option("--metrics-url", default="auto", show_default=True,
              help="Triton's Prometheus endpoint for the GLAD counters; auto: http://HOST:8002/metrics; none: skip.")
@click.option("--outputs", "outputs", default="all", show_default=True,
              help="Outputs to request: all (what a line receives, maps included) or a comma list (scores, "
                   "adaptive_steps and errors are always asked for).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default runs/perf/<date-time>).")
@click.option("--overhead/--no-overhead", default=True, show_default=True,
              help="Also run the same loads against a no-op python-backend model on a local tritonserver "
                   "(nvidia-pytriton): the requests/s and latency this tool reaches by itself here.")
@click.option("--verify-bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Compare the served scores with this bundle run in process (ONNX Runtime).")
@click.option("--compare", "compare_spec", default=None, metavar="TARGET",
              help="A second target measured interleaved with the first (A B, B A, ...), with ratios: MODEL (on "
                   "the same server), HOST:PORT (the same model elsewhere) or HOST:PORT/MODEL.")
@click.option("--write-perf-analyzer-input", "pa_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Write perf_analyzer's --input-data JSON (the same images, base64 BYTES, shapes) "
              "and its command line into this folder, then stop.")
@click.option("--sweep", "sweep_bundle", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Instead of URL: search configurations of this exported bundle, a local server "
              "per configuration (--sweep-set), and name the best under --p99-ms as a glad serve command.")
@click.option("--sweep-set", "sweep_sets", multiple=True, metavar="KEY=V1,V2",
              help="--sweep: a grid axis (repeat): glad_instances, instances, queue_delay_us, threads, "
                   "inflight_max_active, inflight_max_queue, max_batch. Default: glad_instances=1,2,3 x threads=0,1 "
                   "(or inflight_max_active=2,4,8 x threads=0,1 for --sweep-model glad_inflight).")
@click.option("--sweep-model", type=click.Choice(["glad", "glad_inflight"]), default="glad", show_default=True,
              help="--sweep: the entry model measured.")
@click.option("--p99-ms", type=click.FloatRange(0, min_open=True), default=None,
              help="--sweep: the p99 latency budget in milliseconds.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def perf_cmd(url, model, transport, concurrency, request_rate, arrivals, seed, max_threads, batch_size, map_size,
             timeout_s, image_paths, num_images, measurement_interval_ms, stability_percentage, max_trials,
             request_count, warmup_requests, metrics_url, outputs, out_dir, overhead, verify_bundle, compare_spec,
             pa_dir, sweep_bundle, sweep_sets, sweep_model, p99_ms, quiet) -> None:
    """Benchmark a running GLAD server (HTTP or gRPC, KServe v2) with real encoded images, as perf_analyzer.

    \b
    Per load point: throughput, avg/p50/p90/p95/p99/max latency, errors and
    rejections by type, the adaptive-step distribution; from the server
    (Triton's statistics extension and /metrics, as deltas over the window):
    queue and compute input/infer/output of the entry model and each network
    model, requests and executions (the achieved batch size), GLAD counters.
    The tool's request and image counts are checked against the server's.
    Writes perf.json, perf.csv (perf_analyzer's columns), perf.md, perf.svg
    and perf.png. Ctrl-C stops cleanly and keeps what was measured.

    \b
    Examples:
      glad perf localhost:8001                                   # P_glad, concurrency 1,2,4,8
      glad perf localhost:8001 -m P_glad_inflight --concurrency 1:16:2
      glad perf http://localhost:8000 -m P_glad --batch-size 4 --request-rate 0.5:4:0.5
      glad perf localhost:8001 -m P_glad --compare P_glad_inflight --request-count 64
      glad perf --sweep BUNDLE --p99-ms 2000 --sweep-set glad_instances=1,2 --sweep-set threads=0,1
      glad perf localhost:8001 -m P_glad --write-perf-analyzer-input pa/   # then: sh pa/perf_analyzer.sh

    \b
    Client and server sharing one machine share its cores: the no-op
    overhead check (on by default) says what the client alone can drive.
    """
    from bench.perf import load as L
    from bench.perf import rules
    from bench.perf.run import run_points, write_perf_analyzer_input, write_reports

    if concurrency and request_rate:
        raise click.BadParameter("give --concurrency or --request-rate, not both", param_hint="--request-rate")
    mode = "request_rate" if request_rate else "concurrency"
    loads = rules.parse_range(request_rate, integer=False, what="--request-rate") if request_rate else \
        rules.parse_range(concurrency or "1,2,4,8", integer=True, what="--concurrency")
    settings = L.Settings(interval_s=measurement_interval_ms / 1000.0, tolerance=stability_percentage / 100.0,
                          max_trials=max_trials, request_count=request_count, warmup_requests=warmup_requests,
                          timeout_s=timeout_s, map_size=map_size, max_threads=max_threads, distribution=arrivals,
                          seed=seed)
    out = out_dir or Path("runs") / "perf" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    paths = list(image_paths) or L.default_images(out / "images", num_images)
    payloads = L.Payloads(L.load_images(paths), batch_size)
    metrics = None if metrics_url.lower() == "none" else metrics_url
    wanted = None if outputs == "all" else [o.strip() for o in outputs.split(",") if o.strip()]

    if sweep_bundle is not None:
        if url or compare_spec or pa_dir:
            raise click.BadParameter("--sweep takes a bundle instead of URL (no --compare, no "
                                     "--write-perf-analyzer-input)", param_hint="--sweep")
        if p99_ms is None:
            raise click.BadParameter("--sweep needs the latency budget --p99-ms", param_hint="--p99-ms")
        _sweep(sweep_bundle, out, payloads, mode, loads, settings, p99_ms, sweep_model, sweep_sets, quiet)
        return
    if sweep_sets or p99_ms is not None:
        raise click.BadParameter("--sweep-set and --p99-ms go with --sweep BUNDLE", param_hint="--sweep")
    if not url:
        raise click.BadParameter("give the server's URL (HOST:PORT, http://HOST:PORT) or --sweep BUNDLE",
                                 param_hint="URL")

    if pa_dir is not None:
        try:
            t = L.connect(url, model, transport, metrics_url=None, outputs=wanted)
            name, hostport, proto, streaming = t.model, t.url, t.protocol, t.streaming
        except ServerUnavailableError:
            if not model:
                raise
            hostport, proto = L.parse_url(url, transport)
            name, streaming = model, model.endswith("_glad_inflight")
            click.echo(f"{url} does not answer here: writing for model {name} "
                       f"({'streaming' if streaming else 'unary'}) without checking it", err=True)
        info = write_perf_analyzer_input(pa_dir, payloads, model=name, url=hostport, transport=proto,
                                         streaming=streaming, mode=mode, loads=loads, settings=settings)
        click.echo(f"written: {info['input']} ({len(payloads.files)} images, batch {batch_size}), {info['script']}")
        for c in info["commands"]:
            click.echo(c)
        return

    targets = [L.connect(url, model, transport, metrics_url=metrics, outputs=wanted)]
    if compare_spec:
        curl, cmodel = _split_target(compare_spec, url)
        cmetrics = metrics if curl == url else ("auto" if metrics else None)
        targets.append(L.connect(curl, cmodel or targets[0].model, transport if curl == url else None,
                                 metrics_url=cmetrics, outputs=wanted))
        if targets[0].model == targets[1].model:
            targets[0].label = f"{targets[0].model}@{targets[0].url}"
            targets[1].label = f"{targets[1].model}@{targets[1].url}"
            if targets[0].label == targets[1].label:
                raise click.BadParameter("--compare names the same target", param_hint="--compare")
    stop, previous = _ctrl_c()
    try:
        res = run_points(targets, payloads, mode, loads, settings, stop=stop, quiet=quiet, overhead=overhead,
                         workdir=out, verify_bundle=verify_bundle)
    finally:
        _restore(previous)
    written = write_reports(res, out)
    click.echo((out / "perf.md").read_text())
    click.echo(f"written: {', '.join(str(p) for p in written.values())}")
    bad = [p for p in res["points"] if not p["reconciliation"]["match"]]
    if bad:
        click.echo(f"warning: the tool's counts differ from the server's statistics at {len(bad)} point(s) "
                   "(another client on the server? see reconciliation in perf.json)", err=True)
    if res["interrupted"]:
        click.echo("stopped by Ctrl-C: the results above are what was measured", err=True)
        sys.exit(130)


def _ctrl_c():
    """``(event, previous handler)``: a SIGINT handler whose first Ctrl-C sets the event (the run stops after the
    requests in flight), a second one raising KeyboardInterrupt. Off the main thread (no signals there) the event
    is only returned."""
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        click.echo("\nstopping: waiting for the requests in flight (Ctrl-C again to abort) ...", err=True)

    try:
        return stop, signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        return stop, None


def _restore(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous)


def _sweep(bundle, out, payloads, mode, loads, settings, p99_ms, model, sweep_sets, quiet) -> None:
    from bench.perf.load import dumps
    from bench.perf.sweep import parse_grid, run_sweep, sweep_markdown

    grid = parse_grid(sweep_sets) if sweep_sets else None
    stop, previous = _ctrl_c()
    try:
        res = run_sweep(bundle, out, payloads=payloads, mode=mode, loads=loads, settings=settings, p99_ms=p99_ms,
                        model=model, grid=grid, stop=stop, quiet=quiet)
    finally:
        _restore(previous)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(dumps(res))
    (out / "sweep.md").write_text(sweep_markdown(res) + "\n")
    click.echo(sweep_markdown(res))
    click.echo(f"written: {out / 'sweep.json'}, {out / 'sweep.md'}")
    if res["interrupted"]:
        click.echo("stopped by Ctrl-C: the configurations above are what was measured", err=True)
        sys.exit(130)
    if res["best"] is None:
        sys.exit(1)
