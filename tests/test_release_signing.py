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


def test_a_tampered_model_re_manifested_names_both_files_from_the_signed_statement(tmp_path, signed, keys):
    """The verdict comes from the signed in-toto statement compared with the files' sha256, not from
    model_signing's exception text: the model and the regenerated manifest both differ from what was signed."""
    (_, public), _ = keys
    bundle = Path(shutil.copytree(signed.bundle_dir, tmp_path / "bundle"))
    model = bundle / "model.int8.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0x01
    model.write_bytes(bytes(data))
    remanifest(bundle)
    check_bundle(bundle)
    with pytest.raises(SignatureError) as info:
        check_signature(bundle, public)
    assert "changed since signing: manifest.json, model.int8.onnx." in str(info.value)
    assert "added since signing" not in str(info.value) and "removed since signing" not in str(info.value)
    (bundle / "labels.txt").unlink()
    remanifest(bundle)
    proc = edgesmith("verify", bundle, "--public-key", public)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "changed since signing: manifest.json, model.int8.onnx; removed since signing: labels.txt" in proc.stdout


def test_the_signed_statement_lists_every_file_with_its_sha256(signed):
    from pipeline.cache import sha256_file
    from pipeline.release.signing import signed_digests

    digests = signed_digests(signed.bundle_dir / SIGNATURE_NAME)
    assert digests is not None and MANIFEST_NAME in digests and SIGNATURE_NAME not in digests
    assert digests["model.int8.onnx"] == sha256_file(signed.bundle_dir / "model.int8.onnx")


def test_another_signers_key_says_the_files_match_but_the_signature_does_not(signed, keys):
    _, (_, stranger) = keys
    with pytest.raises(SignatureError, match="every file matches the digests the signature lists"):
        check_signature(signed.bundle_dir, stranger)


def _bad_keys(folder: Path, keys) -> dict[str, tuple[Path, str]]:
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    (private, _), _ = keys
    rsa_pub = folder / "rsa.pub"
    rsa_pub.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    ed_pub = folder / "ed25519.pub"
    ed_pub.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    empty = folder / "empty.pub"
    empty.write_bytes(b"")
    garbage = folder / "garbage.pub"
    garbage.write_bytes(b"not a key at all\n")
    broken = folder / "broken.pub"
    broken.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    return {"private": (private, "PRIVATE key"), "rsa": (rsa_pub, "wrong algorithm, RSA, not elliptic-curve"),
            "ed25519": (ed_pub, "wrong algorithm, Ed25519, not elliptic-curve"), "empty": (empty, "empty"),
            "not pem": (garbage, "not PEM"), "broken pem": (broken, "not a PEM public key"),
            "missing": (folder / "nope.pub", "does not exist")}


@pytest.mark.parametrize("case", ["private", "rsa", "ed25519", "empty", "not pem", "broken pem", "missing"])
def test_a_bad_public_key_is_a_key_error_exit_2(tmp_path, signed, keys, case):
    from pipeline.errors import EdgesmithError

    path, says = _bad_keys(tmp_path, keys)[case]
    with pytest.raises(EdgesmithError, match=says) as info:
        check_signature(signed.bundle_dir, path)
    assert info.value.exit_code == 2 and "elliptic-curve (P-256, P-384 or P-521) public key in PEM" in str(info.value)
    proc = edgesmith("verify", signed.bundle_dir, "--public-key", path)
    assert proc.returncode == 2, (case, proc.returncode, proc.stdout + proc.stderr)
    out = proc.stdout + proc.stderr
    assert f"--public-key {path}" in out and "is not a usable public key" in out and says in out, out
    assert "signed" not in out.split("expected")[0] and "Do not deploy" not in out, out
