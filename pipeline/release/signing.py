"""Signed bundles with OpenSSF model signing (PyPI `model-signing`, the `sign` extra), key-based and offline.

The signature, `bundle.sig` inside the bundle folder, is a Sigstore bundle (DSSE envelope) over the sha256 of
every file of the bundle, manifest.json included, made with an elliptic-curve private key (P-256/384/521).
`edgesmith verify BUNDLE --public-key K` checks it with the public half: that proves the files are the ones the
key's holder signed. Without a key, verify only proves that the files match manifest.json, which anyone who can
rewrite the bundle can regenerate (see docs/release.md).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ..cache import sha256_file
from ..errors import ConfigError, EdgesmithError
from .manifest import regular_files

SIGNATURE_NAME = "bundle.sig"


class SignatureError(EdgesmithError):
    """A bundle's signature is missing, malformed, or does not match its files or the given public key."""

    exit_code = 1


def _model_signing():
    try:
        import model_signing.hashing
        import model_signing.signing
        import model_signing.verifying
    except ImportError as exc:
        raise ConfigError(f"Signing and checking signatures needs the `model-signing` package ({exc}).",
                          "Install the sign extra: pip install -c constraints.txt -e '.[sign]' "
                          "(`make demo` and `make test` install it).") from None
    return model_signing


def _hashing(ms):
    # Strict: only the signature itself is left out; git metadata files are signed like any other file.
    return ms.hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME], ignore_git_paths=False)


def sign_bundle(bundle: Path, private_key: str | os.PathLike, password_env: str | None = None) -> Path:
    """Write bundle/bundle.sig over every other file of the bundle folder."""
    ms = _model_signing()
    key = Path(os.path.expanduser(private_key))
    if not key.is_file():
        raise ConfigError(f"release.sign.private_key {key} does not exist.",
                          "Point it at a PEM elliptic-curve private key, e.g. made with `openssl ecparam -name "
                          "prime256v1 -genkey -noout -out release.key` (keep it out of the repository).")
    password = None
    if password_env:
        password = os.environ.get(password_env)
        if password is None:
            raise ConfigError(f"release.sign.password_env names ${password_env}, which is not set.",
                              f"Export {password_env} with the key's passphrase, or use an unencrypted key.")
    signature = bundle / SIGNATURE_NAME
    try:
        ms.signing.Config().use_elliptic_key_signer(private_key=key, password=password) \
            .set_hashing_config(_hashing(ms)).sign(bundle, signature)
    except (ValueError, TypeError) as exc:  # not a PEM EC key, wrong passphrase, unsupported curve
        signature.unlink(missing_ok=True)
        raise ConfigError(f"Cannot sign with {key}: {exc}.",
                          "Use an unencrypted (or release.sign.password_env) PEM elliptic-curve private key on "
                          "P-256, P-384 or P-521.") from None
    return signature


class PublicKeyError(ConfigError):
    """The file given as --public-key is not a usable public key (exit 2: the key is the problem, not the bundle)."""


PUBLIC_KEY_EXPECTED = "an elliptic-curve (P-256, P-384 or P-521) public key in PEM"


