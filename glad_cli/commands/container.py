"""``glad container``: build and run the CPU container image of a bundle on this host with podman (issue 34).

The recipe is the one ``glad serve BUNDLE --target cpu --deploy DIR --image NAME:TAG`` writes; the podman side is
:mod:`triton_models.podman` (Debian base, build, run on loopback, stop).
"""

from __future__ import annotations

from pathlib import Path

import click

from glad_cli.options import bundle_argument


@click.group("container")
def container_grp() -> None:
    """Build and run the CPU serving image here with podman (runc; Debian: apt-get install podman runc
    mmdebstrap). Containers publish their ports on 127.0.0.1 only.

    \b
    glad container base                        the Debian 12 / Python 3.11 base (no registry needed)
    glad container build DIR --image NAME:TAG  build the recipe `glad serve ... --deploy DIR` wrote
    glad container run NAME:TAG                start it (127.0.0.1 ports), wait until ready
    glad container up BUNDLE                   a local trial: repository, recipe, image, container
    podman stop -t 70 NAME                     drains, then stops (exit code 0); the default 10 s cuts
                                               the drain short (at least 2 x --exit-timeout-secs + 5)
    """


@container_grp.command("base")
@click.option("--force", is_flag=True, help="Make it again when it exists.")
def base_cmd(force: bool) -> None:
    """Make the Debian 12 / Python 3.11 base image from Debian's packages (mmdebstrap + podman import): the
    stand-in for python:3.11-slim where no registry is reachable."""
    from triton_models import podman as pm

    _require_runtime(pm)
    made = pm.make_base(force=force)
    click.echo(f"{pm.DEBIAN_BASE}: " + (f"made in {made:.0f} s, {pm.image_size(pm.DEBIAN_BASE) / 2**20:.0f} MiB"
                                       if made else "present (--force to make it again)"))


@container_grp.command("build")
@click.argument("recipe", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--image", required=True, help="Image name:tag.")
@click.option("--base", "base_image", default=None,
              help="BASE_IMAGE build argument (default: the local Debian base, made if missing).")
def build_cmd(recipe: Path, image: str, base_image: str | None) -> None:
    """Build RECIPE, the folder `glad serve BUNDLE --repo R --target cpu --deploy RECIPE --image NAME:TAG` wrote
    (podman build --format docker, so the HEALTHCHECK is kept; pip's CA bundle as the pip_ca build secret)."""
    from triton_models import podman as pm

    _build(pm, recipe, image, base_image)


@container_grp.command("run")
@click.argument("image")
@click.option("--name", default="glad-triton-cpu", show_default=True, help="Container name (replaced if it exists).")
@click.option("--ports", default="8000,8001,8002", show_default=True, help="Host HTTP,gRPC,metrics ports.")
@click.option("--cpus", type=click.FloatRange(min=0.01), default=None,
              help="CPU quota (--cpus): the served ONNX Runtime sessions size their threads from it.")
@click.option("--read-only", is_flag=True, help="Read-only root file system (/dev/shm and a /tmp tmpfs writable).")
def run_cmd(image: str, name: str, ports: str, cpus: float | None, read_only: bool) -> None:
    """Start IMAGE (built by `glad container build` or `up`) with its ports on 127.0.0.1 and wait until ready."""
    from triton_models import podman as pm

    _run(pm, image, name, ports, cpus, read_only)


@container_grp.command("up")
@bundle_argument()
@click.option("--image", default="localhost/glad-triton-cpu:dev", show_default=True, help="Image name:tag.")
@click.option("--name", default="glad-triton-cpu", show_default=True, help="Container name (replaced if it exists).")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("container-build"),
              show_default=True, help="Folder for the model repository and the recipe (the build context).")
@click.option("--base", "base_image", default=None,
              help="BASE_IMAGE build argument (default: the local Debian base, made if missing).")
@click.option("--ports", default="8000,8001,8002", show_default=True, help="Host HTTP,gRPC,metrics ports.")
@click.option("--cpus", type=click.FloatRange(min=0.01), default=None,
              help="CPU quota (--cpus): the served ONNX Runtime sessions size their threads from it.")
@click.option("--read-only", is_flag=True, help="Read-only root file system (/dev/shm and /tmp stay writable).")
def up_cmd(bundle: Path, image: str, name: str, work: Path, base_image: str | None, ports: str,
           cpus: float | None, read_only: bool) -> None:
    """A local trial: serve BUNDLE (exported with `glad export`) in a container. Writes its own model repository
    and CPU recipe under --work with `glad serve`'s defaults (prefix from the bundle folder's name; --work is
    reused: another bundle there is served too), builds the image, starts it and waits until it is ready. For the
    recipe of `glad serve ... --deploy DIR` with your settings, use `glad container build DIR` and `run`."""
    from glad_runtime.core.bundle import Bundle
    from triton_models import podman as pm
    from triton_models.deploy import write_deploy
    from triton_models.repository import generate_repository

    _ports(ports)
    repo, recipe = work / "model_repository", work / "deploy"
    generate_repository(Bundle(bundle), repo, target="cpu")
    write_deploy(repo, recipe, image=image, target="cpu")
    _build(pm, recipe, image, base_image)
    _run(pm, image, name, ports, cpus, read_only)


def _ports(ports: str) -> tuple[int, int, int]:
    from glad_runtime.errors import UsageError

    try:
        http, grpc, metrics = (int(p) for p in ports.split(","))
    except ValueError:
        raise UsageError(f"--ports must be three numbers HTTP,GRPC,METRICS; got {ports!r}") from None
    return http, grpc, metrics


def _build(pm, recipe: Path, image: str, base_image: str | None) -> None:
    _require_runtime(pm, need_base_tools=base_image is None)
    if base_image is None:
        made = pm.make_base()
        click.echo(f"base {pm.DEBIAN_BASE}: " + (f"made in {made:.0f} s" if made else "present"))
    click.echo(f"image {image}: building from {recipe} ...")
    seconds = pm.build_image(recipe, image, base=base_image or pm.DEBIAN_BASE, quiet=False)
    click.echo(f"built in {seconds:.0f} s, {pm.image_size(image) / 2**20:.0f} MiB")


def _run(pm, image: str, name: str, ports: str, cpus: float | None, read_only: bool) -> None:
    http, grpc, metrics = _ports(ports)
    _require_runtime(pm, need_base_tools=False)
    c = pm.run_container(image, name, http_port=http, grpc_port=grpc, metrics_port=metrics, cpus=cpus,
                         read_only=read_only)
    click.echo(f"container {c.name}: ready in {c.wait_ready(300):.1f} s; HTTP {c.http_url}, gRPC {c.grpc_url}, "
               f"metrics 127.0.0.1:{metrics}; stop (drains first) with: podman stop -t 70 {c.name}")


def _require_runtime(pm, need_base_tools: bool = True) -> None:
    problem = pm.runtime_problem(need_base_tools)
    if problem:
        from glad_runtime.errors import ContainerError

        raise ContainerError(problem)
