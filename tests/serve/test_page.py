"""The web page at ``/`` in headless Chromium: enrol by choosing files, search by dropping one, screenshot.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium chromium-driver``) and
selenium (the ``serve`` extra); skipped with that reason where they are absent.
"""
from __future__ import annotations

import base64
import os
import shutil

import pytest

from tests.serve.harness import Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="headless Chromium not installed "
                       "(apt-get install -y chromium chromium-driver)"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1200,900"]

DROP = """
const [zone, b64, name, done] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const dt = new DataTransfer();
dt.items.add(new File([bytes], name, {type: "image/jpeg"}));
zone.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
done();
"""


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def test_enrol_and_search_through_the_page(browser, tiny_ckpt, aligned, raw, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    server = Server(tiny_ckpt, tmp_path / "g.db", tmp_path)
    wait = WebDriverWait(browser, 60)
    try:
        server.start()
        browser.get(server.url + "/")
        wait.until(ec.text_to_be_present_in_element((By.ID, "info"), "broadface"))
        for name in ["Abdullah_Gul", "Al_Gore", "Amelie_Mauresmo"]:
            chooser = browser.find_element(By.ID, "enrol-files")
            browser.execute_script("arguments[0].hidden = false", chooser)  # the drop zone's file chooser
            name_box = browser.find_element(By.ID, "enrol-name")
            name_box.clear()
            name_box.send_keys(name)
            paths = sorted((aligned / name).iterdir())[:2]
            if name == "Amelie_Mauresmo":
                paths = [aligned / name / "Amelie_Mauresmo_0015.jpg"]
            chooser.send_keys("\n".join(str(p) for p in paths))
            wait.until(ec.text_to_be_present_in_element((By.ID, "enrol-status"), f"under {name}"))
        wait.until(ec.text_to_be_present_in_element((By.ID, "gallery-count"), "(3 identities)"))

        probe = raw / "Amelie_Mauresmo" / "Amelie_Mauresmo_0015.jpg"  # a raw photo: detected and aligned
        browser.execute_async_script(DROP, browser.find_element(By.ID, "search-drop"),
                                     base64.b64encode(probe.read_bytes()).decode(), probe.name)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#matches .match")) == 3)
        matches = browser.find_elements(By.CSS_SELECTOR, "#matches .match")
        assert matches[0].get_attribute("data-identity") == "Amelie_Mauresmo"
        assert "face detected" in browser.find_element(By.ID, "search-status").text
        loaded = browser.execute_script(
            "return Array.from(document.querySelectorAll('#matches img')).map(i => i.complete && i.naturalWidth)")
        assert loaded == [112] * 4  # the probe's aligned crop and each match's enrolled crop were served
        shot = tmp_path / "serve_page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
        browser.get(server.url + "/docs")  # the OpenAPI page renders offline
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 10)
    finally:
        server.kill()
