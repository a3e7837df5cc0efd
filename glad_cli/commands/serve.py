"""``glad serve``: a Triton model repository for exported bundles, optionally the running server."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("serve")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--repo", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Triton model repository to write (several bundles / runs share one; other prefixes are kept).")
@click.option("--target", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="cpu: python-backend models running ONNX Runtime (the nvidia-pytriton server); gpu: native "
                   "onnxruntime_onnx / tensorrt_plan models (a full Triton install, --server-binary).")
@click.option("--prefix", "prefixes", multiple=True, metavar="PREFIX",
              help="Model-name prefix per bundle, in order (default: from each bundle folder name).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="Images per entry-model request (more is refused whole); the network models take twice as "
                   "many per call.")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1), help="Instances per network.")
@click.option("--glad-instances", default=2, show_default=True, type=click.IntRange(1),
              help="Instances of the BLS model (concurrent server-side loops; each request is one execution, and "
                   "the instances' network calls batch together).")
@click.option("--max-image-pixels", type=click.IntRange(1), default=None,
              help="Pixel limit per image (width x height from the header, checked before decoding; default the "
                   "bundle's max_image_pixels, 100000000): a larger image gets ImageTooLargeError (400).")
@click.option("--queue-delay-us", default=500, show_default=True, type=click.IntRange(0),
              help="Dynamic batcher max_queue_delay_microseconds.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="cpu: ONNX Runtime intra-op threads per model instance; 0 = the cores the server may use "
                   "(affinity, cgroup quota) divided among the model's instances.")
@click.option("--queue-timeout-us", default=0, show_default=True, type=click.IntRange(0),
              help="Queue policy: requests still queued after this many microseconds are rejected (0: only a "
                   "request's own timeout, which clients send, applies).")
@click.option("--version", "model_version", type=click.IntRange(1), default=None,
              help="Model version to write (default: a new version beside the served one for a different "
                   "bundle, the same version for the same bundle).")
@click.option("--no-warmup", is_flag=True, help="Do not give the network models a model_warmup.")
@click.option("--inflight/--no-inflight", default=True, show_default=True,
              help="Also serve P_glad_inflight: requests join one step-level pool (in-flight batching; gRPC "
                   "streams, GladClient.stream, glad detect --server --stream).")
@click.option("--inflight-max-active", type=click.IntRange(1), default=None,
              help="Images in flight in P_glad_inflight (one UNet call per tick for all; default and at most "
                   "--max-batch).")
@click.option("--inflight-max-queue", type=click.IntRange(0), default=None,
              help="Images waiting for a slot in P_glad_inflight (default 4 x --max-batch); past it requests are "
                   "refused at once with UNAVAILABLE (back-pressure; clients retry or fail over).")
@click.option("--deploy", "deploy_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write a container build context, Kubernetes / KServe manifests and a Grafana dashboard "
                   "for the repository into this folder (needs --image). --target cpu: a Debian / Python 3.11 image "
                   "(--build-arg BASE_IMAGE, default python:3.11-slim) that drains on SIGTERM; build and run it "
                   "here with `glad container build DIR --image NAME:TAG` and `glad container run NAME:TAG`. "
                   "--target gpu: on NGC tritonserver.")
@click.option("--image", help="--deploy: the container image name with a tag (e.g. registry/glad-triton:1.0).")
@click.option("--rollout", "rollout_urls", multiple=True, metavar="HOST:HTTP_PORT",
              help="Switch running servers that read --repo to the version just written (repeat per server; "
                   "rolled one after another; triton_models.server.rollout).")
@click.option("--start", is_flag=True, help="Then run tritonserver on the repository until Ctrl-C / SIGTERM "
              "(which drains: new images are refused so clients fail over, those in flight finish).")
@click.option("--host", default="127.0.0.1", show_default=True, help="--start: listen address.")
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="--start: 0 = a free port.")
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(0, 65535),
              help="--start: 0 = a free port.")
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(0, 65535),
              help="--start: 0 = a free port.")
@click.option("--server-binary", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="--start: tritonserver of a full install (default: the one in nvidia-pytriton, CPU).")
@click.option("--model-control", type=click.Choice(["explicit", "none", "poll"]), default="explicit",
              show_default=True, help="--start: Triton's model control mode (explicit: every model loaded at "
              "start; load / unload / rollouts through the API; drain on stop).")
@click.option("--drain-grace", default=30.0, show_default=True, type=click.FloatRange(0),
              help="--start: seconds in-flight images get to finish on SIGTERM / Ctrl-C.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path),
              help="--start: server log (default <repo parent>/tritonserver-<grpc port>.log; an older one is "
                   "kept as .1).")
@click.option("--server-arg", "server_args", multiple=True, metavar="FLAG",
              help="One more tritonserver flag (repeat), e.g. --server-arg=--log-verbose=1: passed to the server of "
                   "--start and written into --deploy's image CMD and manifests (ports, exit timeout and "
                   "--allow-http are the generator's own).")
def serve_cmd(bundles, repo: Path, target: str, prefixes, max_batch: int, instances: int, glad_instances: int,
              max_image_pixels, queue_delay_us: int, precision: str, threads: int, queue_timeout_us: int, model_version,
              no_warmup: bool, inflight: bool, inflight_max_active, inflight_max_queue, deploy_dir, image, rollout_urls, start: bool, host: str, http_port: int, grpc_port: int,
              metrics_port: int, server_binary, model_control: str, drain_grace: float, log_path,
              server_args) -> None:
    """Write a Triton model repository for exported BUNDLES (`glad export`) and optionally start the server.

    \b
    Per bundle, under a prefix P:
      P_unet, P_vae_encoder, P_vae_decoder, P_dino[, P_dino_ads]   one model per network
      P_ads_check        the fused ADS check (ADS on, when exported): one distance map per check
      P_glad             BLS model: the whole ADS/SAFF loop, one request per batch (glad_runtime.serving.client)
      P_glad_inflight    the same contract, decoupled: requests join one in-flight pool at the next DDIM step
    Clients: `glad detect BUNDLE --server HOST:GRPC_PORT` (loop here, networks there) or
    glad_runtime.serving.client.GladClient(URL, P) (loop on the server).

    \b
    Versions: serving another bundle under a served prefix writes version N+1
    beside N; --rollout HOST:HTTP_PORT then switches running servers (explicit
    model control, the --start default) to it with no refused request:
      glad serve v2_bundle --repo models --prefix line --rollout localhost:8000
    Busy ports are refused before anything starts (the holder is named).
    """
    import signal

    from glad_runtime.core.bundle import Bundle
    from glad_runtime.engines.triton import default_model_prefix
    from triton_models.repository import generate_repository

    if deploy_dir is not None and not image:
        raise click.BadParameter("--deploy needs --image NAME:TAG", param_hint="--image")
    if prefixes and len(prefixes) != len(bundles):
        raise click.BadParameter(f"{len(prefixes)} prefixes for {len(bundles)} bundles", param_hint="--prefix")
    names = list(prefixes) or [default_model_prefix(b) for b in bundles]
    if len(set(names)) != len(names):
        raise click.BadParameter(f"two bundles get the same prefix {names}; pass --prefix per bundle",
                                 param_hint="--prefix")
    options = dict(target=target, max_batch=max_batch, instances=instances, glad_instances=glad_instances,
                   queue_delay_us=queue_delay_us, precision=precision, intra_op_threads=threads,
                   queue_timeout_us=queue_timeout_us, warmup=not no_warmup, inflight=inflight,
                   inflight_max_active=inflight_max_active, inflight_max_queue=inflight_max_queue,
                   max_image_pixels=max_image_pixels)
    if rollout_urls:
        from triton_models.server import rollout

        for bpath, prefix in zip(bundles, names):
            v = rollout(list(rollout_urls), repo, Bundle(bpath), prefix=prefix, **options)
            click.echo(f"{bpath}: prefix {prefix} now serves version {v} on {', '.join(rollout_urls)}")
        return
    for bpath, prefix in zip(bundles, names):
        b = Bundle(bpath)
        models = generate_repository(b, repo, prefix=prefix, version=model_version, **options)
        from triton_models.repository import served_versions

        version = max(v for v, c in served_versions(repo, f"{prefix}_glad").items() if c == b.checksum())
        click.echo(f"{bpath}: prefix {prefix}, version {version}, checksum {b.checksum()}, "
                   f"models {', '.join(models)}")
    click.echo(f"repository: {repo}")
    if deploy_dir is not None:
        from triton_models.deploy import write_deploy

        files = write_deploy(repo, deploy_dir, image=image, prefixes=names, target=target,
                             server_args=tuple(server_args))
        click.echo(f"deploy recipes: {deploy_dir} ({len(files)} entries; see {deploy_dir / 'README.md'})")
    if not start:
        return
    from triton_models.server import launch_server

    click.echo("starting tritonserver ...", err=True)
    server = launch_server(repo, binary=server_binary, host=host, http_port=http_port, grpc_port=grpc_port,
                           metrics_port=metrics_port, model_control=model_control, log_path=log_path,
                           extra_args=tuple(server_args))  # PortInUseError / ServerStartError: exit 1

    import threading

    stop = threading.Event()  # set by SIGTERM / Ctrl-C: no exception can land between start-up and the wait loop
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    click.echo(f"ready: grpc {server.grpc_url}  http http://{server.http_url}  metrics {server.metrics_url}  "
               f"(log {server.log_path}); Ctrl-C stops")
    try:
        while server.running() and not stop.is_set():
            stop.wait(0.5)
        if not stop.is_set():
            click.echo(f"tritonserver exited with code {server.process.returncode}:\n{server.log_tail(2000)}",
                       err=True)
            sys.exit(1)
        click.echo(f"draining (up to {drain_grace:g} s) and stopping tritonserver ...", err=True)
    finally:
        code = server.stop(grace=max(drain_grace, 5.0))
    click.echo(f"stopped (exit code {code})")
