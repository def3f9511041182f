#!/usr/bin/env python3
"""Render an HTML report in headless Chromium and save a PNG screenshot (to check that report.html is
self-contained and renders: network access is disabled, so any external resource would be missing).

    python scripts/screenshot_report.py builds/<name>/validate-<key>/report.html out.png [--height 2400]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def screenshot(html: Path, png: Path, width: int = 1200, height: int = 2400, timeout: float = 90) -> Path:
    browser = chromium()
    if browser is None:
        raise SystemExit("chromium is not installed (Debian: apt-get install chromium; or run scripts/ensure_test_deps.sh)")
    with tempfile.TemporaryDirectory() as profile:
        args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png.resolve()}",
                f"--window-size={width},{height}", html.resolve().as_uri()]
        subprocess.run(args, check=True, capture_output=True, timeout=timeout)
    if not png.is_file():
        raise SystemExit(f"chromium wrote no screenshot for {html}")
    return png


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("html", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--height", type=int, default=2400)
    a = p.parse_args()
    print(screenshot(a.html, a.png, a.width, a.height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
