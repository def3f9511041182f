"""Release bundles: the `release` stage, manifest, model card, reproducible tarball, verify and diff."""
