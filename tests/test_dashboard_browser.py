"""The dashboard in a real browser: ``dse dashboard`` served as users start it, read by Debian's headless
Chromium (``make browser`` installs it), on the real study of conftest's ``sqlite_study`` and on a study a
running driver is filling. Screenshots land in ``artifacts/dashboard/`` (``$DSE_TEST_ARTIFACTS``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import optuna
import pytest
import yaml

from dse.cli import main
from dse.study import full_results
from helpers import ROOT, chromium, free_port, small_spec, start_dashboard, stop

ARTIFACTS = Path(os.environ.get("DSE_TEST_ARTIFACTS", ROOT / "artifacts" / "dashboard"))
REFRESH_S = 5  # dashboard.app.REFRESH_S, the default refresh interval

pytestmark = pytest.mark.skipif(not Path("/usr/bin/chromedriver").exists(),
                                reason="needs Debian's chromium and chromium-driver: run `make browser`")


def wait_for(condition, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def metric(browser, label: str) -> str | None:
    """The value of the page's ``st.metric`` called ``label``."""
    from selenium.webdriver.common.by import By

    for element in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stMetric"]'):
        lines = element.text.splitlines()
        if lines and lines[0] == label and len(lines) > 1:
            return lines[1]
    return None


def pareto_chart_drawn(browser) -> bool:
    """Plotly has drawn the Pareto chart: its title and at least one marker are in the SVG."""
    return bool(browser.execute_script(
        "return [...document.querySelectorAll('.js-plotly-plot')].some(p => p.querySelector('.gtitle') &&"
        " p.querySelector('.gtitle').textContent === 'Pareto front' && p.querySelectorAll('.point').length > 0)"))


@pytest.fixture
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def test_page_shows_the_study_and_its_pareto_chart(sqlite_study, browser, tmp_path):
    from selenium.webdriver.common.by import By

    study, url = sqlite_study
    port = free_port()
    server = start_dashboard(url, port, tmp_path / "dashboard.log")
    try:
        started = time.monotonic()
        browser.get(f"http://127.0.0.1:{port}/?view=Study&study={study.study_name}")
        wait_for(lambda: pareto_chart_drawn(browser), 90, "the Pareto chart")
        print(f"Pareto chart drawn {time.monotonic() - started:.1f} s after the page was requested")
        text = browser.find_element(By.TAG_NAME, "body").text
        assert study.study_name in text and "Trials" in text
        assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
        done = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
        assert metric(browser, "complete") == str(done)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        time.sleep(1)  # let the other charts finish drawing for the picture
        assert browser.save_screenshot(str(ARTIFACTS / "study-view.png"))
        # the trial view of a promoted trial; its export button downloads what `dse export --trial N` writes
        number = min(full_results(study))
        browser.get(f"http://127.0.0.1:{port}/?view=Trial&study={study.study_name}&trial={number}")
        wait_for(lambda: f"trial {number}" in browser.find_element(By.TAG_NAME, "body").text
                 and "Plan map" in browser.find_element(By.TAG_NAME, "body").text, 60, "the plan map")
        assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
        assert browser.save_screenshot(str(ARTIFACTS / "trial-view.png"))
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        browser.find_element(By.CSS_SELECTOR, '[data-testid="stDownloadButton"] button').click()
        bundle = wait_for(lambda: [p for p in downloads.glob("*.zip")], 30, "the downloaded bundle")[0]
        assert bundle.name == f"{study.study_name}-trial{number}.zip"
        assert main(["export", study.study_name, "--storage", url, "--trial", str(number), "--out",
                     str(tmp_path / "cli")]) == 0
        with zipfile.ZipFile(bundle) as archive:
            assert sorted(archive.namelist()) == sorted(p.name for p in (tmp_path / "cli").iterdir())
            for name in archive.namelist():
                assert archive.read(name) == (tmp_path / "cli" / name).read_bytes(), name
    finally:
        stop(server)


def test_page_follows_a_running_driver_without_reload(browser, tmp_path):
    """A real driver fills a study while the page is open: each new completed trial appears on the page
    within the refresh interval (plus the page's own run time), and the page is never reloaded."""
    from selenium.webdriver.common.by import By

    url = f"sqlite:///{tmp_path / 'live.db'}"
    data = small_spec(url, "live", trials=12)
    data.update(workers=1, proxy={"windows": 1, "seq_len": 64}, promotion={"every": 0, "final": False})
    (tmp_path / "live.yaml").write_text(yaml.safe_dump(data))
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "dse.cli", "start", str(tmp_path / "live.yaml"), "--no-progress"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    server = None

    def stored() -> int:
        try:
            trials = optuna.load_study(study_name="live", storage=url).get_trials(deepcopy=False)
        except (KeyError, Exception):
            return -1
        return sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)

    try:
        wait_for(lambda: stored() >= 1 or driver.poll() is not None, 300, "the first completed trial", 0.5)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        port = free_port()
        server = start_dashboard(url, port, tmp_path / "dashboard.log")
        browser.get(f"http://127.0.0.1:{port}/?view=Study&study=live")
        wait_for(lambda: metric(browser, "complete") is not None, 90, "the trial counts")
        browser.execute_script("window.__not_reloaded = true")
        seen = int(metric(browser, "complete"))
        updates = []
        while len(updates) < 2:
            wait_for(lambda: stored() > seen or driver.poll() is not None, 300, "a new completed trial", 0.2)
            target, arrived = stored(), time.monotonic()
            if target <= seen:
                break  # the driver finished
            shown = wait_for(lambda: (int(metric(browser, "complete") or -1) >= target) and metric(browser, "complete"),
                             REFRESH_S + 4, f"the page to show {target} completed trials")
            updates.append((target, time.monotonic() - arrived))
            seen = int(shown)
        print("new trials shown after (count, seconds):", updates)
        assert len(updates) == 2, (tmp_path / "driver.log").read_text()[-3000:]
        assert browser.execute_script("return window.__not_reloaded === true"), "the page was reloaded"
        assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "live-study.png"))
    finally:
        if server is not None:
            stop(server)
        stop(driver)
