"""The leaderboard's HTML page in a real browser: headless Chromium driven by selenium.

Loads the page written by `refbench leaderboard --format html`, checks it fits one screen at
1366 px with compact rows, sorts a column, switches the protocol, opens a row's provenance and
checks what is shown. Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them);
where they are absent the test skips with that reason, except under REFBENCH_REQUIRE_BROWSER=1
(set by .ci/run), where their absence is a failure.

Run as a script, it writes the README's screenshot: `python tests/report/test_leaderboard_page.py docs/leaderboard-page.png`.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest


from _records import make_sentences

from refbench.eval import results
from refbench.report import leaderboard as lb

DATASET = "refcoco_unc"
SHA = "5e" * 32  # the submission hash the page must show
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def _record(root: Path, *, name: str, variant: str, run: str, split: str, seed: int, protocol: str = "original",
            synthetic: bool = False, submitted: bool = False, gain: int = 0) -> Path:
    sub = {"file": f"{name}-{split}.jsonl.gz", "format": "rle-jsonl", "sha256": SHA, "entries": 60,
           "note": "exported from the authors' checkpoint"} if submitted else None
    return results.write_record(
        root, dataset=DATASET, split=split, protocol=protocol, threshold=None if submitted else 0.35,
        model=results.ModelInfo(name=name, variant=variant, run="submitted" if submitted else run),
        data=results.DataInfo(manifest_sha256="cd" * 32, sentences_expected=60, synthetic=synthetic),
        sentences=make_sentences(60, seed=seed, gain=gain), command="refbench ...", samples=100,
        source="submitted" if submitted else "measured", submission=sub,
    )


def board(root: Path, synthetic: bool = False) -> Path:
    """A results root with measured, submitted, synthetic and input-protocol records."""
    for i, split in enumerate(("val", "testA", "testB")):
        _record(root, name="eavl", variant="tiny", run="quickstart-eavl", split=split, seed=10 + i, synthetic=True, gain=60)
        _record(root, name="cris", variant="tiny", run="quickstart-cris", split=split, seed=20 + i, synthetic=True, gain=10)
        _record(root, name="LAVT", variant="swin-b", run="", split=split, seed=30 + i, synthetic=synthetic,
                submitted=True, gain=40)
    if not synthetic:
        _record(root, name="eavl", variant="rn101", run="eavl-rn101", split="testB", seed=40, gain=30)
        _record(root, name="eavl", variant="rn101", run="eavl-rn101", split="testB", seed=41, protocol="input", gain=30)
    return root


def _driver(width: int, height: int):
    """A headless Chromium, or pytest.skip (pytest.fail under REFBENCH_REQUIRE_BROWSER=1) with the reason."""
    required = os.environ.get("REFBENCH_REQUIRE_BROWSER") == "1"
    give_up = pytest.fail if required else pytest.skip
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        give_up("selenium is not installed (pip install -e '.[test]')")
    browser = next((shutil.which(b) for b in CHROMIUM if shutil.which(b)), None)
    driver_bin = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    if browser is None or driver_bin is None:
        give_up("Chromium or chromedriver not found: apt-get install chromium chromium-driver (.ci/run installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    try:
        return webdriver.Chrome(service=Service(driver_bin), options=opts)
    except Exception as e:  # a browser that cannot start here (no display libraries, ...)
        give_up(f"Chromium does not start: {str(e).splitlines()[0]}")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = board(tmp_path_factory.mktemp("results"))
    out = root.parent / "leaderboard.html"
    lb.main(fmt="html", out=out, results=root)
    return out, root


@pytest.fixture(scope="module")
def browser():
    driver = _driver(1366, 900)
    yield driver
    driver.quit()


def _rows(driver) -> list[list[str]]:
    from selenium.webdriver.common.by import By

    return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")] for tr in driver.find_elements(By.CSS_SELECTOR, "#board tbody tr")]


def _header_keys(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [th.get_attribute("data-key") for th in driver.find_elements(By.CSS_SELECTOR, "#board thead th")]


def _column(driver, key: str) -> list[str]:
    i = _header_keys(driver).index(key)
    return [r[i] for r in _rows(driver)]


def test_page_in_a_browser(page, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    path, root = page
    browser.get(path.as_uri())
    dataset, protocol = Select(browser.find_element(By.ID, "dataset")), Select(browser.find_element(By.ID, "protocol"))
    assert dataset.first_selected_option.text == DATASET
    assert protocol.first_selected_option.text == "original"
    assert [o.text for o in protocol.options] == ["original", "input", "cris"]  # the papers' CRIS/EAVL rows are `cris`

    # numbers first and compact: one screen wide at 1366 px, rows one line high, no provenance in the row
    rows = _rows(browser)
    methods = {r[1] for r in rows}
    assert {"eavl", "cris", "LAVT"} <= methods
    assert browser.execute_script("return document.getElementById('board').getBoundingClientRect().right") <= 1366
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 1366
    heights = browser.execute_script("return Array.from(document.querySelectorAll('#board tbody tr')).map(r => r.getBoundingClientRect().height)")
    assert max(heights) < 32, heights
    text = browser.find_element(By.ID, "board").text
    assert ".json" not in text and SHA not in text and "Table 1" not in text
    assert not browser.find_element(By.ID, "provenance").is_displayed()

    # every source looks different: the colour bar of the first cell and the badges
    colours = {}
    for view in ("cris", "original"):  # the reported rows sit under `cris`, our records under `original`
        protocol.select_by_visible_text(view)
        for tr in browser.find_elements(By.CSS_SELECTOR, "#board tbody tr"):
            cls = tr.get_attribute("class")
            colours.setdefault(cls, tr.find_element(By.CSS_SELECTOR, "td.src").value_of_css_property("border-left-color"))
    assert {"src-measured synthetic", "src-submitted", "src-measured", "src-reported"} <= set(colours)
    assert len({colours[c] for c in ("src-measured", "src-submitted", "src-reported")}) == 3
    assert "synthetic" in browser.find_element(By.CSS_SELECTOR, "tr.synthetic td.src").text

    # sort by testB mIoU: first click descending, second ascending; empty cells stay last
    key = "testB mIoU (%, original)"
    browser.find_element(By.CSS_SELECTOR, f'#board th[data-key="{key}"]').click()
    values = _column(browser, key)
    numbers = [float(v) for v in values if v != "-"]
    assert numbers == sorted(numbers, reverse=True) and len(numbers) >= 4  # our records; the papers' rows are under cris
    assert values[: len(numbers)] == [f"{v:.2f}" for v in numbers]
    browser.find_element(By.CSS_SELECTOR, f'#board th[data-key="{key}"]').click()
    values = _column(browser, key)
    numbers = [float(v) for v in values if v != "-"]
    assert numbers == sorted(numbers) and all(v == "-" for v in values[len(numbers):])
    # the best synthetic submission beats the cris row on testB: the page shows the record's number
    lavt = results.load_record(next((root / DATASET / "testB").glob("LAVT-*.json")))
    assert f"{100 * lavt.metrics['mIoU']:.2f}" in values

    # switch the protocol: LAVT's published input-size numbers, EAVL's rows gone
    protocol.select_by_visible_text("input")
    rows = _rows(browser)
    assert {r[1] for r in rows} == {"LAVT", "eavl"}
    assert "testB oIoU (%, input)" in _header_keys(browser)
    assert "protocol input" in browser.find_element(By.ID, "protocol-note").text

    # a row's provenance, one click away
    protocol.select_by_visible_text("original")
    target = next(tr for tr in browser.find_elements(By.CSS_SELECTOR, "#board tbody tr.src-submitted"))
    target.find_element(By.CSS_SELECTOR, "button.info").click()
    panel = browser.find_element(By.ID, "provenance")
    assert panel.is_displayed()
    shown = panel.text
    assert SHA in shown and "rle-jsonl" in shown and "exported from the authors' checkpoint" in shown
    assert lavt.path.name in shown and "submitted" in shown and "original v1" in shown
    assert "selected" in target.get_attribute("class")
    protocol.select_by_visible_text("cris")
    assert {"EAVL", "CRIS"} <= {r[1] for r in _rows(browser)}
    reported = browser.find_element(By.CSS_SELECTOR, "#board tbody tr.src-reported")
    reported.click()
    shown = panel.text
    assert "published in" in shown and "the authors' code" in shown and "notes" in shown
    panel.find_element(By.CSS_SELECTOR, "button.close").click()
    assert not panel.is_displayed()


def screenshot(out: Path) -> None:
    """The README's picture: the page at 1366 px with a provenance panel open (synthetic rows only)."""
    import tempfile

    from PIL import Image
    from selenium.webdriver.common.by import By

    with tempfile.TemporaryDirectory() as tmp:
        root = board(Path(tmp) / "results", synthetic=True)
        html = Path(tmp) / "leaderboard.html"
        lb.main(dataset=DATASET, fmt="html", out=html, results=root)
        driver = _driver(1366, 860)
        try:
            driver.get(html.as_uri())
            driver.find_element(By.CSS_SELECTOR, '#board th[data-key="testB mIoU (%, original)"]').click()
            driver.find_element(By.CSS_SELECTOR, "#board tbody tr.src-submitted button.info").click()
            time.sleep(0.2)
            png = Path(tmp) / "shot.png"
            driver.save_screenshot(str(png))
        finally:
            driver.quit()
        Image.open(png).convert("RGB").quantize(colors=64).save(out, optimize=True)


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]))
