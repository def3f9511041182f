"""`verify` on good, tampered, truncated, malformed and malicious bundles (real files and crafted tarballs)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline.release.bundle import ReleaseSources, assemble_release
from pipeline.release.diff import diff_bundles
from pipeline.release.verify import VerifyError, check_bundle, verify_bundle

from .test_release import make_export_dir, make_validate_dir, release_info

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    up = tmp_path_factory.mktemp("up")
    return assemble_release(tmp_path_factory.mktemp("rel"),
                            ReleaseSources(make_export_dir(up), make_validate_dir(up), None), release_info())


@pytest.fixture
def bundle(tmp_path, release) -> Path:
    """A private copy of the bundle folder that a test may damage."""
    return Path(shutil.copytree(release.bundle_dir, tmp_path / "bundle"))


def problems_of(path: Path) -> str:
    with pytest.raises(VerifyError) as info:
        check_bundle(path)
    assert info.value.exit_code != 0
    return info.value.message


def test_a_fresh_bundle_and_its_tarball_verify(release):
    folder, tarball = verify_bundle(release.bundle_dir), verify_bundle(release.tarball)
    assert folder.ok and tarball.ok, (folder.problems, tarball.problems)
    assert folder.files_checked == tarball.files_checked == len(release.manifest.files) > 10


def test_tampered_missing_and_added_files_are_all_listed_at_once(bundle):
    with open(bundle / "model.onnx", "r+b") as fh:
        fh.write(b"\xff")
    (bundle / "eval.npz").unlink()
    (bundle / "backdoor.onnx").write_bytes(b"x")
    message = problems_of(bundle)
    assert "3 problems" in message
    assert "model.onnx: content changed" in message
    assert "eval.npz: missing (listed in the manifest)" in message
    assert "backdoor.onnx: not listed in the manifest" in message


def test_tampering_inside_a_tarball_is_found_without_extracting(tmp_path, bundle):
    (bundle / "labels.txt").write_text("cat\ndog\n")
    tarball = tmp_path / "t.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(bundle, arcname="tiny-1.2.3")
    message = problems_of(tarball)
    assert "1 problem:" in message and "labels.txt: content changed" in message


def test_malformed_manifests_are_reported_with_their_key_paths(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][0]["sha256"] = "not-a-hash"
    del manifest["host"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    message = problems_of(bundle)
    assert "manifest.files.0.sha256" in message and "manifest.host: Field required" in message
    assert "hashes were not checked because the manifest is malformed" in message

    (bundle / "manifest.json").write_text("{not json")
    assert "manifest.json is not valid JSON" in problems_of(bundle)

    manifest["schema_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert "version 99" in problems_of(bundle)


def test_an_edited_manifest_is_caught_by_its_digests(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["config"]["build"]["seed"] = 1  # a lie about the build, file hashes untouched
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert "config_sha256 does not match" in problems_of(bundle)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_link(tar: tarfile.TarFile, name: str, target: str, kind=tarfile.SYMTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    tar.addfile(info)


def test_traversal_absolute_and_escaping_links_in_a_tarball_are_refused(tmp_path, release):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(release.tarball) as good, tarfile.open(evil, "w:gz") as tar:
        for member in good.getmembers():
            tar.addfile(member, good.extractfile(member) if member.isfile() else None)
        _add_bytes(tar, "../evil", b"pwned")
        _add_bytes(tar, "/tmp/edgesmith-absolute-evil", b"pwned")
        _add_bytes(tar, "tiny-1.2.3/a/../../../outside", b"pwned")
        _add_link(tar, "tiny-1.2.3/passwd", "../../../etc/passwd")
        _add_link(tar, "tiny-1.2.3/abs", "/etc/shadow")
        _add_link(tar, "tiny-1.2.3/hard", "/etc/hosts", tarfile.LNKTYPE)
        _add_link(tar, "tiny-1.2.3/inner", "tiny-1.2.3/model.onnx", tarfile.LNKTYPE)
        chr_dev = tarfile.TarInfo("tiny-1.2.3/null")
        chr_dev.type = tarfile.CHRTYPE
        tar.addfile(chr_dev)
    message = problems_of(evil)
    for expected in ("../evil: unsafe archive member ('..' component leaves the bundle)",
                     "/tmp/edgesmith-absolute-evil: unsafe archive member (absolute path)",
                     "tiny-1.2.3/a/../../../outside: unsafe archive member",
                     "passwd: symlink to '../../../etc/passwd' leaves the bundle",
                     "abs: symlink to '/etc/shadow' leaves the bundle",
                     "hard: hardlink to '/etc/hosts' leaves the bundle",
                     "inner: hardlink to 'tiny-1.2.3/model.onnx'; a bundle holds only regular files",
                     "null: device or special file"):
        assert expected in message, expected
    assert "8 problems" in message, message
    assert not (tmp_path.parent / "evil").exists() and not Path("/tmp/edgesmith-absolute-evil").exists()


def test_a_symlink_leaving_a_bundle_folder_is_refused(bundle):
    (bundle / "secrets").symlink_to("/etc/passwd")
    (bundle / "openvino" / "up").symlink_to("../../..")
    message = problems_of(bundle)
    assert "secrets: symlink to '/etc/passwd' leaves the bundle" in message
    assert "openvino/up: symlink to '../../..' leaves the bundle" in message


def test_a_file_that_is_not_a_tarball_is_a_clear_error(tmp_path):
    junk = tmp_path / "bundle.tar.gz"
    junk.write_bytes(b"\x1f\x8b\x08garbage")
    assert "is not a readable tar.gz archive" in problems_of(junk)


def test_diff_refuses_a_malformed_manifest(tmp_path, bundle, release):
    (bundle / "manifest.json").write_text("[]")
    with pytest.raises(VerifyError, match="manifest is unusable"):
        diff_bundles(release.bundle_dir, bundle)


def _edgesmith(*args: str) -> subprocess.CompletedProcess:
    code = "from pipeline.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_cli_verify_and_diff_exit_codes(release, bundle):
    ok = _edgesmith("verify", str(release.tarball))
    assert ok.returncode == 0 and "files match manifest.json" in ok.stdout, ok.stderr
    (bundle / "report.html").write_text("changed")
    bad = _edgesmith("verify", str(bundle))
    assert bad.returncode == 1 and "report.html: content changed" in bad.stdout + bad.stderr
    same = _edgesmith("diff", str(release.bundle_dir), str(release.tarball), "--fail-on-change")
    assert same.returncode == 0 and "Payload identical" in same.stdout
