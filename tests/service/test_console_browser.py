"""The operator console in a real browser: headless Debian chromium driven by selenium,
against a real uvicorn server that builds the packaged demo product at start.

Needs `chromium` and `chromedriver` (Debian: apt-get install chromium chromium-driver;
scripts/install.sh dev installs them where apt is available) and selenium (dev extra);
skips with that reason where they are missing. Screenshots of the main views go to a
temporary folder, or to $PATCHCORE_CONSOLE_SCREENSHOTS when set
(scripts/make_console_screenshots.py uses that for the README's pictures).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.demo import demo_defect_images, demo_nominal_images, demo_test_nominal_images

from .conftest import ADMIN, ADMIN_KEY, LiveServer, start_server, stop_server, test_settings

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,860", "--hide-scrollbars")
WAIT_S = 60


def _which(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def console_server(tmp_path_factory) -> Iterator[LiveServer]:
    models = tmp_path_factory.mktemp("models")
    # A bank that cannot load, so the Products view has a failure to show.
    broken = models / "broken" / "20260101T000000Z-abcdef"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{ not json")
    live = start_server(test_settings(models, demo=True))
    yield live
    stop_server(live)


@pytest.fixture(scope="module")
def api(console_server) -> Iterator[httpx.Client]:
    with console_server.client() as client:
        yield client


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    configured = os.environ.get("PATCHCORE_CONSOLE_SCREENSHOTS")
    folder = Path(configured) if configured else tmp_path_factory.mktemp("console_screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium = _which("chromium", "chromium-browser")
    chromedriver = _which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("chromium and chromedriver not found: apt-get install chromium chromium-driver "
                    "(scripts/install.sh dev does it where apt-get is available)")
    options = Options()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium then never tries to download one.
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, timeout: float = WAIT_S, message: str = ""):
    """Poll until condition(driver) is truthy. The page re-renders its tables on every
    refresh, so an element found a moment ago may be gone (stale) or not there yet."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (StaleElementReferenceException, NoSuchElementException, IndexError)
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=ignored).until(
        lambda d: condition(d), message)


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def click(driver, selector: str) -> None:
    """Click the first match, again if a re-render replaced it under the cursor."""
    wait(driver, lambda d: css(d, selector)[0].click() or True, 10, f"could not click {selector}")


def open_console(driver, server: LiveServer, view: str, *, clear_key: bool = True) -> None:
    driver.get(f"{server.url}/console/#{view}")
    if clear_key:  # session storage outlives a reload: start each test without a key
        driver.execute_script("sessionStorage.clear()")
        driver.refresh()
    # The page routes once it knows whether admin is unlocked.
    wait(driver, lambda d: d.execute_script("return document.body.dataset.view") == view, 10, "page did not start")


def csp_violations(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]


def unlock(driver, key: str) -> None:
    field = by_id(driver, "admin-key")
    field.clear()
    field.send_keys(key)
    by_id(driver, "key-submit").click()


def test_try_an_image_shows_score_decision_heatmap_and_regions(browser, console_server, api, shots):
    defect = next(p for p in demo_defect_images() if p.name.startswith("scratch"))
    expected = api.post("/v1/products/demo/predict", params={"heatmap": "none"}, content=defect.read_bytes(),
                        headers={"Content-Type": "image/png"}).json()["results"][0]

    open_console(browser, console_server, "try")
    wait(browser, lambda d: "demo" in [o.text for o in css(d, "#try-product option")], message="no demo product")
    assert not by_id(browser, "tabs").find_elements("css selector", "a[data-view=build]")[0].is_displayed()
    by_id(browser, "try-files").send_keys(str(defect))
    wait(browser, lambda d: css(d, "#try-results .card[data-state=done]"), message="no result card")
    card = css(browser, "#try-results .card")[0]

    assert card.find_element("css selector", ".decision").text == "ANOMALOUS"
    score_text = card.find_element("css selector", ".score-text").text
    assert f"score {expected['score']:.3f} vs threshold 0.500" in score_text, score_text
    assert f"raw {expected['raw_score']:.3f} vs {expected['threshold']:.3f}" in score_text
    heat = card.find_element("css selector", "img.heat")
    assert heat.get_attribute("src").startswith("data:image/png;base64,")
    # The heatmap decoded, at the photo's own size, and lies over the photo.
    natural = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", heat)
    assert natural == [expected["width"], expected["height"]]
    photo = card.find_element("css selector", "img.photo")
    assert browser.execute_script("return arguments[0].naturalWidth", photo) == expected["width"]
    assert heat.rect["width"] == pytest.approx(photo.rect["width"], abs=1)
    assert heat.rect["height"] == pytest.approx(photo.rect["height"], abs=1)
    boxes = card.find_elements("css selector", ".boxes .box")
    assert len(boxes) >= 1  # a scratch is a region above the threshold
    assert all(b.rect["width"] > 0 and b.rect["height"] > 0 for b in boxes)

    # The opacity slider changes the overlay.
    browser.execute_script("const s = document.getElementById('opacity'); s.value = 20;"
                           "s.dispatchEvent(new Event('input'))")
    assert heat.value_of_css_property("opacity") == "0.2"
    browser.execute_script("const s = document.getElementById('opacity'); s.value = 55;"
                           "s.dispatchEvent(new Event('input'))")
    # Two more at once: a held-out good part (OK) and a crack (ANOMALOUS).
    good = demo_test_nominal_images()[0]
    crack = next(p for p in demo_defect_images() if p.name.startswith("crack"))
    by_id(browser, "try-files").send_keys(f"{good}\n{crack}")
    wait(browser, lambda d: len(css(d, "#try-results .card[data-state=done]")) == 3, message="more cards")
    decisions = {c.find_element("css selector", ".filename").text: c.find_element("css selector", ".decision").text
                 for c in css(browser, "#try-results .card")}
    assert decisions == {defect.name: "ANOMALOUS", good.name: "OK", crack.name: "ANOMALOUS"}
    browser.save_screenshot(str(shots / "console_try.png"))
    assert csp_violations(browser) == []


