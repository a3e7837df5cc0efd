"""``glad data``: prepare MVTec-format categories from real images."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("data")
def data_grp() -> None:
    """Prepare MVTec-format categories from real images (nothing is downloaded at run time)."""


@data_grp.command("elpv")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--type", "cell_type", type=click.Choice(["mono", "poly"]), default="mono", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Split seed.")
@click.option("--train", "n_train", default=300, show_default=True, help="Normal cells in train/good.")
@click.option("--test-good", default=100, show_default=True, help="Held-out normal cells in test/good.")
@click.option("--test-defect", default=100, show_default=True, help="Defective cells (p=1) in test/defect.")
@click.option("--test-fold", default=0, show_default=True,
              help="Which block of held-out cells is the test split (same train/good for every fold; mono has 0-1): "
                   "a second, disjoint test set for a detector already trained.")
@click.option("--overwrite", is_flag=True)
def data_elpv(out: Path, cell_type: str, seed: int, n_train: int, test_good: int, test_defect: int,
              test_fold: int, overwrite: bool) -> None:
    """ELPV solar cells (elpv-dataset package): normal = defect probability 0, defective = 1 (image labels only)."""
    from training.data import prepare_elpv

    info = prepare_elpv(out, cell_type=cell_type, seed=seed, n_train=n_train, n_test_good=test_good,
                        n_test_defect=test_defect, overwrite=overwrite, test_fold=test_fold)
    click.echo(json.dumps(info["counts"]))


@data_grp.command("textures")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--category", "categories", multiple=True, default=("brick", "grass", "gravel"), show_default=True)
@click.option("--size", default=256, show_default=True, help="Image size in pixels.")
@click.option("--seed", default=0, show_default=True)
@click.option("--overwrite", is_flag=True)
def data_textures(out: Path, categories: tuple[str, ...], size: int, seed: int, overwrite: bool) -> None:
    """Real scikit-image textures with synthetic test defects and exact masks (sources distinct from training)."""
    from training.data import prepare_textures

    made = prepare_textures(out, categories=categories, seed=seed, size=size, overwrite=overwrite)
    click.echo(json.dumps({k: str(v) for k, v in made.items()}))
