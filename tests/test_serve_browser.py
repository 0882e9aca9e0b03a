"""The web page in headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
upload a PNU photo, see the label the API gives and the neighbours' thumbnails.

Set PYLANDMARK_TEST_ARTIFACTS=DIR to keep the screenshot (it is always written under the
test's tmp folder)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from serve_util import Server, build_index, tiny_weights  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromium-driver "
                                                                   "(apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def server(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    index = build_index(shared_data / "pnu_landmarks", tiny_weights(d), d / "pnu.plmi")
    srv = Server(index, "--threads", "1", log=d / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1360,1000", "--hide-scrollbars"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_upload_a_photo_and_see_the_landmark(server, browser, shared_data, tmp_path):
    photo = shared_data / "pnu_landmarks" / "test" / "hh" / "00000001.png"
    with httpx.Client(base_url=server.url, timeout=60) as c:
        (want,) = c.post("/recognize", files=[("image", (photo.name, photo.read_bytes(), "image/png"))]).json()

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(EC.text_to_be_present_in_element((By.ID, "facts"), "35 indexed photos"))
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "Answered"))

    assert browser.find_element(By.ID, "label").text == str(want["label"])
    assert f"{want['votes']} of 5 neighbours agree" in browser.find_element(By.ID, "conf").text
    hits = browser.find_elements(By.CSS_SELECTOR, "#neighbours li.hit")
    assert [int(h.get_attribute("data-id")) for h in hits] == [n["id"] for n in want["neighbours"]]
    # every thumbnail arrived and decoded (naturalWidth > 0), and voters are framed
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#neighbours img')].every(i => i.complete && i.naturalWidth > 0)"))
    voted = [h.get_attribute("class").split() for h in hits]
    assert [("voted" in c) for c in voted] == [n["label"] == want["label"] for n in want["neighbours"]]
    assert browser.find_element(By.ID, "preview").get_attribute("naturalWidth") != "0"

    shot = tmp_path / "serve_page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    keep = os.environ.get("PYLANDMARK_TEST_ARTIFACTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)

    # a bad file shows the service's error on the page, and the next photo works again
    bad = tmp_path / "not_a_photo.png"
    bad.write_bytes(b"plain text pretending to be a PNG")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "not_a_photo.png is not an image"))
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "Answered"))
    assert browser.find_element(By.ID, "label").text == str(want["label"])
