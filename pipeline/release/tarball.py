"""Byte-reproducible tar.gz of a bundle folder, and a reader that inspects untrusted tarballs without extracting.

Reproducible means: entries in sorted order, every mtime the same fixed value, uid/gid 0 with empty owner names,
modes normalised to 0644/0755, and a gzip header without a timestamp or file name. The same folder contents
therefore give the same bytes on any machine with the same zlib.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import posixpath
import stat
import tarfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from ..errors import ConfigError
from .manifest import MANIFEST_NAME

GZIP_LEVEL = 9


def source_date_epoch(configured: Optional[int] = None) -> int:
    """The mtime stamped on tar entries: the config's value, else $SOURCE_DATE_EPOCH, else 0."""
    if configured is not None:
        return configured
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return 0
    if not raw.isdigit():
        # The reproducible-builds convention: a malformed value is an error, not silently another date.
        raise ConfigError(f"SOURCE_DATE_EPOCH is {raw!r}, not a whole number of seconds since 1970-01-01.",
                          "Set it to an integer (e.g. `git log -1 --format=%ct`), or unset it to stamp 0.")
    return int(raw)


def write_tarball(folder: Path, dest: Path, root_name: str, mtime: int = 0) -> Path:
    """Pack `folder` as `root_name/...` into `dest` (written to a temporary name, then renamed)."""
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            # filename="" and mtime=0 keep the gzip header free of the temp name and the clock.
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=GZIP_LEVEL) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    tar.addfile(_entry(root_name, tarfile.DIRTYPE, 0o755, mtime))
                    for rel in _sorted_tree(folder):
                        _add(tar, folder / rel, f"{root_name}/{rel}", mtime)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _sorted_tree(folder: Path) -> list[str]:
    paths = []
    for top, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            paths.append((Path(top) / name).relative_to(folder).as_posix())
    # Sorting by components puts a folder right before its contents, whatever characters the names use.
    return sorted(paths, key=lambda p: p.split("/"))


def _add(tar: tarfile.TarFile, path: Path, name: str, mtime: int) -> None:
    st = path.lstat()
    if stat.S_ISDIR(st.st_mode):
        tar.addfile(_entry(name, tarfile.DIRTYPE, 0o755, mtime))
    elif stat.S_ISREG(st.st_mode):
        mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
        info = _entry(name, tarfile.REGTYPE, mode, mtime)
        info.size = st.st_size
        with open(path, "rb") as fh:
            tar.addfile(info, fh)
    else:
        raise ValueError(f"{path} is neither a regular file nor a folder; a bundle holds only those")


def _entry(name: str, kind: bytes, mode: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def unsafe_name(name: str) -> Optional[str]:
    """Why an archive member name could write outside the extraction folder, or None if it is safe."""
    if not name or "\x00" in name:
        return "empty or NUL in name"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "'..' component leaves the bundle"
    return None


def resolve_link(name: str, target: str) -> Optional[str]:
    """Where a symlink at bundle path `name` points, as a bundle path; None if it points outside the bundle."""
    if not target or target.startswith(("/", "\\")):
        return None
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    if resolved == ".." or resolved.startswith("../") or resolved.startswith("/"):
        return None
    return resolved


@dataclass
class TarBundle:
    """A bundle tarball opened for inspection: member kinds by bundle path, and problems found in the listing.

    Members are never extracted; regular files are hashed and read by streaming them from the archive.
    """

    tar: tarfile.TarFile
    prefix: str = ""
    kinds: dict[str, str] = field(default_factory=dict)
    link_targets: dict[str, str] = field(default_factory=dict)
    link_names: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    _members: dict[str, tarfile.TarInfo] = field(default_factory=dict)

    def sha256(self, rel: str) -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        fh = self.tar.extractfile(self._members[rel])
        assert fh is not None, "only regular members are hashed"
        while block := fh.read(1 << 20):
            digest.update(block)
            size += len(block)
        return digest.hexdigest(), size

    def size(self, rel: str) -> int:
        return self._members[rel].size

    def read_bytes(self, rel: str) -> bytes:
        fh = self.tar.extractfile(self._members[rel])
        assert fh is not None, "only regular members are read"
        return fh.read()


class UnreadableArchive(Exception):
    """The file is not a readable gzip-compressed tar."""


ARCHIVE_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


@contextmanager
def open_tarball(path: Path) -> Iterator[TarBundle]:
    try:
        tar = tarfile.open(path, mode="r:*")
    except ARCHIVE_ERRORS as exc:
        raise UnreadableArchive(str(exc) or type(exc).__name__) from None
    with tar:
        try:
            yield _inspect(tar)
        except ARCHIVE_ERRORS as exc:
            # A corrupt stream shows only when read: gzip, xz (LZMAError) and bz2 (OSError) each fail their way.
            raise UnreadableArchive(str(exc) or type(exc).__name__) from None


def _inspect(tar: tarfile.TarFile) -> TarBundle:
    members = tar.getmembers()
    bundle = TarBundle(tar, prefix=_bundle_prefix([m.name for m in members]))
    for member in members:
        _classify(bundle, member)
    return bundle


def _bundle_prefix(names: list[str]) -> str:
    """The bundle's top folder inside the archive ('' if manifest.json is at the archive root)."""
    safe = [n.removeprefix("./").rstrip("/") for n in names if unsafe_name(n) is None]
    if MANIFEST_NAME in safe:
        return ""
    tops = {n.split("/", 1)[0] for n in safe}
    if len(tops) == 1 and f"{next(iter(tops))}/{MANIFEST_NAME}" in safe:
        return next(iter(tops)) + "/"
    return ""


def _classify(bundle: TarBundle, member: tarfile.TarInfo) -> None:
    name = member.name.removeprefix("./").rstrip("/")
    reason = unsafe_name(member.name)
    if reason is not None:
        bundle.problems.append(f"{member.name}: unsafe archive member ({reason})")
        return
    if name == bundle.prefix.rstrip("/") and member.isdir():
        return
    if not name.startswith(bundle.prefix):
        bundle.problems.append(f"{member.name}: archive member outside the bundle folder {bundle.prefix!r}")
        return
    rel = name[len(bundle.prefix):]
    if rel in bundle.kinds:
        bundle.problems.append(f"{rel}: appears more than once in the archive")
        return
    bundle.kinds[rel] = _kind(member)
    if member.issym() or member.islnk():
        bundle.link_names[rel] = member.linkname
    if member.issym():
        bundle.link_targets[rel] = member.linkname
    elif member.islnk():
        # A hard link names another archive member; express it relative to this member's folder.
        target = member.linkname.removeprefix("./")
        inside = target.startswith(bundle.prefix) and unsafe_name(target) is None
        bundle.link_targets[rel] = (posixpath.relpath(target[len(bundle.prefix):], posixpath.dirname(rel) or ".")
                                    if inside else "/" + target)
    bundle._members[rel] = member


def _kind(member: tarfile.TarInfo) -> str:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    return "device or special file"


__all__ = ["write_tarball", "source_date_epoch", "unsafe_name", "resolve_link", "open_tarball", "TarBundle",
           "UnreadableArchive"]
