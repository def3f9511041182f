"""Signed bundles with OpenSSF model signing (PyPI `model-signing`, the `sign` extra), key-based and offline.

The signature, `bundle.sig` inside the bundle folder, is a Sigstore bundle (DSSE envelope) over the sha256 of
every file of the bundle, manifest.json included, made with an elliptic-curve private key (P-256/384/521).
`edgesmith verify BUNDLE --public-key K` checks it with the public half: that proves the files are the ones the
key's holder signed. Without a key, verify only proves that the files match manifest.json, which anyone who can
rewrite the bundle can regenerate (see docs/release.md).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import ConfigError, EdgesmithError

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


def verify_signature(bundle_root: Path, public_key: str | os.PathLike) -> None:
    """Raise SignatureError unless bundle_root/bundle.sig is a valid signature by public_key over its files."""
    ms = _model_signing()
    key = Path(os.path.expanduser(public_key))
    if not key.is_file():
        raise ConfigError(f"Public key {key} does not exist.", "Pass the PEM public key of the release signer.")
    signature = bundle_root / SIGNATURE_NAME
    if not signature.is_file():
        raise SignatureError(f"The bundle has no {SIGNATURE_NAME}: it is not signed, so nothing proves who made it.",
                             "Do not deploy it where a signature is required; ask its publisher for a signed "
                             "release (release.sign in the build config).")
    try:
        ms.verifying.Config().use_elliptic_key_verifier(public_key=key).verify(bundle_root, signature)
    except Exception as exc:  # noqa: BLE001 (model_signing raises ValueError, JSON/protobuf and crypto errors)
        raise SignatureError(
            f"The signature of the bundle does not verify with {key}: {_reason(exc)}.",
            "\nDo not deploy it: its files are not the ones the key's holder signed (or it was signed with "
            "another key).") from None


def _reason(exc: Exception) -> str:
    """model_signing's mismatch text carries raw digest bytes: keep the file names it lists."""
    text = str(exc).strip() or type(exc).__name__
    # A name is quoted 'like this', or \'like this\' where model_signing nests the message in another repr.
    changed = sorted(set(re.findall(r"mismatch for \\?'([^'\\]+)\\?'", text)))
    added = re.findall(r"Extra files found in model '[^']*': ([^\"]+)\"", text)
    removed = re.findall(r"Missing files in model '[^']*': ([^\"]+)\"", text)
    if changed or added or removed:
        parts = [f"changed since signing: {', '.join(changed)}"] if changed else []
        parts += [f"added since signing: {', '.join(added)}"] if added else []
        parts += [f"removed since signing: {', '.join(removed)}"] if removed else []
        return "; ".join(parts)
    return text[:400]


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
