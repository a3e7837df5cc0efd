"""The model bundle: one folder that moves between stages (train -> export -> build -> serve -> detect).

Layout::

    BUNDLE/
      config.json          GladConfig (preset, resolution, schedule, ADS/SAFF/scoring parameters)
      manifest.json        format version, creation time, sha256 and size of every other file
      weights/             safetensors weights + a JSON architecture description per network
      onnx/                exported graphs (export issue)
      engines/             TensorRT engines keyed by GPU / TensorRT version / precision / shapes
      calibration.json     thresholds and score normalisation (``glad_runtime.core.calibration.Calibration``), optional

Nothing depends on the working directory: every path is relative to the bundle folder.

``calibration.json`` is listed in the manifest like every other file. It is written only through
:meth:`Bundle.write_calibration`, which first verifies the whole bundle (so a calibration never blesses a tampered
file) and then updates the manifest entry of ``calibration.json`` alone; ``verify`` therefore keeps covering the
weights, the config and the calibration. A calibration records :meth:`Bundle.model_checksum` (config and weights
only), so a bundle retrained after calibrating is detected (:meth:`Bundle.calibration` warns).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from glad_runtime.core.config import GladConfig
from glad_runtime.errors import BundleError  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # glad_runtime.core.calibration is numpy-only; imported lazily to keep this module's imports minimal
    from glad_runtime.core.calibration import Calibration

__all__ = ["Bundle", "BundleError", "FORMAT_VERSION", "CALIBRATION_FILE"]

FORMAT_VERSION = 1
CALIBRATION_FILE = "calibration.json"
_SKIP = {"manifest.json"}


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class Bundle:
    """A model bundle folder.

    Args:
        path: the bundle folder.
    Raises:
        BundleError: the folder or its ``config.json`` does not exist or does not parse.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise BundleError(f"{self.path} is not a GLAD bundle (no config.json); create one with `glad train` "
                              "or `glad init`")
        try:
            self.config = GladConfig.from_dict(json.loads(cfg.read_text()))
        except (ValueError, TypeError) as e:
            raise BundleError(f"{cfg}: invalid config: {e}") from e

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, path: str | os.PathLike, config: GladConfig) -> "Bundle":
        """Create (or overwrite the config of) a bundle folder and write its manifest."""
        p = Path(path)
        (p / "weights").mkdir(parents=True, exist_ok=True)
        (p / "config.json").write_text(config.to_json())
        b = cls(p)
        b.write_manifest()
        return b

    def file(self, relpath: str) -> Path:
        """Absolute path of a file inside the bundle (it need not exist)."""
        return self.path / relpath

    def files(self) -> list[str]:
        """All files under the bundle except the manifest, as sorted POSIX relative paths."""
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*")
                      if p.is_file() and p.name not in _SKIP and ".tmp" not in p.name)

    # ------------------------------------------------------------------ manifest
    def write_manifest(self) -> dict:
        """Hash every file and write ``manifest.json``; returns the manifest."""
        manifest = {
            "format_version": FORMAT_VERSION,
            "preset": self.config.preset,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {rel: {"sha256": sha256_file(self.file(rel)), "bytes": self.file(rel).stat().st_size}
                      for rel in self.files()},
        }
        (self.path / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return manifest

    def manifest(self) -> dict:
        """The parsed ``manifest.json``. Raises BundleError when missing."""
        m = self.path / "manifest.json"
        if not m.is_file():
            raise BundleError(f"{self.path}: no manifest.json")
        return json.loads(m.read_text())

    def checksum(self) -> str:
        """A short bundle identity: sha256 over the manifest's file hashes (exposed as served model metadata).

        Covers every file, ``calibration.json`` included (a new calibration changes the served labels)."""
        files = self.manifest()["files"]
        h = hashlib.sha256("".join(f"{k}:{v['sha256']}" for k, v in sorted(files.items())).encode())
        return h.hexdigest()[:16]

    def model_checksum(self) -> str:
        """A short identity of what produces the raw scores: sha256 over the manifest hashes of ``config.json``
        and ``weights/`` only (not the calibration, exported graphs or engines). Stored in a calibration."""
        files = {k: v for k, v in self.manifest()["files"].items() if k == "config.json" or k.startswith("weights/")}
        h = hashlib.sha256("".join(f"{k}:{v['sha256']}" for k, v in sorted(files.items())).encode())
        return h.hexdigest()[:16]

    def update_manifest(self, relpaths: list[str]) -> dict:
        """Re-hash only ``relpaths`` in the manifest (entries of missing files are dropped); atomic write.

        Tools that add files (export, build, calibrate) verify the bundle first and then record only their own
        files, so a tampered file is never re-hashed into the manifest."""
        manifest = self.manifest()
        for rel in relpaths:
            p = self.file(rel)
            if p.is_file():
                manifest["files"][rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            else:
                manifest["files"].pop(rel, None)
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        tmp = self.path / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp, self.path / "manifest.json")
        return manifest

    # ------------------------------------------------------------------ calibration
    def write_calibration(self, calibration: "Calibration") -> Path:
        """Store ``calibration`` as ``calibration.json`` and record it in the manifest.

        The bundle is verified first (all files but the ``calibration.json`` being replaced), so a modified weight
        or config file is refused rather than re-hashed; only the manifest entry of ``calibration.json`` changes.

        Raises:
            BundleError: the bundle fails its checksums, or the calibration's ``model_checksum`` names another
                model (config/weights) than this bundle's.
        """
        self.verify(exclude=(CALIBRATION_FILE,))
        mine = self.model_checksum()
        if calibration.model_checksum is not None and calibration.model_checksum != mine:
            raise BundleError(f"{self.path}: the calibration was computed for model {calibration.model_checksum}, "
                              f"this bundle is {mine}; recalibrate with `glad calibrate`")
        tmp = self.path / (CALIBRATION_FILE + ".tmp")
        tmp.write_text(calibration.to_json())
        os.replace(tmp, self.file(CALIBRATION_FILE))
        self.update_manifest([CALIBRATION_FILE])
        return self.file(CALIBRATION_FILE)

    def calibration(self) -> "Calibration | None":
        """The bundle's calibration, or None when it has no ``calibration.json`` (uncalibrated).

        The file is checked against the manifest before it is parsed.

        Raises:
            BundleError: ``calibration.json`` is not in the manifest, fails its checksum or does not parse.
        Warns:
            UserWarning (``glad_runtime.core.calibration.CalibrationWarning``): the calibration records a ``model_checksum``
            that differs from this bundle's (weights or config changed after calibrating).
        """
        from glad_runtime.core.calibration import Calibration, CalibrationError, CalibrationWarning

        p = self.file(CALIBRATION_FILE)
        if not p.is_file():
            return None
        if CALIBRATION_FILE not in self.manifest()["files"]:
            raise BundleError(f"{p} is not in the manifest; write calibrations with `glad calibrate` "
                              "(Bundle.write_calibration)")
        self.verify(prefix=CALIBRATION_FILE)
        try:
            cal = Calibration.from_json(p.read_text())
        except CalibrationError as e:
            raise BundleError(f"{p}: {e}") from e
        mine = self.model_checksum()
        if cal.model_checksum is not None and cal.model_checksum != mine:
            warnings.warn(f"{p} was computed for model {cal.model_checksum} but the bundle's config/weights are now "
                          f"{mine}: thresholds may not fit; rerun `glad calibrate`", CalibrationWarning, stacklevel=2)
        return cal

    def verify(self, prefix: str = "", required: tuple[str, ...] | list[str] = (), exclude: tuple[str, ...] = ()
               ) -> None:
        """Check every manifest file under ``prefix`` (except the paths in ``exclude``) exists with the recorded
        sha256.

        Args:
            prefix: only files whose relative path starts with it.
            exclude: relative paths skipped.
            required: relative paths that must be in the manifest (a file added after the last manifest write, or
                never written, fails instead of passing unchecked).
        Raises:
            BundleError: listing missing, unrecorded and modified files.
        """
        files = self.manifest()["files"]
        unrecorded = [r for r in required if r not in files]
        if unrecorded:
            raise BundleError(f"{self.path}: {unrecorded} not in manifest.json (written outside the bundle tools?); "
                              "re-run the command that creates them")
        missing, changed = [], []
        for rel, meta in files.items():
            if not rel.startswith(prefix) or rel in exclude:
                continue
            p = self.file(rel)
            if not p.is_file():
                missing.append(rel)
            elif p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
                changed.append(rel)
        if missing or changed:
            raise BundleError(f"{self.path}: bundle check failed; missing {missing}, modified {changed}")
