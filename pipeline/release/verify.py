"""`edgesmith verify`: check a bundle (folder or tar.gz) against its manifest, listing every problem at once."""

from __future__ import annotations

import json
import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

from ..cache import sha256_file
from ..errors import EdgesmithError
from .manifest import MANIFEST_NAME, Manifest, config_sha256, content_digest, parse_manifest, schema_problems
from .signing import SIGNATURE_NAME, verify_signature, verify_tarball_signature
from .tarball import TarBundle, UnreadableArchive, open_tarball, resolve_link, unsafe_name

MAX_MANIFEST_BYTES = 64 << 20


class VerifyError(EdgesmithError):
    """A bundle does not match its manifest, or is unsafe to unpack."""

    exit_code = 1


class BundleNotFound(EdgesmithError):
    """The path given is neither a bundle folder nor a tarball."""


@dataclass
class FolderBundle:
    """A bundle folder: entry kinds by bundle path, read without following links."""

    root: Path
    kinds: dict[str, str] = field(default_factory=dict)
    link_targets: dict[str, str] = field(default_factory=dict)
    link_names: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def sha256(self, rel: str) -> tuple[str, int]:
        path = self.root / rel
        return sha256_file(path), path.stat().st_size

    def read_bytes(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def size(self, rel: str) -> int:
        return (self.root / rel).lstat().st_size


Bundle = Union[FolderBundle, TarBundle]


def _inspect_folder(root: Path) -> FolderBundle:
    bundle = FolderBundle(root)
    for top, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(top) / name
            rel = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                bundle.kinds[rel] = "symlink"
                bundle.link_targets[rel] = bundle.link_names[rel] = os.readlink(path)
            elif stat.S_ISDIR(mode):
                bundle.kinds[rel] = "dir"
            elif stat.S_ISREG(mode):
                bundle.kinds[rel] = "file"
            else:
                bundle.kinds[rel] = "device or special file"
    return bundle


@contextmanager
def open_bundle(path: Path) -> Iterator[Bundle]:
    """A folder or a tarball, inspected in place (tarballs are streamed, never extracted)."""
    path = Path(path)
    if path.is_dir():
        # The release stage folder (or the `release` link to it) holds the bundle in bundle/.
        if not (path / MANIFEST_NAME).exists() and (path / "bundle" / MANIFEST_NAME).is_file():
            path = path / "bundle"
        yield _inspect_folder(path)
        return
    if not path.is_file():
        raise BundleNotFound(f"{path} does not exist.",
                             "Pass a release bundle folder (…/release/bundle) or its .tar.gz.")
    try:
        with open_tarball(path) as bundle:
            yield bundle
    except UnreadableArchive as exc:
        raise VerifyError(f"{path} is not a readable tar.gz archive ({exc}).",
                          "Pass the bundle folder or the .tar.gz written by the release stage; "
                          "if it was downloaded, fetch it again.") from None


@dataclass
class VerifyResult:
    path: Path
    manifest: Optional[Manifest]
    problems: list[str]
    files_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def check_signature(path: Path, public_key: Path) -> None:
    """SignatureError unless the bundle (folder or tarball, already checked by check_bundle) carries a signature
    by public_key's private half over exactly its files."""
    with open_bundle(path) as bundle:
        if isinstance(bundle, FolderBundle):
            verify_signature(bundle.root, public_key)
        else:
            verify_tarball_signature(bundle, public_key)


def is_signed(path: Path) -> bool:
    with open_bundle(path) as bundle:
        return bundle.kinds.get(SIGNATURE_NAME) == "file"


def verify_bundle(path: Path) -> VerifyResult:
    """Every problem with the bundle at `path`: unsafe entries, schema errors, missing/extra/changed files."""
    with open_bundle(path) as bundle:
        problems = list(bundle.problems) + _entry_problems(bundle)
        raw, manifest_problems = read_manifest(bundle)
        problems += manifest_problems
        if raw is None or manifest_problems:
            if raw is not None:
                problems.append("file hashes were not checked because the manifest is malformed")
            return VerifyResult(Path(path), None, problems)
        manifest = parse_manifest(raw)
        problems += _digest_problems(manifest)
        file_problems, checked = _file_problems(bundle, manifest)
        return VerifyResult(Path(path), manifest, problems + file_problems, checked)


def check_bundle(path: Path) -> VerifyResult:
    """verify_bundle, raising VerifyError that lists all problems if there are any."""
    result = verify_bundle(path)
    if result.problems:
        count = len(result.problems)
        raise VerifyError(
            f"Bundle {path} failed verification with {count} problem{'s' * (count > 1)}:\n  - "
            + "\n  - ".join(result.problems),
            "\nDo not deploy it. Rebuild the release (`edgesmith build CONFIG`) or fetch the bundle again from "
            "where it was published; if you changed a file on purpose, rebuild so the manifest is regenerated.",
        )
    return result


def _entry_problems(bundle: Bundle) -> list[str]:
    problems = []
    for rel, kind in sorted(bundle.kinds.items()):
        if kind in ("symlink", "hardlink"):
            shown = bundle.link_names.get(rel, "")
            if resolve_link(rel, bundle.link_targets.get(rel, "")) is None:
                problems.append(f"{rel}: {kind} to '{shown}' leaves the bundle")
            else:
                problems.append(f"{rel}: {kind} to '{shown}'; a bundle holds only regular files and folders")
        elif kind not in ("file", "dir"):
            problems.append(f"{rel}: {kind}; a bundle holds only regular files and folders")
    return problems


def read_manifest(bundle: Bundle) -> tuple[Optional[dict], list[str]]:
    """The parsed manifest (None if unreadable) and its problems: absent, oversized, not JSON, off-schema."""
    if bundle.kinds.get(MANIFEST_NAME) != "file":
        return None, [f"{MANIFEST_NAME} is missing: this is not a release bundle, or it was truncated"]
    if bundle.size(MANIFEST_NAME) > MAX_MANIFEST_BYTES:
        # Read into memory below, so a hostile archive must not be able to make it arbitrarily large.
        return None, [f"{MANIFEST_NAME} is {bundle.size(MANIFEST_NAME)} bytes, more than the "
                      f"{MAX_MANIFEST_BYTES} a manifest can be"]
    try:
        raw = json.loads(bundle.read_bytes(MANIFEST_NAME).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [f"{MANIFEST_NAME} is not valid JSON ({exc})"]
    return raw, schema_problems(raw)


def _digest_problems(manifest: Manifest) -> list[str]:
    problems = []
    if content_digest(manifest.files) != manifest.content_sha256:
        problems.append("manifest.content_sha256 does not match its own file list (the manifest was edited)")
    if config_sha256(manifest.config) != manifest.config_sha256:
        problems.append("manifest.config_sha256 does not match manifest.config (the manifest was edited)")
    return problems


def _file_problems(bundle: Bundle, manifest: Manifest) -> tuple[list[str], int]:
    problems, listed, checked = [], set(), 0
    for entry in manifest.files:
        reason = unsafe_name(entry.path)
        if reason is not None:
            problems.append(f"{entry.path}: unsafe path in the manifest ({reason})")
            continue
        if entry.path in listed:
            problems.append(f"{entry.path}: listed twice in the manifest")
            continue
        listed.add(entry.path)
        kind = bundle.kinds.get(entry.path)
        if kind is None:
            problems.append(f"{entry.path}: missing (listed in the manifest)")
        elif kind != "file":
            problems.append(f"{entry.path}: is a {kind}, the manifest lists a regular file")
        else:
            checked += 1
            problems += _hash_problems(bundle, entry.path, entry.sha256, entry.size)
    extra = sorted(rel for rel, kind in bundle.kinds.items()
                   if kind == "file" and rel not in listed and rel not in (MANIFEST_NAME, SIGNATURE_NAME))
    problems += [f"{rel}: not listed in the manifest (added after the release was built)" for rel in extra]
    return problems, checked


def _hash_problems(bundle: Bundle, rel: str, sha256: str, size: int) -> list[str]:
    actual_sha, actual_size = bundle.sha256(rel)
    if actual_sha == sha256 and actual_size == size:
        return []
    return [f"{rel}: content changed (sha256 {actual_sha[:16]}…, {actual_size} bytes; "
            f"manifest says {sha256[:16]}…, {size} bytes)"]