def load_public_key(public_key: str | os.PathLike) -> Path:
    """The path of a usable EC public key PEM; PublicKeyError (exit 2) naming what was given and what is expected."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = Path(os.path.expanduser(public_key))
    hint = ("Pass the public half of the release signer's key, as its publisher gives it (made from the private key "
            "with `openssl ec -in release.key -pubout -out release.pub`).")

    def bad(what: str) -> PublicKeyError:
        return PublicKeyError(f"--public-key {key} is not a usable public key: {what}; expected {PUBLIC_KEY_EXPECTED}.",
                         hint)

    if not key.exists():
        raise bad("the file does not exist")
    if not key.is_file():
        raise bad("it is not a regular file")
    try:
        data = key.read_bytes()
    except OSError as exc:
        raise bad(f"it cannot be read ({exc.strerror or exc})") from None
    if not data.strip():
        raise bad("the file is empty")
    if b"PRIVATE KEY-----" in data:
        raise bad("it is a PRIVATE key (keep it secret; verify needs only the public half)")
    if b"-----BEGIN " not in data:
        raise bad(f"it is not PEM (no -----BEGIN line; {len(data)} bytes)")
    try:
        loaded = load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        first = data.strip().splitlines()[0].decode("ascii", "replace")[:60]
        raise bad(f"it is not a PEM public key ({first!r}: {str(exc).splitlines()[0][:120]})") from None
    except Exception as exc:  # noqa: BLE001 (unsupported algorithm errors from the backend)
        raise bad(f"it cannot be loaded as a public key ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(loaded, ec.EllipticCurvePublicKey):
        raise bad(f"it is a public key of the wrong algorithm, {_algorithm(loaded)}, not elliptic-curve (ECDSA)")
    if loaded.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise bad(f"it is on the curve {loaded.curve.name}, not P-256, P-384 or P-521")
    return key


def _algorithm(key) -> str:
    name = type(key).__name__.lstrip("_")
    for prefix in ("RSA", "DSA", "Ed25519", "Ed448", "X25519", "X448", "DH"):
        if name.upper().startswith(prefix.upper()):
            return prefix
    return name


def verify_signature(bundle_root: Path, public_key: str | os.PathLike) -> None:
    """Raise SignatureError unless bundle_root/bundle.sig is a valid signature by public_key over its files;
    PublicKeyError (exit 2) if public_key is not an EC public key in PEM."""
    ms = _model_signing()
    key = load_public_key(public_key)
    signature = bundle_root / SIGNATURE_NAME
    if not signature.is_file():
        raise SignatureError(f"The bundle has no {SIGNATURE_NAME}: it is not signed, so nothing proves who made it.",
                             "Do not deploy it where a signature is required; ask its publisher for a signed "
                             "release (release.sign in the build config).")
    try:
        ms.verifying.Config().use_elliptic_key_verifier(public_key=key).verify(bundle_root, signature)
    except Exception as exc:  # noqa: BLE001 (model_signing raises ValueError, JSON/protobuf and crypto errors)
        raise SignatureError(
            f"The signature of the bundle does not verify with {key}: {_reason(bundle_root, signature, exc)}.",
            "\nDo not deploy it: its files are not the ones the key's holder signed (or it was signed with "
            "another key).") from None


def signed_digests(signature: Path) -> Optional[dict[str, str]]:
    """{file: sha256} as the signature's in-toto statement lists them (the DSSE envelope's payload), or None if
    the signature cannot be read that way. Read without checking the signature: only to explain a failure."""
    try:
        envelope = json.loads(signature.read_text(encoding="utf-8"))["dsseEnvelope"]
        statement = json.loads(base64.b64decode(envelope["payload"], validate=True))
        resources = statement["predicate"]["resources"]
        digests = {}
        for item in resources:
            if str(item.get("algorithm", "sha256")).lower() != "sha256":
                return None
            digests[str(item["name"])] = str(item["digest"]).lower()
        return digests
    except (OSError, ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        return None


def signature_differences(bundle_root: Path, signature: Path) -> Optional[tuple[list[str], list[str], list[str]]]:
    """(changed, added, removed) files of bundle_root against the digests the signature lists; None if unreadable."""
    signed = signed_digests(signature)
    if signed is None:
        return None
    on_disk = {rel: sha256_file(bundle_root / rel) for rel in regular_files(bundle_root) if rel != SIGNATURE_NAME}
    changed = sorted(rel for rel in set(signed) & set(on_disk) if signed[rel] != on_disk[rel])
    return changed, sorted(set(on_disk) - set(signed)), sorted(set(signed) - set(on_disk))


def _reason(bundle_root: Path, signature: Path, exc: Exception) -> str:
    """Which files differ from the ones signed, from the signed statement itself; model_signing's text only if
    the statement cannot be read, or every file matches it (then the signature itself or the key is wrong)."""
    differences = signature_differences(bundle_root, signature)
    if differences is not None:
        changed, added, removed = differences
        parts = [f"changed since signing: {', '.join(changed)}"] if changed else []
        parts += [f"added since signing: {', '.join(added)}"] if added else []
        parts += [f"removed since signing: {', '.join(removed)}"] if removed else []
        if parts:
            return "; ".join(parts)
        return ("every file matches the digests the signature lists, so the signature itself does not verify "
                "with this key (signed with another key, or bundle.sig was altered)")
    text = " ".join((str(exc).strip() or type(exc).__name__).split())
    return f"{SIGNATURE_NAME} cannot be read as a model-signing statement ({text[:300]})"


def verify_tarball_signature(bundle, public_key: str | os.PathLike) -> None:
    """The same check on a tarball: its regular files (already checked safe by verify) are written to a private
    temporary folder, which is what model_signing hashes."""
    with tempfile.TemporaryDirectory(prefix="edgesmith-verify-") as tmp:
        root = Path(tmp)
        for rel, kind in sorted(bundle.kinds.items()):
            target = root / rel
            if kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
            elif kind == "file":
                target.parent.mkdir(parents=True, exist_ok=True)
                with bundle.tar.extractfile(bundle._members[rel]) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        verify_signature(root, public_key)
