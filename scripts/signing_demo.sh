#!/usr/bin/env bash
# Signing demo on a copy of a release bundle folder: sign it, verify with the public key, change one byte of
# device_tests/conftest.py and re-manifest it (what someone able to rewrite the bundle can do), verify again.
#     bash scripts/signing_demo.sh builds/<name>/release/bundle [.venv/bin/python]
set -uo pipefail
SRC=${1:?bundle folder}
PY=${2:-.venv/bin/python}
WORK=$(mktemp -d)
cp -r "$SRC" "$WORK/bundle"
openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/release.key" 2>/dev/null
openssl ec -in "$WORK/release.key" -pubout -out "$WORK/release.pub" 2>/dev/null
echo "== sign"
"$PY" -c "from pipeline.release.signing import sign_bundle; print(sign_bundle(__import__('pathlib').Path('$WORK/bundle'), '$WORK/release.key'))"
echo "== verify the signed bundle with the public key"
"$PY" -m pipeline.cli verify "$WORK/bundle" --public-key "$WORK/release.pub"; echo "exit $?"
echo "== one byte of device_tests/conftest.py changed, manifest regenerated to match"
"$PY" - "$WORK/bundle" <<'PYEOF'
import json, sys
from pathlib import Path
from pipeline.release.manifest import MANIFEST_NAME, content_digest, file_entries, parse_manifest, write_manifest
from pipeline.release.signing import SIGNATURE_NAME
b = Path(sys.argv[1]); f = b / "device_tests" / "conftest.py"
data = bytearray(f.read_bytes()); data[0] ^= 1; f.write_bytes(bytes(data))
m = parse_manifest(json.loads((b / MANIFEST_NAME).read_text()))
files = file_entries(b, exclude=(MANIFEST_NAME, SIGNATURE_NAME))
write_manifest(b, m.model_copy(update={"files": files, "content_sha256": content_digest(files)}))
print("changed byte 0 of", f)
PYEOF
echo "== verify without the key (manifest only)"
"$PY" -m pipeline.cli verify "$WORK/bundle"; echo "exit $?"
echo "== verify with the public key"
"$PY" -m pipeline.cli verify "$WORK/bundle" --public-key "$WORK/release.pub"; echo "exit $?"
rm -rf "$WORK"