def test_products_lists_a_bank_that_failed_to_load_with_its_reason(browser, console_server, api):
    failed = api.get("/v1/products").json()["failed"]
    assert [f["name"] for f in failed] == ["broken"]
    open_console(browser, console_server, "products")
    row = "#products-body tr[data-product=broken]"
    wait(browser, lambda d: css(d, f"{row} .pill.failed"), 10, "failed bank not listed")
    reason = css(browser, f"{row} td.reason")[0].text
    assert reason.startswith(failed[0]["error_code"] + ":") and failed[0]["reason"] in reason
    demo_row = "#products-body tr[data-product=demo]"
    assert css(browser, f"{demo_row} .pill.loaded")
    cells = [c.text for c in css(browser, f"{demo_row} td")]
    demo = api.get("/v1/products/demo").json()
    assert cells[2:6] == [demo["version"], demo["backbone"], f"{demo['bank_size']:,}", f"{demo['threshold']:.4f}"]


def test_products_lists_a_bank_stored_by_another_process(browser, console_server, api):
    """A bank saved into the store behind the service (the CLI, a Ray build) shows as
    `stored`, and its detail says why it is not served."""
    from app.storage import LocalBankStore

    store = LocalBankStore(console_server.state.settings.models_dir)
    store.save("spare", store.load("demo")[1])
    try:
        open_console(browser, console_server, "products")
        row = "#products-body tr[data-product=spare]"
        wait(browser, lambda d: css(d, f"{row} .pill.stored"), 10, "stored bank not listed")
        assert "not loaded" in css(browser, f"{row} td.reason")[0].text
        click(browser, row)
        wait(browser, lambda d: "not loaded" in by_id(d, "detail-reason").text, 10, "no reason in the detail")
    finally:
        assert api.delete("/v1/admin/products/spare", headers=ADMIN).status_code == 204


def test_a_wrong_admin_key_shows_an_error_and_keeps_admin_hidden(browser, console_server, shots):
    open_console(browser, console_server, "products")
    assert not css(browser, "#tabs a[data-view=build]")[0].is_displayed()
    unlock(browser, "not-the-key-0123456789")
    error = by_id(browser, "key-error")
    wait(browser, lambda d: error.is_displayed(), 10, "no error shown for a wrong key")
    assert "wrong admin API key" in error.text
    assert not css(browser, "#tabs a[data-view=build]")[0].is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('patchcore.adminKey')") is None
    browser.save_screenshot(str(shots / "console_bad_key.png"))


