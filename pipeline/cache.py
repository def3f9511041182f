"""Content-addressed stage outputs: keys, crash-safe commits, and the build lock.

A committed stage folder `<root>/<stage>-<key16>/` holds the stage's files and stage.json, which lists every
file with its size and sha256. A commit writes and fsyncs everything in a temporary folder, moves any old
folder of that key out of sight (into .tmp/, swept later), then renames the new one in and fsyncs the parent:
after a crash at any point a key's folder is either absent or complete. A lookup serves a folder only if every
listed file is there with its size (and, with build.verify_cache, its sha256)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator

from .errors import CacheBusyError, CacheError

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


def config_sha256(config: dict, sections: Iterable[str] | None = None) -> str:
    """sha256 of a config dump as JSON with sorted keys, or of the named sections only. Release manifests record
    the whole-config value, so its serialisation (json's default separators) must stay as it is."""
    if sections is not None:
        wanted = set(sections)
        config = {name: value for name, value in config.items() if name in wanted}
    return sha256_text(json.dumps(config, sort_keys=True))


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
    """The Python version and each installed package's version ("absent" when it is not installed)."""
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


def file_list(root: Path, skip: tuple[str, ...] = ()) -> list[dict]:
    """Every regular file under root (relative POSIX path, size, sha256), sorted: what stage.json promises."""
    entries = []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        if rel not in skip:
            entries.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return entries


def write_durable(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under root (files first), so a rename never publishes unwritten data."""
    for top, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(top, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(top))


def _fault_point(step: str, final: Path) -> None:
    """Test hook for bench/faults.py: with EDGESMITH_FAULT_HOOK=<file>, note each commit step there and pause
    EDGESMITH_FAULT_PAUSE_S seconds, so a kill can land exactly between the renames. Inert when unset."""
    hook = os.environ.get("EDGESMITH_FAULT_HOOK")
    if not hook:
        return
    with open(hook, "a") as fh:
        fh.write(f"{step} {final.name}\n")
    time.sleep(float(os.environ.get("EDGESMITH_FAULT_PAUSE_S", "0")))


FOLDER_FIX = ("Set build.output to a folder you can write (e.g. --set build.output=/some/writable/folder), or make "
              "this one writable (chmod u+w, or chown it to the user who builds).")


def folder_error(root: Path, exc: OSError, where: Path | None = None) -> CacheError:
    """The OSError of creating or writing the build folder `root` (in `where`), as the user's problem and its fix."""
    where = where or exc.filename or root
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) or (os.path.lexists(root) and not os.path.isdir(root)):
        reason = f"a file is in the way ({where}: {exc.strerror}); build.output must be a folder"
    elif exc.errno == errno.EROFS:
        reason = f"{where} is on a read-only file system"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        reason = f"no permission to write in {where}"
    else:
        reason = f"{where}: {exc.strerror or exc}"
    return CacheError(f"The build folder {root} cannot be created or written: {reason}.", FOLDER_FIX)


def folder_problem(root: Path) -> CacheError | None:
    """Why the build folder `root` could not be created or written, or None if it can. Leaves nothing behind: the
    folder itself (or its nearest existing parent, when it does not exist yet) is probed with a temporary folder
    that is removed at once."""
    root = Path(root)
    base = root
    while not os.path.lexists(base) and base.parent != base:
        base = base.parent
    if not base.is_dir():
        what = "a file" if base.is_file() else "not a folder"
        under = "" if base == root else f" (a parent of {root})"
        return CacheError(f"The build folder {root} cannot be created: {base}{under} is {what}; build.output must "
                          "name a folder.", f"Set build.output to a folder (e.g. --set build.output=builds), or move "
                          f"{base} out of the way.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".edgesmith-write-test-", dir=base))
    except OSError as exc:
        return folder_error(root, exc, base)
    return None


class BuildCache:
    """`<output>/<build>/<stage>-<key>/` folders, each complete or absent."""

    STAGE_FILE = "stage.json"

    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp_root = self.root / ".tmp"

    def path(self, stage: str, key: str) -> Path:
        return self.root / f"{stage}-{key[:16]}"

    def lookup(self, stage: str, key: str, verify: bool = False) -> dict | None:
        """The stage.json of a complete folder for this key, else None (absent, torn, or files that differ from
        the list in stage.json: a miss, so the stage runs again rather than serving a damaged result)."""
        folder = self.path(stage, key)
        try:
            meta = json.loads((folder / self.STAGE_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("key") != key or not isinstance(meta.get("files"), list):
            return None
        return meta if not self.damaged(folder, meta["files"], verify) else None

    @staticmethod
    def damaged(folder: Path, files: list, verify: bool = False) -> str | None:
        """The first listed file that is missing or differs in size (or sha256, with verify), else None."""
        for entry in files:
            try:
                path = folder / entry["path"]
                if path.stat().st_size != entry["size"]:
                    return entry["path"]
                if verify and sha256_file(path) != entry["sha256"]:
                    return entry["path"]
            except (OSError, KeyError, TypeError):
                return str(entry)
        return None

    @classmethod
    def read_meta(cls, folder: Path) -> dict | None:
        """The stage.json of a committed stage folder, or None if it has none (or not a readable one)."""
        try:
            return json.loads((Path(folder) / cls.STAGE_FILE).read_text())
        except (OSError, ValueError):
            return None

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
        """Make tmp the folder of (stage, key): crash-safe at every step (see the module docstring)."""
        meta = {**meta, "files": file_list(tmp, skip=(self.STAGE_FILE,))}
        write_durable(tmp / self.STAGE_FILE, json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        fsync_tree(tmp)
        final = self.path(stage, key)
        _fault_point("before-rename", final)
        if final.exists() or final.is_symlink():
            # Out of sight first, in one rename: never a half-deleted folder under the key's name.
            aside = self.tmp_root / f"old-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(final, aside)
            fsync_dir(self.root)
            _fault_point("old-moved-aside", final)
            shutil.rmtree(aside, ignore_errors=True)
        os.rename(tmp, final)
        fsync_dir(self.root)
        _fault_point("after-rename", final)
        return final

    def sweep_stale(self) -> None:
        """Remove temporary folders of builds that died, and old folders moved aside (only under the lock)."""
        shutil.rmtree(self.tmp_root, ignore_errors=True)

    def problem(self) -> CacheError | None:
        """Why this build folder cannot be created or written (read-only, a file in the way), or None."""
        return folder_problem(self.root)

    @contextmanager
    def lock(self, wait: bool = True, say=print) -> Iterator[None]:
        lock_file = self.root / ".lock"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fh = open(lock_file, "a+")
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise               # the CLI's disk-full message
            raise folder_error(self.root, exc) from None
        with fh:
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


class DigestCache:
    """sha256 of input files (teacher weights, dataset folders), re-read only when a file's size, mtime or inode
    changed: a path names an input, its content is what the key depends on. Kept in <root>/.digests.json;
    losing it costs a re-hash, never a wrong key (a stale entry cannot match a changed file's stat)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict | None = None
        self._dirty = False

    def _load(self) -> dict:
        if self._entries is None:
            try:
                entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                entries = {}
            self._entries = entries if isinstance(entries, dict) else {}
        return self._entries

    def file(self, path: Path) -> str:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entries = self._load()
        known = entries.get(str(path))
        if isinstance(known, dict) and known.get("stat") == stamp and isinstance(known.get("sha256"), str):
            return known["sha256"]
        digest = sha256_file(path)
        entries[str(path)] = {"stat": stamp, "sha256": digest}
        self._dirty = True
        return digest

    def tree(self, root: Path) -> str:
        """A folder's digest: every regular file's relative path, size and sha256, in sorted order."""
        digest = hashlib.sha256()
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\0{self.file(path)}\n".encode())
        return digest.hexdigest()

    def of(self, path: Path) -> str | None:
        """Digest of a file or folder; None if it does not exist (the stage reports that itself)."""
        path = Path(path).expanduser().resolve()
        if path.is_file():
            return self.file(path)
        if path.is_dir():
            return self.tree(path)
        return None

    def save(self) -> None:
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            write_durable(tmp, json.dumps(self._entries, sort_keys=True))
            os.replace(tmp, self.path)  # two builds writing at once: the last complete file wins
        except OSError:
            pass  # only a speed-up: a build must not fail because it could not be written
        self._dirty = False
