"""The playground page at / in a real headless Chromium (Debian's chromium and chromium-driver, installed by
.ci/run as nginx is), served by a real gunicorn on the embedded default model behind the shipped nginx site:
type a prompt, press Generate, see the streamed previews, then the image, whose pixels equal the API's image
for the same parameters; the same for an edit. Skips only where chromium is not installed.

``SD_PLAYGROUND_SCREENSHOT=PATH`` also saves the page after the generation there (docs/playground.png)."""
from __future__ import annotations

import base64
import io
import os
import shutil

import pytest
import requests
from PIL import Image

from bench.harness import API_KEY, NGINX, auth_headers, nginx_in_front, server_fixture

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium and chromium-driver are not installed")
PROMPT = "a red circle on a blue background"
WAIT_S = 180


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    srv = server_fixture(tmp_path_factory, "playground", SD_MODEL=None)      # the embedded default model
    try:
        if NGINX is None:
            yield srv.base
        else:
            with nginx_in_front(srv, srv.tmp) as (url, _):
                yield url
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def pixels(b64: str) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").tobytes()


def set_value(driver, element_id: str, value) -> None:
    el = driver.find_element("id", element_id)
    el.clear()
    el.send_keys(str(value))


def wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, WAIT_S).until(condition, f"waiting for {what}")


def result_b64(driver) -> str:
    img = wait(driver, lambda d: d.find_elements("css selector", "img.result"), "the image")[0]
    src = img.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    return src.split(",", 1)[1]


def open_page(driver, base):
    driver.get(base + "/")
    assert driver.title == "sd-api-server playground"
    set_value(driver, "apikey", API_KEY)
    driver.find_element("id", "prompt").click()           # leaving the field sends "change": choices load
    wait(driver, lambda d: d.find_element("id", "model").get_attribute("value")
         and len(d.find_elements("css selector", "#sampler option")) > 5, "the server's choices")


def fill_form(driver, steps: int, seed: int):
    from selenium.webdriver.support.ui import Select
    set_value(driver, "prompt", PROMPT)
    Select(driver.find_element("id", "sampler")).select_by_value("euler")
    set_value(driver, "steps", steps)
    set_value(driver, "seed", seed)
    set_value(driver, "width", 64)
    set_value(driver, "height", 64)


def test_generate_in_the_browser_shows_previews_then_the_api_image(base, browser):
    open_page(browser, base)
    fill_form(browser, steps=12, seed=5)
    browser.find_element("id", "generate").click()
    got = result_b64(browser)
    previews = browser.find_elements("css selector", "#previews img.preview")
    assert len(previews) >= 1
    model = browser.find_element("id", "model").get_attribute("value")
    api = requests.post(base + "/v1/images/generations", headers=auth_headers(), timeout=WAIT_S, json={
        "prompt": PROMPT, "negative_prompt": "", "model": model, "sample_method": "euler", "steps": 12,
        "cfg_scale": 7, "seed": 5, "n": 1, "size": "64x64", "response_format": "b64_json"}).json()
    assert pixels(got) == pixels(api["data"][0]["b64_json"])
    info = browser.find_element("css selector", "pre.info").text
    assert info.startswith(PROMPT) and "Seed: 5" in info and "Steps: 12" in info
    set_value(browser, "seed", -1)
    browser.find_element("css selector", "button.reuse").click()
    assert browser.find_element("id", "seed").get_attribute("value") == "5"
    assert browser.find_element("css selector", "a.download").get_attribute("download") == "image-stream.png"
    assert len(browser.find_elements("css selector", "#history img")) >= 1     # kept in this browser
    shot = os.environ.get("SD_PLAYGROUND_SCREENSHOT")
    if shot:
        browser.save_screenshot(shot)


def test_edit_in_the_browser_equals_the_api_edit(base, browser, tmp_path):
    source = tmp_path / "source.png"
    Image.new("RGB", (64, 64), (30, 60, 200)).save(source)
    open_page(browser, base)
    browser.find_element("id", "tab-edit").click()
    assert browser.find_element("id", "edit-fields").is_displayed()
    fill_form(browser, steps=6, seed=9)
    browser.find_element("id", "image").send_keys(str(source))
    set_value(browser, "strength", 0.6)
    browser.find_element("id", "generate").click()
    got = result_b64(browser)
    model = browser.find_element("id", "model").get_attribute("value")
    api = requests.post(base + "/v1/images/edits", headers=auth_headers(), timeout=WAIT_S, files={
        "image": ("source.png", source.read_bytes(), "image/png")}, data={
        "prompt": PROMPT, "negative_prompt": "", "model": model, "sample_method": "euler", "steps": "6",
        "cfg_scale": "7", "seed": "9", "n": "1", "size": "64x64", "strength": "0.6",
        "response_format": "b64_json"}).json()
    assert pixels(got) == pixels(api["data"][0]["b64_json"])


def test_the_page_needs_no_key_but_the_api_does(base):
    page = requests.get(base + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    for asset in ("ui/playground.js", "ui/playground.css"):
        assert requests.get(f"{base}/{asset}", timeout=10).status_code == 200
    assert requests.get(base + "/v1/models", timeout=10).status_code == 401
    assert "http://" not in page.text.replace("http://www.w3.org", "") and "https://" not in page.text   # no CDN
