"""The status page in a real headless browser (Debian's Chromium, driven by Selenium).

The appliances run in their facilities' namespaces with `--status-port`; the browser runs in facility
B's namespace (this test process enters it, so chromedriver and Chromium start there too) and trusts
B's self-signed control certificate by its public-key pin, as a person would after checking it.
Set SCISTREAM_STATUS_SCREENSHOT=docs/status-page.png to refresh the README's screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import os
import shutil
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .topology import (
    PRODUCER_DEST,
    Appliance,
    ApplianceFactory,
    Facility,
    Topology,
    split_address,
    start_appliances,
    start_iperf_server,
)

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
STATUS_PORT = 5080  # outside the data port range
CLONE_NEWNET = 0x40000000

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402


@contextlib.contextmanager
def inside_namespace(ns: str) -> Iterator[None]:
    """This thread (and what it starts) in network namespace `ns`, then back where it was."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back failed")
    finally:
        os.close(target)
        os.close(home)


def spki_pin(cert_file: Path) -> str:
    """The certificate's public-key pin as Chromium's --ignore-certificate-errors-spki-list takes it."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def page_url(appliance: Appliance, path: str = "/") -> str:
    return f"https://{appliance.facility.wan_ip}:{STATUS_PORT}{path}"


@pytest.fixture
def appliances(topology: Topology, appliance_factory: ApplianceFactory) -> tuple[Appliance, Appliance]:
    """Both appliances serving the status page (this overrides the package's `appliances`)."""
    a, b = Appliance(topology.a), Appliance(topology.b)
    for appliance in (a, b):
        appliance.extra_args = ["--status-port", str(STATUS_PORT)]
    appliance_factory.started += [a, b]
    start_appliances(a, b)
    return a, b


@pytest.fixture
def browser(appliance_b: Appliance, facility_b: Facility) -> Iterator[WebDriver]:
    """Headless Chromium in facility B; the test body runs in B's namespace while it is open."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test cannot run in CI: {', '.join(missing)} missing")
        pytest.skip(f"needs {', '.join(missing)} (scripts/bootstrap installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,300",
        f"--ignore-certificate-errors-spki-list={spki_pin(appliance_b.ca_file)}",
    ):
        options.add_argument(arg)
    with inside_namespace(facility_b.ns):
        service = webdriver.ChromeService(executable_path=CHROMEDRIVER, env={**os.environ, "HOME": "/tmp"})
        driver = webdriver.Chrome(options=options, service=service)
        try:
            yield driver
        finally:
            driver.quit()


def sign_in(driver: WebDriver, appliance: Appliance, token: str) -> None:
    driver.get(page_url(appliance))
    field = WebDriverWait(driver, 10).until(
        expected_conditions.visibility_of_element_located((By.ID, "token"))
    )
    field.send_keys(token + Keys.ENTER)


def row_of(driver: WebDriver, session_id: str) -> Any:
    """The session's row as the page shows it now (None if absent); reads it before the next redraw."""
    try:
        row = driver.find_element(By.ID, f"session-{session_id}")
        return {
            "state": row.get_attribute("data-state"),
            "bps": float(row.get_attribute("data-bps") or 0),
            "text": row.text,
            "chart": [line.get_attribute("points") for line in row.find_elements(By.TAG_NAME, "polyline")],
        }
    except (NoSuchElementException, StaleElementReferenceException):
        return None


def screenshot(driver: WebDriver, tmp_path: Path) -> Path:
    target = Path(os.environ.get("SCISTREAM_STATUS_SCREENSHOT") or tmp_path / "status-page.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(target))
    return target


def test_a_session_shows_up_carries_traffic_and_goes_away(
    appliance_a: Appliance,
    appliance_b: Appliance,
    facility_a: Facility,
    facility_b: Facility,
    browser: WebDriver,
    tmp_path: Path,
) -> None:
    start_iperf_server(facility_a)
    sign_in(browser, appliance_b, appliance_b.admin_token)
    WebDriverWait(browser, 10).until(
        expected_conditions.text_to_be_present_in_element((By.ID, "who"), "alice")
    )
    assert browser.find_element(By.ID, "empty").is_displayed()

    producer = appliance_a.json("inbound", "--dest", PRODUCER_DEST)
    consumer = appliance_b.json("outbound", producer["ticket"])
    session_id = consumer["session_id"]

    # The page polls every second: a new session is on it within 2 s, without a reload.
    shown = WebDriverWait(browser, 2).until(lambda d: row_of(d, session_id))
    assert shown["state"] == "ACTIVE"
    assert consumer["entry_points"][0] in shown["text"]
    assert PRODUCER_DEST in shown["text"]
    assert "consumer" in shown["text"]
    assert "quic / tcp" in shown["text"]

    host, port = split_address(consumer["entry_points"][0])
    iperf = facility_b.spawn("iperf3", "-c", host, "-p", str(port), "-t", "8", "-b", "40M")
    moving = WebDriverWait(browser, 15, poll_frequency=0.2).until(
        lambda d: (r := row_of(d, session_id)) and r["bps"] > 0 and r
    )
    assert any(points.strip() for points in moving["chart"])
    # A few more seconds of traffic, so the chart in the screenshot has a shape.
    WebDriverWait(browser, 15, poll_frequency=0.2).until(
        lambda d: (r := row_of(d, session_id)) and r["bps"] > 0 and len(r["chart"][0].split()) >= 6
    )
    shot = screenshot(browser, tmp_path)
    assert shot.read_bytes().startswith(b"\x89PNG")
    assert iperf.wait(timeout=30) == 0

    appliance_b.json("release", session_id)
    WebDriverWait(browser, 5).until(lambda d: row_of(d, session_id) is None)
    assert browser.find_element(By.ID, "empty").is_displayed()


def _status(url: str, token: str | None, ca_file: Path) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_request_without_a_valid_token_is_refused(
    appliance_a: Appliance, appliance_b: Appliance, browser: WebDriver
) -> None:
    appliance_b.json("outbound", appliance_a.json("inbound", "--dest", PRODUCER_DEST)["ticket"])
    data = page_url(appliance_b, "/api/sessions")
    wrong = appliance_b.admin_token[:-4] + "AAAA"

    assert _status(data, None, appliance_b.ca_file) == 401
    assert _status(data, wrong, appliance_b.ca_file) == 401
    assert _status(data, appliance_b.bob_token, appliance_b.ca_file) == 200

    sign_in(browser, appliance_b, wrong)
    error = WebDriverWait(browser, 10).until(
        expected_conditions.visibility_of_element_located((By.ID, "error"))
    )
    assert "Access refused" in error.text
    assert browser.find_element(By.ID, "login").is_displayed()
    assert not browser.find_element(By.ID, "sessions").is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, "#sessions tbody tr") == []
    assert browser.execute_script("return sessionStorage.getItem('scistream.token')") is None
