"""The model bundle: one folder that moves between stages (train -> export -> build -> serve -> detect).

Layout::

    BUNDLE/
      config.json          GladConfig (preset, resolution, schedule, ADS/SAFF/scoring parameters)
      manifest.json        format version, creation time, sha256 and size of every other file
      weights/             safetensors weights + a JSON architecture description per network
      onnx/                exported graphs (export issue)
      engines/             TensorRT engines keyed by GPU / TensorRT version / precision / shapes
      calibration.json     thresholds and score normalisation (calib issue)

Nothing depends on the working directory: every path is relative to the bundle folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .config import GladConfig

__all__ = ["Bundle", "BundleError", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_SKIP = {"manifest.json"}


class BundleError(RuntimeError):
    """A bundle folder is missing, incomplete or fails its checksums."""


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
        """A short bundle identity: sha256 over the manifest's file hashes (exposed as served model metadata)."""
        files = self.manifest()["files"]
        h = hashlib.sha256("".join(f"{k}:{v['sha256']}" for k, v in sorted(files.items())).encode())
        return h.hexdigest()[:16]

    def verify(self, prefix: str = "", required: tuple[str, ...] | list[str] = ()) -> None:
        """Check every manifest file under ``prefix`` exists with the recorded sha256.

        Args:
            prefix: only files whose relative path starts with it.
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
            if not rel.startswith(prefix):
                continue
            p = self.file(rel)
            if not p.is_file():
                missing.append(rel)
            elif p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
                changed.append(rel)
        if missing or changed:
            raise BundleError(f"{self.path}: bundle check failed; missing {missing}, modified {changed}")
