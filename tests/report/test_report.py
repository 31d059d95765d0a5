"""The run report in a real headless browser: Chromium from the distro's packages (installed
here when missing) loads the report of a small real run - random weights, a shard with broken
samples - offline; its sections, plots and thumbnails are there, the embedded images decode,
the screenshot is not blank and the random-weights banner shows."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import tiny_cfg
from tmars_ray.report.report import render_report, write_report

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--disable-dev-shm-usage",
    "--window-size=1400,3000",
]
SECTIONS = (
    "summary",
    "categories",
    "plots",
    "gallery-kept",
    "gallery-text",
    "gallery-failed",
    "reproduce",
)


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Chromium from the distro (Debian: `chromium`), installed with apt-get when missing."""
    found = _find_chromium()
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip("chromium is not installed and apt-get is not available to install it")
    sudo = (
        []
        if os.geteuid() == 0
        else ([shutil.which("sudo"), "-n"] if shutil.which("sudo") else None)
    )
    if sudo is None:
        pytest.skip("chromium is not installed and installing it needs root (no sudo)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [
        *sudo,
        apt,
        "-o",
        "DPkg::Lock::Timeout=300",
        "install",
        "-y",
        "--no-install-recommends",
        "chromium",
    ]
    res = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run([*sudo, apt, "update"], env=env, capture_output=True, timeout=600)
        res = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
    found = _find_chromium()
    assert found, f"apt-get install chromium failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return found


def _broken_shard(path: Path) -> None:
    """A shard whose samples all fail: undecodable bytes, no caption, zero-byte image."""
    ok_jpeg = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(ok_jpeg, format="JPEG")
    members = [
        ("bad-decode.jpg", b"this is not an image"),
        ("bad-decode.txt", b"a cat"),
        ("bad-nocap.jpg", ok_jpeg.getvalue()),
        ("bad-empty.jpg", b""),
        ("bad-empty.txt", b"a dog"),
    ]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def report_run(ray_session, tmp_path_factory):
    """A small real run with random weights and three failed samples; the job writes the report."""
    from tmars_ray.devtools.synth import write_pool
    from tmars_ray.job import run

    base = tmp_path_factory.mktemp("report")
    pool = base / "pool"
    write_pool(str(pool), samples=6, shards=1, seed=11)
    _broken_shard(pool / "00000001.tar")
    cfg = tiny_cfg(
        input=str(pool),
        output=str(base / "run"),
        clip_pretrained="none",
        allow_random_weights=True,
        report=True,
        max_failures=0.5,
    )
    result = run(cfg)
    assert result.exit_code == 0, result.message
    return cfg, result


# Appended to a copy of the report (which has no scripts of its own): once the page has loaded,
# the browser itself says how many <img> it decoded and laid out with a non-zero size.
PROBE = """<script>window.addEventListener("load", function () {
  var imgs = Array.from(document.images);
  var bad = imgs.filter(function (i) {
    return !(i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0); });
  document.documentElement.setAttribute("data-probe", imgs.length + " images, " + bad.length + " broken");
});</script>"""


