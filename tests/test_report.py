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
        for k in range(20):  # 32 train images: enough for a learning curve
            name_as_cameras_write_it = f"IMG_20240517_1435{k:02d}_frontcamera-left_exposure-auto.jpg"  # long, no spaces
            make_image(root / name / name_as_cameras_write_it, (level, level, level), size=(48, 48), noise=60, seed=[c, k])
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
    more_data = text.split("<h2>Would more data pay?</h2>")[1].split("<h2>")[0]
    assert 'alt="the val score against the train images, measured and forecast" src="data:image/png;base64,' in more_data
    assert (out / "data_curve.png").is_file()


def test_tlpipe_report_rebuilds_it_from_the_output_folder(fitted, tmp_path):
    _, out = fitted
    written = (out / "report.html").read_text(encoding="utf-8")
    (out / "report.html").unlink()
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    rebuilt = (out / "report.html").read_text(encoding="utf-8")
    summary = __import__("json").loads((out / "summary.json").read_text())
    assert f"val accuracy <b>{summary['val_accuracy']:.3f}</b>" in rebuilt  # the page leads with the fit's score
    assert rebuilt == written  # the page the fit wrote, from the folder alone
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "has no summary.json" in result.stderr


CAPTION_CHECK = """<script>
const figures = [...document.querySelectorAll("figure")], captions = figures.map(f => f.querySelector("figcaption"));
let bad = 0;
captions.forEach((c, i) => {  // text wider than its caption box, or a box beyond its figure
  const box = c.getBoundingClientRect(), figure = figures[i].getBoundingClientRect();
  if (c.scrollWidth > c.clientWidth + 1 || box.left < figure.left - 1 || box.right > figure.right + 1) bad++;
});
const boxes = captions.map(c => c.getBoundingClientRect());
boxes.forEach((a, i) => boxes.slice(i + 1).forEach(b => {
  if (a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom) bad++;
}));
document.body.dataset.captions = captions.length; document.body.dataset.unreadable = bad;
</script>"""


def test_the_report_renders_in_headless_chromium_with_readable_captions(fitted, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    _, out = fitted
    shot, checked = tmp_path / "report.png", tmp_path / "checked.html"
    render = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,2400"]
    subprocess.run([*render, f"--screenshot={shot}", (out / "report.html").resolve().as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text, tables and figures drawn, not a blank page
    checked.write_text((out / "report.html").read_text(encoding="utf-8").replace("</body>", CAPTION_CHECK + "</body>"),
                       encoding="utf-8")
    dom = subprocess.run([*render, "--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120).stdout
    captions = int(dom.split('data-captions="')[1].split('"')[0])
    assert captions > 0 and 'data-unreadable="0"' in dom, dom[dom.find("<body"):][:200]  # at the page's width


def test_the_trials_table_shows_short_parameters_and_says_how_many_trials_it_left_out(fitted, tmp_path, monkeypatch):
    import re

    from tlpipe.run import html_report

    _, out = fitted
    copy = shutil.copytree(out, tmp_path / "out")
    monkeypatch.setattr(html_report, "TRIALS_SHOWN", 2)
    trials = html_report.write_html_report(copy).read_text(encoding="utf-8").split("<h2>Trials</h2>")[1].split("<h2>")[0]
    values = re.findall(r"C=([0-9.e+-]+)", trials)
    assert len(values) == 2 and all(float(v) == float(f"{float(v):.3g}") for v in values)  # 3 significant digits
    assert "The best 2 of 3 trials; all are in <code>tuning/trials.csv</code>" in trials
