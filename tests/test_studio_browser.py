"""The studio in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium): the key is asked for once, a prompt typed into the playground streams two
models' answers side by side, the runs view charts a finished run, one click loads its
adapter into the model list, and the data view highlights trained tokens. No console
errors anywhere. Screenshots go to ``$MLX_TUNE_STUDIO_SHOTS`` (``make screenshots``: docs/)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.needs import missing
from tests.studio_util import API_KEY, make_runs, studio_server

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium is not installed (pip install -e '.[dev]')")
    if not CHROMIUM or not DRIVER:
        missing("headless Chromium needs Debian's chromium and chromium-driver (make setup installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1360,1000",
                "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The OpenBLAS preload of the test process crashes Chromium's renderer: the browser gets a clean env.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER, env=env))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    paths = make_runs(tmp_path_factory.mktemp("studio-browser"))
    with studio_server(paths, adapters={"tuned": str(paths["run"])}) as (url, registry):
        yield url, paths


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("MLX_TUNE_STUDIO_SHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait(driver, condition, timeout: float = 60):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page rebuilds lists (the model list after a load): an element can go stale mid-check.
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=[StaleElementReferenceException]).until(lambda d: condition(d))


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def test_the_studio_in_a_browser(browser, site, shots):
    from selenium.webdriver.common.keys import Keys

    url, paths = site
    d = browser
    d.get(url + "/studio")
    # The key is asked for once, before any data is fetched.
    wait(d, lambda d: css(d, "#key-form") and css(d, "#key-form")[0].is_displayed())
    css(d, "#api-key")[0].send_keys(API_KEY + Keys.ENTER)
    wait(d, lambda d: len(css(d, "#models input")) >= 3)

    # Playground: two models (base and the served adapter) answer one prompt side by side.
    for box in css(d, "#models input"):
        if box.is_selected() != (box.get_attribute("value") in ("base", "tuned")):
            box.click()
    css(d, "#max-tokens")[0].clear()
    css(d, "#max-tokens")[0].send_keys("24")
    css(d, "#prompt")[0].send_keys("What is 2 plus 3?" + Keys.ENTER)  # Enter sends
    wait(d, lambda d: len(css(d, ".answer[data-done='1']")) == 2)
    cards = {c.get_attribute("data-model"): c for c in css(d, ".answer")}
    assert set(cards) == {"base", "tuned"}
    for card in cards.values():
        assert "failed" not in card.get_attribute("class")
        assert card.find_element("css selector", ".output").get_attribute("textContent")  # a random model's bytes
        assert "tokens/s" in card.find_element("css selector", ".stats").text
    # Structured output from the playground: every answer is JSON of the schema.
    from selenium.webdriver.support.ui import Select

    Select(css(d, "#format")[0]).select_by_value("json_schema")
    schema = {"type": "object", "properties": {"mood": {"enum": ["calm", "busy"]}}, "required": ["mood"],
              "additionalProperties": False}
    css(d, "#schema")[0].send_keys(json.dumps(schema))
    css(d, "#send")[0].click()
    wait(d, lambda d: len(css(d, ".answer[data-done='1']")) == 2)
    for card in css(d, ".answer"):
        assert json.loads(card.find_element("css selector", ".output").get_attribute("textContent"))["mood"] in (
            "calm", "busy")
    d.save_screenshot(str(shots / "studio-playground.png"))

    # Runs: the finished run's charts draw; its adapter loads with one click.
    css(d, "#tab-runs")[0].click()
    wait(d, lambda d: css(d, "#runs-table tr[data-run='arith']"))
    css(d, "#runs-table tr[data-run='arith'] a.run-link")[0].click()
    wait(d, lambda d: css(d, ".chart[data-chart='loss'] canvas"))
    wait(d, lambda d: css(d, "#run-tests table"))
    assert "lora.rank" in css(d, "#run-config")[0].text
    assert "top1_agreement" in css(d, "#run-fuse")[0].text
    d.save_screenshot(str(shots / "studio-runs.png"))
    css(d, "#runs-table tr[data-run='arith'] button.load-adapter")[0].click()
    wait(d, lambda d: "loaded adapter 'arith'" in css(d, "#status")[0].text)
    wait(d, lambda d: "arith" in [b.get_attribute("value") for b in css(d, "#models input")])

    # A run that is training: its charts grow as metrics.jsonl does.
    live = paths["runs"] / "live"
    live.mkdir()
    rows = [{"step": i, "loss": 5.0 - 0.1 * i, "learning_rate": 1e-3, "tokens_per_sec": 100.0} for i in range(1, 4)]
    (live / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    css(d, "#tab-playground")[0].click()
    css(d, "#tab-runs")[0].click()
    d.refresh()
    wait(d, lambda d: css(d, "#runs-table tr[data-run='live'] .live"))
    css(d, "#runs-table tr[data-run='live'] a.run-link")[0].click()
    wait(d, lambda d: css(d, "#charts")[0].get_attribute("data-rows") == "3")
    with open(live / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 4.5, "val_loss": 4.7}) + "\n")
    wait(d, lambda d: css(d, "#charts")[0].get_attribute("data-rows") == "4", timeout=20)

    # Data: rows rendered with the trained tokens highlighted, counts and a histogram.
    css(d, "#tab-data")[0].click()
    wait(d, lambda d: css(d, "#data-rows-out .data-row .trained"))
    trained = css(d, "#data-rows-out .data-row .trained")[0].text
    assert "=" in trained  # the assistant's answer "a + b = c" is what trains
    assert "24" in css(d, "#data-counts")[0].text and css(d, "#data-hist .bar")
    d.save_screenshot(str(shots / "studio-data.png"))
    assert console_errors(d) == []
