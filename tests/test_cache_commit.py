"""Crash-safe commits and content-addressed inputs (pipeline/cache.py): a key's folder is absent or complete at
every step of a commit, a hit checks the files stage.json lists, and input files count by content, not path."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import pipeline.cache as cache_mod
from pipeline.cache import BuildCache
from pipeline.config import load_config
from pipeline.runner import Build

KEY = "k" * 64


def commit(cache: BuildCache, files: dict[str, bytes], key: str = KEY, meta: dict | None = None):
    with cache.staging("distill", key) as tmp:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        return cache.commit(tmp, "distill", key, {"key": key, **(meta or {})})


def test_stage_json_lists_every_file_with_size_and_sha256(tmp_path):
    cache = BuildCache(tmp_path / "b")
    final = commit(cache, {"student.pt": b"weights", "sub/student.json": b"{}"})
    files = json.loads((final / "stage.json").read_text())["files"]
    assert [f["path"] for f in files] == ["student.pt", "sub/student.json"]
    assert files[0]["size"] == 7 and files[0]["sha256"] == cache_mod.sha256_text("weights")
    assert cache.lookup("distill", KEY) is not None


def test_a_truncated_or_missing_file_is_a_miss(tmp_path):
    cache = BuildCache(tmp_path / "b")
    final = commit(cache, {"student.pt": b"0123456789", "student.json": b"{}"})
    (final / "student.pt").write_bytes(b"01234")       # what a power loss can leave behind a valid stage.json
    assert cache.lookup("distill", KEY) is None
    final = commit(cache, {"student.pt": b"0123456789", "student.json": b"{}"})
    (final / "student.json").unlink()
    assert cache.lookup("distill", KEY) is None


def test_verify_cache_finds_a_changed_byte_that_sizes_miss(tmp_path):
    cache = BuildCache(tmp_path / "b")
    final = commit(cache, {"student.pt": b"0123456789"})
    (final / "student.pt").write_bytes(b"0123456780")   # same size, one byte different
    assert cache.lookup("distill", KEY) is not None       # the cheap check: sizes only
    assert cache.lookup("distill", KEY, verify=True) is None


def test_an_entry_without_a_file_list_is_not_served(tmp_path):
    cache = BuildCache(tmp_path / "b")
    folder = cache.path("distill", KEY)
    folder.mkdir(parents=True)
    (folder / "stage.json").write_text(json.dumps({"key": KEY}))   # the old format, or a hand-made folder
    assert cache.lookup("distill", KEY) is None


def test_a_recommit_killed_while_the_old_folder_goes_never_leaves_a_half_deleted_hit(tmp_path, monkeypatch):
    """--force over an existing key, killed while the old folder is being removed: what is left under the key
    must not be served (before: rmtree file by file with stage.json still there, then a hit on the rest)."""
    cache = BuildCache(tmp_path / "b")
    old = {f"part{i}.bin": bytes([i]) * 100 for i in range(6)}
    commit(cache, old)

    real_rmtree = shutil.rmtree

    killed = []

    def killed_midway(path, *args, **kwargs):
        if killed or not os.path.isfile(os.path.join(path, "part0.bin")):
            return real_rmtree(path, *args, **kwargs)   # the staging folder's own clean-up
        os.unlink(os.path.join(path, "part0.bin"))       # one file of the old folder gone, then the process dies
        killed.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        commit(cache, {f"part{i}.bin": bytes([i + 1]) * 100 for i in range(6)})
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    meta = cache.lookup("distill", KEY)
    folder = cache.path("distill", KEY)
    if meta is not None:  # whatever is served must be whole
        assert all((folder / f["path"]).stat().st_size == f["size"] for f in meta["files"])
        assert len(list(folder.glob("part*.bin"))) == 6


def test_commit_fsyncs_files_and_folders_before_the_rename(tmp_path, monkeypatch):
    cache = BuildCache(tmp_path / "b")
    events = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(b))), real_rename(a, b)))
    final = commit(cache, {"student.pt": b"w", "sub/x.json": b"{}"})
    rename = events.index(("rename", str(final)))
    synced = {path for kind, path in events[:rename] if kind == "fsync"}
    tmp = str(cache.tmp_root / f"distill-{KEY[:16]}-{os.getpid()}")
    assert {f"{tmp}/student.pt", f"{tmp}/sub/x.json", f"{tmp}/stage.json", f"{tmp}/sub", tmp} <= synced
    assert ("fsync", str(cache.root)) in events[rename:]  # the rename itself made durable


def keys(path) -> dict[str, str]:
    return {p.stage.name: p.key for p in Build(load_config(path)).plan()}


def test_replacing_the_teacher_weights_at_the_same_path_re_keys_the_teacher(write_config, tmp_path):
    weights = tmp_path / "teacher.pth"
    weights.write_bytes(b"checkpoint one")
    cfg = write_config(**{"teacher": {"source": "checkpoint", "name": "resnet18", "weights": str(weights)}})
    first = keys(cfg)
    assert keys(cfg) == first
    weights.write_bytes(b"checkpoint two, same path")
    second = keys(cfg)
    assert second["teacher"] != first["teacher"] and second["distill"] != first["distill"]


def test_a_changed_file_in_the_data_root_re_keys_every_stage_that_reads_data(write_config, tmp_path, monkeypatch):
    root = tmp_path / "images"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            (root / split / cls / "0.png").write_bytes(f"{split}{cls}".encode())
    cfg = write_config(**{"data": {"dataset": "image_folder", "root": str(root)}, "subtask.classes": ["a", "b"]})
    first = keys(cfg)

    hashed = []
    real = cache_mod.sha256_file
    monkeypatch.setattr(cache_mod, "sha256_file", lambda p, *a: (hashed.append(p), real(p, *a))[1])
    assert keys(cfg) == first and hashed == []          # unchanged files: the size+mtime index, no re-hash
    (root / "train" / "a" / "0.png").write_bytes(b"another image")
    second = keys(cfg)
    assert [p.name for p in hashed] == ["0.png"]         # only the changed file is read again
    assert all(second[s] != first[s] for s in ("teacher", "adapt", "distill"))