def test_admin_builds_a_bank_and_it_becomes_active_then_rolls_back(browser, console_server, api, shots):
    old_version = api.get("/v1/products/demo").json()["version"]
    open_console(browser, console_server, "products")
    unlock(browser, ADMIN_KEY)
    wait(browser, lambda d: css(d, "#tabs a[data-view=build]")[0].is_displayed(), 10, "admin did not unlock")
    assert browser.execute_script("return sessionStorage.getItem('patchcore.adminKey')") == ADMIN_KEY

    browser.get(f"{console_server.url}/console/#build")  # a reload keeps the key (session storage)
    wait(browser, lambda d: by_id(d, "view-build").is_displayed(), 10, "build view hidden after reload")
    product = by_id(browser, "build-product")
    product.send_keys("demo\t")
    images = demo_nominal_images()
    by_id(browser, "build-files").send_keys("\n".join(str(p) for p in images))
    wait(browser, lambda d: "uploaded" in by_id(d, "upload-status").text, message="upload did not finish")
    assert by_id(browser, "staged-count").text == str(len(images))
    by_id(browser, "opt-coreset").send_keys("0.1")
    by_id(browser, "opt-seed").send_keys("1")
    by_id(browser, "opt-activate").click()  # build only: activate the result from the console
    by_id(browser, "build-start").click()

    seen_phases = set()

    def finished(d):
        seen_phases.add(by_id(d, "job-phase").text)
        return by_id(d, "job-state").text in ("succeeded", "failed", "cancelled", "interrupted")

    wait(browser, finished, 120, "build did not finish")
    job_id = by_id(browser, "job-id").text
    job = api.get(f"/v1/admin/jobs/{job_id}", headers=ADMIN).json()
    assert job["state"] == "succeeded", job
    assert job["params"] == {"coreset_ratio": 0.1, "backbone": None, "seed": 1, "activate": False,
                             "mode": "full", "base_version": None, "until": "size",
                             "image_size": None, "framing": None, "false_alarm_rate": None,
                             "map_sigma": None, "patch_size": None, "stage_dim": None,
                             "stage_balance": None, "normalisation": None}
    assert by_id(browser, "job-phase").text == "done"
    assert seen_phases - {"done", ""}, "no phase was shown while the build ran"
    new_version = job["version"]
    assert new_version != old_version
    assert new_version in by_id(browser, "job-detail").text
    assert api.get("/v1/products/demo").json()["version"] == old_version  # built, not yet served
    activate = by_id(browser, "job-activate")
    wait(browser, lambda d: activate.is_displayed() and activate.is_enabled(), 10, "no activate button")
    activate.click()
    wait(browser, lambda d: not activate.is_enabled(), 10, "activate button should say the version is active")
    assert "Active" in activate.text
    assert api.get("/v1/products/demo").json()["version"] == new_version
    browser.save_screenshot(str(shots / "console_build.png"))

    # Products: the new version serves; roll back to the old one from the version history.
    browser.get(f"{console_server.url}/console/#products")
    row = "#products-body tr[data-product=demo]"
    wait(browser, lambda d: css(d, f"{row} td.version") and css(d, f"{row} td.version")[0].text == new_version,
         10, "new version not shown as active")
    click(browser, row)
    # Newest first, the serving one marked active, the other one with an Activate button.
    wait(browser, lambda d: [r.get_attribute("data-version") for r in css(d, "#versions-body tr")]
         == [new_version, old_version], 10, "version history")
    wait(browser, lambda d: css(d, f"#versions-body tr[data-version='{new_version}'] .pill.active"), 10, "active")
    browser.save_screenshot(str(shots / "console_products.png"))
    click(browser, f"#versions-body tr[data-version='{old_version}'] button")
    wait(browser, lambda d: by_id(d, "confirm").is_displayed(), 5, "no confirmation")
    by_id(browser, "confirm-ok").click()
    wait(browser, lambda d: css(d, f"{row} td.version")[0].text == old_version, 10, "rollback not shown")
    assert api.get("/v1/products/demo").json()["version"] == old_version
    assert csp_violations(browser) == []


def test_health_view_shows_readiness_queue_and_rates(browser, console_server, shots):
    open_console(browser, console_server, "health", clear_key=False)
    wait(browser, lambda d: by_id(d, "h-ready").text == "ready", 10, "not ready")
    assert by_id(browser, "h-live").text == "alive"
    assert by_id(browser, "h-queue").text == "0"
    assert "of 64" in by_id(browser, "h-queue-cap").text
    # Rates need two scrapes, 3 s apart.
    wait(browser, lambda d: re.fullmatch(r"\d+\.\d\d", by_id(d, "h-rps").text), 10, "no request rate")
    assert float(by_id(browser, "h-rps").text) > 0  # the page's own polling, at least
    assert re.fullmatch(r"\d+(\.\d)? ms", by_id(browser, "h-latency").text), by_id(browser, "h-latency").text
    assert by_id(browser, "h-banks").text == "1 / 1"  # demo loaded, "broken" failed
    images, _anomalous = (int(float(x)) for x in by_id(browser, "h-images").text.split(" / "))
    assert images >= 4  # the first test's predictions at least
    browser.save_screenshot(str(shots / "console_health.png"))


def test_delete_product_asks_first(browser, console_server, api):
    open_console(browser, console_server, "products", clear_key=False)
    row = "#products-body tr[data-product=demo]"
    click(browser, row)
    wait(browser, lambda d: by_id(d, "product-delete").is_displayed(), 10, "no delete button for admin")
    by_id(browser, "product-delete").click()
    wait(browser, lambda d: by_id(d, "confirm").is_displayed(), 5, "no confirmation")
    by_id(browser, "confirm-cancel").click()
    time.sleep(0.3)
    assert api.get("/v1/products/demo").status_code == 200  # cancelled: nothing happened
    by_id(browser, "product-delete").click()
    wait(browser, lambda d: by_id(d, "confirm").is_displayed(), 5, "no confirmation")
    by_id(browser, "confirm-ok").click()
    wait(browser, lambda d: not css(d, row), 10, "deleted product still listed")
    assert api.get("/v1/products/demo").status_code == 404
