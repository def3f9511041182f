"""Signed bundles (OpenSSF model signing, a local EC key): a signed bundle and its tarball verify with the public
key; one changed byte of device_tests/conftest.py, re-manifested so that the manifest check alone passes, fails
the signature check; so do another signer's key and an unsigned bundle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("model_signing", reason="needs the sign extra (make venv installs it)")

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from pipeline.errors import ConfigError  # noqa: E402
from pipeline.release.bundle import ReleaseSources, assemble_release  # noqa: E402
from pipeline.release.manifest import MANIFEST_NAME, content_digest, file_entries, parse_manifest, write_manifest  # noqa: E402
from pipeline.release.signing import SIGNATURE_NAME, SignatureError, sign_bundle  # noqa: E402
from pipeline.release.verify import check_bundle, check_signature  # noqa: E402
from pipeline.stages.release import device_tests_dir  # noqa: E402

from .test_release import make_export_dir, make_validate_dir, release_info  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def keypair(folder: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return keypair(folder, "release"), keypair(folder, "stranger")


@pytest.fixture(scope="module")
def signed(tmp_path_factory, keys):
    (private, _), _ = keys
    up = tmp_path_factory.mktemp("up")
    sources = ReleaseSources(make_export_dir(up), make_validate_dir(up), device_tests_dir())
    return assemble_release(tmp_path_factory.mktemp("rel"), sources, release_info(),
                            sign=lambda bundle: sign_bundle(bundle, private))


def edgesmith(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def remanifest(bundle: Path) -> None:
    """What someone who can rewrite the bundle can do: list the changed files again, digests and all."""
    manifest = parse_manifest(json.loads((bundle / MANIFEST_NAME).read_text()))
    files = file_entries(bundle, exclude=(MANIFEST_NAME, SIGNATURE_NAME))
    write_manifest(bundle, manifest.model_copy(update={"files": files, "content_sha256": content_digest(files)}))


def test_a_signed_bundle_and_its_tarball_verify_with_the_public_key(signed, keys):
    (_, public), _ = keys
    assert (signed.bundle_dir / SIGNATURE_NAME).is_file() and (signed.bundle_dir / "device_tests" / "conftest.py").is_file()
    for path in (signed.bundle_dir, signed.tarball):
        check_bundle(path)
        check_signature(path, public)
    proc = edgesmith("verify", signed.tarball, "--public-key", public)
    assert proc.returncode == 0 and "signature bundle.sig verifies" in proc.stdout, proc.stdout + proc.stderr


def test_one_changed_byte_of_conftest_re_manifested_fails_only_the_signature(tmp_path, signed, keys):
    (_, public), _ = keys
    bundle = Path(shutil.copytree(signed.bundle_dir, tmp_path / "bundle"))
    conftest = bundle / "device_tests" / "conftest.py"
    data = bytearray(conftest.read_bytes())
    data[0] ^= 0x01
    conftest.write_bytes(bytes(data))
    remanifest(bundle)
    check_bundle(bundle)                          # the manifest alone cannot tell: it was rewritten to match
    plain = edgesmith("verify", bundle)
    assert plain.returncode == 0 and "not who made the bundle" in plain.stdout
    with pytest.raises(SignatureError, match="does not verify.*changed since signing: device_tests/conftest.py"):
        check_signature(bundle, public)
    proc = edgesmith("verify", bundle, "--public-key", public)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "does not verify" in proc.stdout and "Do not deploy" in proc.stdout and "Traceback" not in proc.stderr


def test_an_added_file_re_manifested_fails_the_signature(tmp_path, signed, keys):
    (_, public), _ = keys
    bundle = Path(shutil.copytree(signed.bundle_dir, tmp_path / "bundle"))
    (bundle / "device_tests" / "conftest_extra.py").write_text("import os\n")
    remanifest(bundle)
    check_bundle(bundle)
    with pytest.raises(SignatureError, match="added since signing: .*conftest_extra.py"):
        check_signature(bundle, public)


def test_another_key_or_no_signature_fails(tmp_path, signed, keys):
    _, (_, stranger) = keys
    with pytest.raises(SignatureError, match="does not verify"):
        check_signature(signed.bundle_dir, stranger)
    unsigned = Path(shutil.copytree(signed.bundle_dir, tmp_path / "unsigned"))
    (unsigned / SIGNATURE_NAME).unlink()
    check_bundle(unsigned)
    proc = edgesmith("verify", unsigned, "--public-key", stranger)
    assert proc.returncode == 1 and "not signed" in proc.stdout


def test_signing_with_a_missing_or_wrong_key_is_a_config_error(tmp_path, keys):
    (_, public), _ = keys
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "x").write_text("x")
    with pytest.raises(ConfigError, match="does not exist"):
        sign_bundle(bundle, tmp_path / "nope.key")
    with pytest.raises(ConfigError, match="Cannot sign"):
        sign_bundle(bundle, public)           # a public key is not a private key
    assert not (bundle / SIGNATURE_NAME).exists()


def test_the_release_stage_signs_when_the_config_says_so(tmp_path, keys):
    from pipeline.cache import BuildCache
    from pipeline.config import parse_config
    from pipeline.progress import ProgressDisplay
    from pipeline.stage import StageContext
    from pipeline.stages.release import ReleaseStage

    from .test_release import release_config
    from .test_release_stage import upstream

    (private, public), _ = keys
    raw = release_config()
    raw["release"]["sign"] = {"private_key": str(private)}
    cfg = parse_config(raw)
    cache = BuildCache(tmp_path / "builds" / cfg.build.name)
    inputs = upstream(cache.root, tmp_path / "scratch")
    with cache.staging("release", "r" * 64) as tmp:
        metrics = ReleaseStage().run(StageContext(cfg, tmp, inputs, ProgressDisplay(enabled=False), "r" * 64))
        tarball = tmp / metrics["tarball"]
        assert metrics["signed"] is True and (tmp / "bundle" / SIGNATURE_NAME).is_file()
        for path in (tmp / "bundle", tarball):
            check_bundle(path)
            check_signature(path, public)
