#!/usr/bin/env bash
# Make sure the four Fashion-MNIST files exist. Order: $FASHION_MNIST_DIR if set; the Debian package
# dataset-fashion-mnist (installed when apt-get is usable); otherwise the official files, downloaded into
# ~/.cache/edgesmith/fashion-mnist and checked against their SHA-256 before they are kept.
set -euo pipefail
FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
declare -A SHA=(
  [train-images-idx3-ubyte.gz]=b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
  [train-labels-idx1-ubyte.gz]=0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056
  [t10k-images-idx3-ubyte.gz]=cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa
  [t10k-labels-idx1-ubyte.gz]=8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05
)
DEBIAN_DIR=/usr/share/datasets/fashion-mnist

complete() { for f in "${FILES[@]}"; do [ -s "$1/$f" ] || return 1; done; }

if [ -n "${FASHION_MNIST_DIR:-}" ]; then
  complete "$FASHION_MNIST_DIR" && { echo "Fashion-MNIST: $FASHION_MNIST_DIR"; exit 0; }
  echo "FASHION_MNIST_DIR=$FASHION_MNIST_DIR does not hold the four Fashion-MNIST files (${FILES[*]})." >&2
  exit 2
fi
complete "$DEBIAN_DIR" && { echo "Fashion-MNIST: $DEBIAN_DIR"; exit 0; }

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "Installing the Debian package dataset-fashion-mnist ..."
  if (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }) \
     && complete "$DEBIAN_DIR"; then
    echo "Fashion-MNIST: $DEBIAN_DIR"; exit 0
  fi
  echo "apt-get could not install dataset-fashion-mnist; downloading the official files instead." >&2
fi

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/edgesmith/fashion-mnist"
mkdir -p "$CACHE"
BASE="${FASHION_MNIST_URL:-http://fashion-mnist.s3-website.eu-central-1.amazonaws.com}"
for f in "${FILES[@]}"; do
  [ -s "$CACHE/$f" ] && echo "${SHA[$f]}  $CACHE/$f" | sha256sum -c --quiet - 2>/dev/null && continue
  tmp="$CACHE/.$f.part"
  curl -fsSL --retry 3 -o "$tmp" "$BASE/$f" || { rm -f "$tmp"; echo "Could not download $BASE/$f. Install dataset-fashion-mnist or set FASHION_MNIST_DIR." >&2; exit 2; }
  echo "${SHA[$f]}  $tmp" | sha256sum -c --quiet - || { rm -f "$tmp"; echo "SHA-256 mismatch for $f: refusing it." >&2; exit 2; }
  mv "$tmp" "$CACHE/$f"
done
echo "Fashion-MNIST: $CACHE"
