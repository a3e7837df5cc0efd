"""The ``glad`` command: the click group and its error handler; each verb lives in ``glad_cli/commands/<verb>.py``
(data, train, eval, demo, init, presets, export, build, bench, serve, detect, calibrate, perf), shared options in
:mod:`glad_cli.options`.

Heavy imports (torch, diffusers, timm) happen inside the subcommands that need them, so ``glad --help`` is fast.
"""

from __future__ import annotations

import click

from glad_cli.commands import (bench, build, calibrate, container, data, demo, detect, eval as eval_, export,
                               init, perf, presets, serve, train)
from glad_cli.options import error_line, exit_code, missing_extra_line
from glad_runtime.errors import GladError


class GladGroup(click.Group):
    """A click group whose commands report any :class:`~glad_runtime.errors.GladError` as one line.

    The error becomes ``error: <message>`` on stderr (a multi-line message joined with `` | ``), never a
    traceback, and the exit code is 2 for a :class:`~glad_runtime.errors.UsageError` (and its subclasses, e.g.
    ``ConfigError``), 1 for any other GladError. Errors raised while a subcommand's arguments are parsed (``--set``)
    are covered too; click's own usage errors keep click's message and exit code 2. A command whose optional
    dependency is not installed (e.g. scipy in a client-only install) is refused the same way, naming the extra to
    install (:func:`glad_cli.options.missing_extra_line`), exit code 2.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GladError as e:
            click.echo(f"error: {error_line(e)}", err=True)
            ctx.exit(exit_code(e))
        except ModuleNotFoundError as e:  # a module missing, not a name missing from an installed one
            line = missing_extra_line(e, ctx.invoked_subcommand)
            if line is None:
                raise
            click.echo(f"error: {line}", err=True)
            ctx.exit(2)


@click.group(cls=GladGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="glad-toolkit")
def cli() -> None:
    """GLAD deployment toolkit: diffusion-based industrial anomaly detection from training to serving.

    \b
    Typical flow:
      glad data elpv --type mono data/elpv_mono      # a real MVTec-format category
      glad train --preset tiny data/elpv_mono runs/elpv_mono
      glad eval runs/elpv_mono data/elpv_mono --baseline knn
      glad detect runs/elpv_mono images/*.png --out results/

    Every command takes a model bundle folder (config, weights, manifest); nothing depends on the working
    directory.
    """


# registered in the order of the former single-module CLI (`glad --help` lists them sorted)
for _command in (presets.presets_cmd, init.init_cmd, export.export_cmd, build.build_cmd, bench.bench_cmd,
                 serve.serve_cmd, detect.detect_cmd, calibrate.calibrate_cmd, data.data_grp, train.train_cmd,
                 eval_.eval_cmd, demo.demo_cmd, perf.perf_cmd, container.container_grp):
    cli.add_command(_command)
del _command


def main() -> None:  # pragma: no cover
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
