"""report.html is self-contained and renders in headless Chromium; any stage can add sections."""

import base64
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pipeline.cache import PROJECT_ROOT
from pipeline.report import Section, esc, figure_html, html_table, md_table, write_report


def demo_sections() -> list[Section]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1, 2], [0.9, 0.8, 0.85], "o-", color="tab:red")
    rows = [["model.onnx", 0.91, 0.0213], ["<script>alert(1)</script>", 0.5, 1234.5]]
    headers = ["artifact", "top-1", "p50 ms"]
    return [Section("Accuracy", html_table(headers, rows), md_table(headers, rows)),
            Section("Distillation (added by another stage)", figure_html(fig, "loss curve"), "see the HTML")]


def test_report_is_self_contained_and_escaped(tmp_path):
    html_path, md_path = write_report(tmp_path, "Report <1>", demo_sections(), subtitle="demo")
    html = html_path.read_text()
    assert "<script>alert(1)</script>" not in html and esc("<script>alert(1)</script>") in html
    assert not re.search(r'(src|href)="(https?:|//)', html)  # nothing fetched from anywhere
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 1 and base64.b64decode(images[0])[:8] == b"\x89PNG\r\n\x1a\n"
    md = md_path.read_text()
    assert "## Accuracy" in md and "## Distillation (added by another stage)" in md and "| model.onnx | 0.91 |" in md
    assert "1,234" in html  # large numbers are printed readably
    assert not list(tmp_path.glob(".*tmp"))  # written through temporary files, none left behind


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian chromium (scripts/ensure_test_deps.sh)")
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    html_path, _ = write_report(tmp_path, "Render check", demo_sections())
    png = tmp_path / "shot.png"
    subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "screenshot_report.py"), str(html_path), str(png),
                    "--height", "900"], check=True, capture_output=True, timeout=180)
    shot = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert shot.shape[:2] == (900, 1200)
    # the embedded figure rendered: its red line is on the page (text alone is black/grey/blue)
    red = (shot[..., 0] > 180) & (shot[..., 1] < 90) & (shot[..., 2] < 90)
    assert red.sum() > 50
    assert (shot.std(axis=(0, 1)) > 10).all()  # not a blank page
