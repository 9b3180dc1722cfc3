"""<output>/report.html: one self-contained page, rendered by a real headless browser."""
from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import make_image
from tlpipe.cli import app

runner = CliRunner()
SECTIONS = ["Data", "Strategy", "Trials", "Learning curves", "Validation metrics", "Confusion matrix and reliability",
            "Most confident mistakes", "Label suspects", "Would more data pay?", "Timings"]


class _Page(HTMLParser):
    """The page's <h2> headings, <img> sources and any address it would fetch."""

    def __init__(self):
        super().__init__()
        self.headings, self.images, self.fetches, self._in_h2 = [], [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._in_h2 = tag == "h2"
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for name in ("src", "href"):
            if attrs.get(name, "").startswith(("http:", "https:", "//")):
                self.fetches.append(attrs[name])

    def handle_data(self, data):
        if self._in_h2 and data.strip():
            self.headings.append(data.strip())


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two look-alike classes (noisy greys a shade apart) and a tuned linear fit: some mistakes to show."""
    root = tmp_path_factory.mktemp("data") / "greys"
    for c, (name, level) in enumerate([("dark <b>", 118), ("light & co", 138)]):
        for k in range(14):
            make_image(root / name / f"{k}.jpg", (level, level, level), size=(48, 48), noise=60, seed=[c, k])
    out = tmp_path_factory.mktemp("fit") / "out"
    result = runner.invoke(app, ["fit", str(root), "-o", str(out), "--strategy", "linear", "--trials", "3", "--workers", "0"])
    assert result.exit_code == 0, result.output
    return root, out


def test_the_report_is_self_contained_with_every_section(fitted):
    _, out = fitted
    page = _Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    assert page.headings == SECTIONS
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert page.fetches == []
    text = (out / "report.html").read_text(encoding="utf-8")
    assert "dark &lt;b&gt;" in text and "light &amp; co" in text  # class names are data, escaped
    assert "95% interval" in text and "ECE" in text
    summary = __import__("json").loads((out / "summary.json").read_text())
    wrong = round((1 - summary["val_accuracy"]) * summary["splits"]["val"])
    mistakes = text.split("<h2>Most confident mistakes</h2>")[1].split("<h2>")[0]
    assert wrong > 0 and mistakes.count("<figcaption>") == min(wrong, 12)  # the grid holds the val mistakes, as thumbnails


def test_tlpipe_report_rebuilds_it_from_the_output_folder(fitted, tmp_path):
    _, out = fitted
    written = (out / "report.html").read_text(encoding="utf-8")
    (out / "report.html").unlink()
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    rebuilt = (out / "report.html").read_text(encoding="utf-8")
    summary = __import__("json").loads((out / "summary.json").read_text())
    assert f"validation accuracy <b>{summary['val_accuracy']:.3f}</b>" in rebuilt
    assert rebuilt == written  # the page the fit wrote, from the folder alone
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "has no summary.json" in result.stderr


def test_the_report_renders_in_headless_chromium(fitted, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    _, out = fitted
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,2400",
                    f"--screenshot={shot}", (out / "report.html").resolve().as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text, tables and figures drawn, not a blank page
