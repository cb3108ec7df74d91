"""Data versioning through DVC's command line (its documented interface).

DVC holds one lock per workspace, so callers must run these one at a time, never from parallel tasks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

DVC = [sys.executable, "-m", "dvc"]  # the dvc of this environment, whatever PATH says


class VersioningError(RuntimeError):
    pass


@dataclass(frozen=True)
class DataVersion:
    """A prepared dataset folder and the md5 DVC recorded for it (what identifies the data downstream).

    Without ``known_md5`` the md5 is read from ``<folder>.dvc`` when first asked for: only some stages need
    it (the search names its study by it), and the others should fail on what they miss themselves.
    """

    path: Path
    known_md5: str | None = None

    @property
    def md5(self) -> str:
        return self.known_md5 if self.known_md5 is not None else read_md5(self.path)


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise VersioningError(f"`{' '.join(args)}` failed in {cwd}: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def git_root(path: Path) -> Path | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return Path(out.stdout.strip()).resolve() if out.returncode == 0 else None


def git_commit(path: Path) -> str | None:
    if git_root(path) is None:
        return None
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_repo(project: Path) -> None:
    """``dvc init`` on first use: inside a git repo as a (sub)project, otherwise with ``--no-scm``."""
    if (project / ".dvc").is_dir():
        return
    root = git_root(project)
    if root is None:
        args = ["dvc", "init", "--no-scm"]
    elif root == project.resolve():
        args = ["dvc", "init"]
    else:
        args = ["dvc", "init", "--subdir"]
    _run([*DVC, *args[1:]], project)


def add(project: Path, data_path: Path) -> str:
    """``dvc add`` the folder and return its md5 (the ``.dir`` hash DVC records in ``<folder>.dvc``)."""
    ensure_repo(project)
    _run([*DVC, "add", str(data_path.relative_to(project))], project)
    return read_md5(data_path)


def read_md5(data_path: Path) -> str:
    dvc_file = data_path.with_name(data_path.name + ".dvc")
    if not dvc_file.is_file():
        raise VersioningError(f"{dvc_file} not found: version the data first (pruneflow stage data)")
    outs = yaml.safe_load(dvc_file.read_text()).get("outs") or [{}]
    md5 = outs[0].get("md5")
    if not md5:
        raise VersioningError(f"{dvc_file} records no md5")
    return md5
