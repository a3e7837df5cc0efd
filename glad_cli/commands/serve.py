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
              help="Images per <prefix>_glad request; the network models take twice as many.")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1), help="Instances per network.")
@click.option("--glad-instances", default=1, show_default=True, type=click.IntRange(1),
              help="Instances of the BLS model (concurrent server-side loops).")
@click.option("--queue-delay-us", default=500, show_default=True, type=click.IntRange(0),
              help="Dynamic batcher max_queue_delay_microseconds.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--threads", default=1, show_default=True, type=click.IntRange(0),
              help="cpu: ONNX Runtime intra-op threads per model instance.")
@click.option("--start", is_flag=True, help="Then run tritonserver on the repository until Ctrl-C / SIGTERM.")
@click.option("--host", default="127.0.0.1", show_default=True, help="--start: listen address.")
@click.option("--http-port", default=8000, show_default=True, help="--start: 0 = a free port.")
@click.option("--grpc-port", default=8001, show_default=True)
@click.option("--metrics-port", default=8002, show_default=True)
@click.option("--server-binary", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="--start: tritonserver of a full install (default: the one in nvidia-pytriton, CPU).")
def serve_cmd(bundles, repo: Path, target: str, prefixes, max_batch: int, instances: int, glad_instances: int,
              queue_delay_us: int, precision: str, threads: int, start: bool, host: str, http_port: int,
              grpc_port: int, metrics_port: int, server_binary) -> None:
    """Write a Triton model repository for exported BUNDLES (`glad export`) and optionally start the server.

    \b
    Per bundle, under a prefix P:
      P_unet, P_vae_encoder, P_vae_decoder, P_dino[, P_dino_ads]   one model per network
      P_ads_check        the fused ADS check (ADS on, when exported): one distance map per check
      P_recon_features   ensemble: latents -> decoder -> resize -> dino (reconstruction + its tokens)
      P_resize           the ensemble's resize step (only when resolution != dino_resolution)
      P_glad             BLS model: the whole ADS/SAFF loop, one request per batch (glad_runtime.serving.client)
    Clients: `glad detect BUNDLE --server HOST:GRPC_PORT` (loop here, networks there) or
    glad_runtime.serving.client.GladClient(URL, P) (loop on the server).
    """
    import signal

    from glad_runtime.core.bundle import Bundle
    from glad_runtime.engines.triton import default_model_prefix
    from glad_runtime.errors import GladError
    from triton_models.repository import generate_repository

    if prefixes and len(prefixes) != len(bundles):
        raise click.BadParameter(f"{len(prefixes)} prefixes for {len(bundles)} bundles", param_hint="--prefix")
    names = list(prefixes) or [default_model_prefix(b) for b in bundles]
    if len(set(names)) != len(names):
        raise click.BadParameter(f"two bundles get the same prefix {names}; pass --prefix per bundle",
                                 param_hint="--prefix")
    for bpath, prefix in zip(bundles, names):
        b = Bundle(bpath)
        try:
            models = generate_repository(b, repo, target=target, prefix=prefix, max_batch=max_batch,
                                         instances=instances, glad_instances=glad_instances,
                                         queue_delay_us=queue_delay_us, precision=precision,
                                         intra_op_threads=threads)
        except ValueError as e:
            if isinstance(e, GladError):
                raise
            raise GladError(str(e)) from e  # a setting the repository refuses (exit 1, as before)
        click.echo(f"{bpath}: prefix {prefix}, checksum {b.checksum()}, models {', '.join(models)}")
    click.echo(f"repository: {repo}")
    if not start:
        return
    from triton_models.server import launch_server

    click.echo("starting tritonserver ...", err=True)
    server = launch_server(repo, binary=server_binary, host=host, http_port=http_port, grpc_port=grpc_port,
                           metrics_port=metrics_port)  # ServerStartError: exit 1

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
        click.echo("stopping tritonserver ...", err=True)
    finally:
        code = server.stop()
    click.echo(f"stopped (exit code {code})")
