"""Content-addressed stage outputs: keys, atomic commits, and the build lock."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator

from .errors import CacheBusyError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CODE_PACKAGES = ("pipeline", "quantize", "exporters", "device_tests")


def stable_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def code_digest(paths: Iterable[str] = CODE_PACKAGES) -> str:
    """Hash of the source files a stage depends on, so a code change is never served a stale output."""
    digest = hashlib.sha256()
    for rel in sorted(paths):
        root = PROJECT_ROOT / rel
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for file in files:
            digest.update(str(file.relative_to(PROJECT_ROOT)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def package_versions(names: Iterable[str]) -> dict[str, str]:
    versions = {"python": "%d.%d" % sys.version_info[:2]}
    for name in sorted(names):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def stage_key(stage: str, sections: dict, inputs: dict[str, str], code: str, versions: dict[str, str]) -> str:
    return sha256_text(stable_json({"stage": stage, "sections": sections, "inputs": inputs, "code": code,
                                    "versions": versions}))


class BuildCache:
    """`<output>/<build>/<stage>-<key>/` folders, each complete or absent."""

    STAGE_FILE = "stage.json"

    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp_root = self.root / ".tmp"

    def path(self, stage: str, key: str) -> Path:
        return self.root / f"{stage}-{key[:16]}"

    def lookup(self, stage: str, key: str) -> dict | None:
        meta_file = self.path(stage, key) / self.STAGE_FILE
        if not meta_file.is_file():
            return None
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return meta if meta.get("key") == key else None

    def entries(self) -> list[Path]:
        return sorted(p for p in self.root.glob("*-*") if (p / self.STAGE_FILE).is_file())

    @contextmanager
    def staging(self, stage: str, key: str) -> Iterator[Path]:
        """A temporary folder that becomes the stage's output only if the body finishes."""
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_root / f"{stage}-{key[:16]}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def commit(self, tmp: Path, stage: str, key: str, meta: dict) -> Path:
        # stage.json is written last inside the temporary folder, then the folder is renamed into place:
        # a reader sees either no folder or a complete one.
        (tmp / self.STAGE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        final = self.path(stage, key)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        return final

    def sweep_stale(self) -> None:
        """Remove temporary folders of builds that died (only called under the lock)."""
        shutil.rmtree(self.tmp_root, ignore_errors=True)

    @contextmanager
    def lock(self, wait: bool = True, say=print) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        lock_file = self.root / ".lock"
        with open(lock_file, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                if not wait:
                    raise CacheBusyError(
                        f"Another build (pid {holder}) is using the cache {self.root}.",
                        "Wait for it to finish, or run without --no-wait to queue behind it.",
                    ) from None
                say(f"Waiting for another build (pid {holder}) that holds {lock_file} ...")
                fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