@pytest.fixture(scope="module")
def browser_view(report_run, chromium, tmp_path_factory):
    """(dumped DOM, browser log, screenshot pixels) of the job's report in headless Chromium."""
    cfg, result = report_run
    html = Path(result.summary["report"])
    work = tmp_path_factory.mktemp("chromium")
    probe = work / "probe.html"
    probe.write_text(html.read_text().replace("</body>", PROBE + "</body>"))
    shot = work / "shot.png"
    common = [
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={work / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    dom = subprocess.run(
        [*common, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-3000:]
    snap = subprocess.run(
        [*common, f"--screenshot={shot}", html.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert snap.returncode == 0 and shot.exists(), snap.stderr[-3000:]
    return dom.stdout, dom.stderr + snap.stderr, np.asarray(Image.open(shot).convert("RGB"))


class _Images(HTMLParser):
    """Every <img> (class, src) and every URL-bearing attribute of the page."""

    def __init__(self):
        super().__init__()
        self.images: list[tuple[str, str]] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.images.append((a.get("class") or "", a.get("src") or ""))
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def _parse(html: str) -> _Images:
    p = _Images()
    p.feed(html)
    return p


def _decode_data_uri(uri: str) -> Image.Image:
    head, _, payload = uri.partition(",")
    assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head
    img = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    img.load()
    assert img.format == ("PNG" if "png" in head else "JPEG")
    return img


def test_job_writes_a_self_contained_report(report_run):
    cfg, result = report_run
    assert result.summary["report"] == f"{cfg.output}/report.html"
    assert "report:" in result.message and result.summary["random_weights"] is True
    page = _parse(Path(result.summary["report"]).read_text())
    # nothing to fetch: every image is inline, no scripts, no stylesheets to load
    assert page.urls and all(u.startswith(("data:image/", "#")) for u in page.urls), page.urls
    assert not page.tags & {"script", "link", "iframe"}


def test_browser_loads_the_page_with_all_sections(browser_view):
    dom, log, _ = browser_view
    assert dom.rstrip().endswith("</html>")
    # no console errors (page errors are logged as CONSOLE lines), every image decoded
    assert not [line for line in log.splitlines() if ":CONSOLE" in line], log[-3000:]
    probe = re.search(r'data-probe="(\d+) images, (\d+) broken"', dom)
    assert probe, "the load probe did not run"
    assert int(probe.group(1)) >= 12 and probe.group(2) == "0"
    for section in SECTIONS:
        assert f'id="{section}"' in dom, section
    assert 'id="random-weights-banner"' in dom and "RANDOM CLIP WEIGHTS" in dom
    # summary numbers, statuses of the broken shard, the command and the config as YAML
    assert "decode_error" in dom and "no_caption" in dom and "empty_image" in dom
    assert "tmars_score" in dom and "clip_model:" in dom and "mask_ring: 3" in dom


def test_plots_and_thumbnails_are_real_images(browser_view):
    dom, _, _ = browser_view
    images = _parse(dom).images
    plots = [src for cls, src in images if cls == "plot"]
    thumbs = [src for cls, src in images if cls == "thumb"]
    assert len(plots) == 4  # three histograms and the scatter
    for src in plots:
        img = _decode_data_uri(src)
        assert img.width > 300 and img.height > 200
        assert np.asarray(img.convert("L")).std() > 5  # not an empty canvas
    # kept + most-text galleries: original and masked thumbnail per tile
    assert len(thumbs) >= 8 and len(thumbs) % 2 == 0
    for src in thumbs:
        img = _decode_data_uri(src)
        assert 16 <= max(img.size) <= 256
    # the undecodable and the empty image get a placeholder, not a broken <img>
    assert dom.count("image unavailable") >= 2


def test_screenshot_is_not_blank(browser_view):
    _, _, pixels = browser_view
    assert pixels.shape[0] >= 2000 and pixels.shape[1] >= 1000
    assert pixels.std() > 20
    top = pixels[:400].reshape(-1, 3)  # the banner is loud: lots of strong red at the top
    red = (top[:, 0] > 150) & (top[:, 1] < 60) & (top[:, 2] < 60)
    assert red.mean() > 0.05
    # the galleries (lower half) hold colourful thumbnails, not only text on white
    low = pixels[1500:].reshape(-1, 3).astype(int)
    assert (low.max(axis=1) - low.min(axis=1) > 60).mean() > 0.02


def _copy_run(run: str, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _section(html: str, sid: str) -> str:
    start = html.index(f'<section id="{sid}"')
    return html[start : html.index("</section>", start)]


def test_no_banner_without_random_weights_and_the_removed_gallery(report_run, tmp_path):
    """Real weights: no banner. Samples T-MARS removed but with the best clip_scores (made so
    here; random weights rarely give any) fill the 'removed by T-MARS, kept by CLIP' gallery."""
    cfg, _ = report_run
    run = _copy_run(cfg.output, tmp_path / "run")
    summary_path = run / "keep" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary.update(random_weights=False, warning=None)
    summary_path.write_text(json.dumps(summary))
    kept = set(pq.read_table(run / "keep" / "keep.parquet")["uid"].to_pylist())
    removed = 0
    for f in (run / "scores").rglob("*.parquet"):
        t = pq.read_table(f)
        rows = t.select(["uid", "status", "clip_score"]).to_pylist()
        hit = [r["status"] == "ok" and r["uid"] not in kept for r in rows]
        removed += sum(hit)
        clip = pa.array([0.9 if h else r["clip_score"] for h, r in zip(hit, rows)], pa.float32())
        pq.write_table(t.set_column(t.schema.get_field_index("clip_score"), "clip_score", clip), f)
    assert 0 < removed <= 12
    html = render_report(str(run))
    assert "random-weights-banner" not in html and 'id="gallery-kept"' in html
    gallery = _section(html, "gallery-removed")
    assert gallery.count('class="tile') == removed
    assert gallery.count('class="thumb"') == 2 * removed


def test_missing_source_shards_and_sampling_do_not_break_the_report(report_run, tmp_path):
    """Thumbnails of a moved pool become placeholders; a sample smaller than the run still
    gives every section."""
    cfg, _ = report_run
    run = _copy_run(cfg.output, tmp_path / "run")
    for f in (run / "scores").rglob("*.parquet"):
        t = pq.read_table(f)
        gone = pa.array([f"/nonexistent/{i}.tar" for i in range(t.num_rows)], pa.string())
        pq.write_table(t.set_column(t.schema.get_field_index("shard"), "shard", gone), f)
    out = write_report(str(run), str(tmp_path / "r.html"))
    html = Path(out).read_text()
    assert "source shard unreadable" in html and 'class="thumb"' not in html
    html = render_report(str(run), max_rows=5)
    assert "deterministic sample of" in html
    assert all(f'id="{s}"' in html for s in ("summary", "plots", "reproduce"))
    # the same rows every time: only the generation time differs
    again = render_report(str(run), max_rows=5)
    stamp = re.compile(r"generated [0-9T:+-]+")
    assert stamp.sub("", html) == stamp.sub("", again)


def test_category_shares_and_the_demo_model_banner(report_run, tmp_path):
    """A demo pool records each sample's category: the report reads them back from the shards
    and shows the kept share per category for T-MARS and CLIP-score at the run's fraction,
    matching a count made here from the score table, the keep-list and the shards' json. A run
    scored with the demo model says so in a banner and the overview."""
    from tmars_ray.report.report import DEMO_MODEL_NOTE
    from tmars_ray.run.manifest import RunState

    cfg, _ = report_run
    run = _copy_run(cfg.output, tmp_path / "run")
    scores = pa.concat_tables(pq.read_table(f) for f in sorted((run / "scores").rglob("*.parquet")))
    ok = [r for r in scores.to_pylist() if r["status"] == "ok"]
    kept = set(pq.read_table(run / "keep" / "keep.parquet")["uid"].to_pylist())
    cats = {}
    with tarfile.open(Path(cfg.input) / "00000000.tar") as tar:
        for m in tar:
            if m.name.endswith(".json"):
                meta = json.loads(tar.extractfile(m).read())
                cats[meta["uid"]] = meta["category"]
    html = render_report(RunState.load(str(run)))  # a RunState works as well as a URL
    shown = {
        m[0]: (int(m[1]), float(m[2]), float(m[3]))
        for m in re.findall(
            r"<tr><td>(\w+)</td><td>(\d+)</td>\s*<td>([\d.]+)%</td>\s*<td>([\d.]+)%</td></tr>",
            _section(html, "categories"),
        )
    }
    assert set(shown) == {cats[r["uid"]] for r in ok}
    for cat, (n, tmars_pct, _) in shown.items():
        rows = [r for r in ok if cats[r["uid"]] == cat]
        share = sum(r["uid"] in kept for r in rows) / len(rows)  # the run's method is T-MARS
        assert n == len(rows) and tmars_pct == round(100 * share, 1)
    assert "demo-model-banner" not in html

    summary_path = run / "keep" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["models"] = ["tmars-demo/tmars-demo"]
    summary_path.write_text(json.dumps(summary))
    html = render_report(str(run))
    assert 'id="demo-model-banner"' in html and html.count(DEMO_MODEL_NOTE) >= 2
