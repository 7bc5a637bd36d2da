"""The web page at ``/`` in a real headless Chromium: fill the form, submit, read the answer.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them); skips with the
reason where they are absent. The screenshot lands in the test's temp folder as ``page.png``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from serve_helpers import running_server, train_small_model

from mmfuse.serve.app import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1000,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model_dir = train_small_model(synth_manifest, tmp_path_factory.mktemp("page-model"))
    with running_server(create_app(model_dir)) as url:
        yield url


def test_fill_the_form_submit_and_read_the_prediction(browser: Any, server: str, synth_manifest: Path,
                                                      tmp_path: Path) -> None:
    row = json.loads(synth_manifest.read_text().splitlines()[0])
    browser.get(server + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(expected_conditions.element_to_be_clickable((By.ID, "submit")))
    assert "classification with concat fusion" in browser.find_element(By.ID, "model").text
    browser.find_element(By.ID, "input-text").send_keys(row["text"])
    browser.find_element(By.ID, "input-image").send_keys(str(synth_manifest.parent / row["image"]))
    browser.find_element(By.ID, "input-audio").send_keys(str(synth_manifest.parent / row["audio"]))
    browser.find_element(By.ID, "submit").click()
    wait.until(expected_conditions.visibility_of_element_located((By.ID, "result")))

    import httpx

    files = {m: open(synth_manifest.parent / row[m], "rb") for m in ("image", "audio")}  # noqa: SIM115
    expected = httpx.post(server + "/predict?explain=1", data={"text": row["text"]}, files=files).json()
    for f in files.values():
        f.close()
    assert browser.find_element(By.ID, "result-label").text == expected["label"]
    assert browser.find_element(By.ID, "result-modalities").text == "audio, image, text"
    bars = browser.find_elements(By.CSS_SELECTOR, "#probabilities .row")
    assert len(bars) == 8
    shown = {b.get_attribute("data-name"): float(b.find_element(By.CLASS_NAME, "value").text) for b in bars}
    assert shown == pytest.approx(expected["probabilities"], abs=1e-4)
    widths = {b.get_attribute("data-name"): b.find_element(By.CLASS_NAME, "bar").value_of_css_property("width")
              for b in bars}
    top = max(expected["probabilities"], key=lambda k: expected["probabilities"][k])
    assert float(widths[top].removesuffix("px")) == max(float(w.removesuffix("px")) for w in widths.values())
    contributions = browser.find_elements(By.CSS_SELECTOR, "#contributions .row")
    assert {c.get_attribute("data-name") for c in contributions} == {"audio", "image", "text"}
    screenshot = tmp_path / "page.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000

    # A bad upload shows the server's error on the page instead of a result.
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    browser.get(server + "/")
    wait.until(expected_conditions.element_to_be_clickable((By.ID, "submit")))
    browser.find_element(By.ID, "input-image").send_keys(str(bad))
    browser.find_element(By.ID, "submit").click()
    wait.until(expected_conditions.visibility_of_element_located((By.ID, "error")))
    error = browser.find_element(By.ID, "error").text
    assert "422" in error and "cannot decode image broken.png" in error
    assert not browser.find_element(By.ID, "result").is_displayed()


def test_a_server_with_api_keys_asks_for_one_and_keeps_it_in_the_tab(browser: Any, synth_manifest: Path,
                                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    """With keys set the page still loads (``/`` and ``/static`` need none), asks for a key, refuses a
    wrong one with the server's 401 and, given the right one, predicts; the key stays in sessionStorage."""
    from mmfuse.serve.security import KeyRing, SecuritySettings, allowed_hosts_for
    from mmfuse.serve.settings import ServeSettings

    row = json.loads(synth_manifest.read_text().splitlines()[0])
    model_dir = train_small_model(synth_manifest, tmp_path_factory.mktemp("page-keyed-model"))
    policy = SecuritySettings(api_keys=KeyRing(["page-key-0123456789"]), allowed_hosts=allowed_hosts_for("127.0.0.1"))
    with running_server(create_app(model_dir, ServeSettings(security=policy)), ready_headers={
            "X-API-Key": "page-key-0123456789"}) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "api-key")))
        assert "error 401: this server needs an API key" in browser.find_element(By.ID, "error").text
        browser.find_element(By.ID, "api-key").send_keys("not-the-key")
        browser.find_element(By.ID, "api-key-use").click()
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "api-key")))
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "error"), "the API key is not valid"))
        browser.find_element(By.ID, "api-key").clear()
        browser.find_element(By.ID, "api-key").send_keys("page-key-0123456789")
        browser.find_element(By.ID, "api-key-use").click()
        wait.until(expected_conditions.element_to_be_clickable((By.ID, "submit")))
        assert "classification with concat fusion" in browser.find_element(By.ID, "model").text
        assert browser.execute_script("return sessionStorage.getItem('mmfuse-api-key')") == "page-key-0123456789"
        browser.find_element(By.ID, "input-text").send_keys(row["text"])
        browser.find_element(By.ID, "submit").click()
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "result")))
        assert browser.find_element(By.ID, "result-modalities").text == "text"
        browser.execute_script("sessionStorage.clear()")
