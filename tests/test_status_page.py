"""The status page in real headless Chromium (Debian's chromium + chromium-driver, via selenium):
it shows the routes and follows their live connection counts without reloading; and the
/api/status document behind it."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from portway.admin import AdminApp, AdminServer, AdminThread
from portway.metrics import MetricsObserver
from portway.status import (
    ProcessStatus,
    RouteStatus,
    TargetStatus,
    build_status,
    render_status,
    status_from_json,
)
from tests.test_metrics import record

TOKEN = "page-token"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class FakeServer:
    """A plain in-memory StatusSource standing in for the running server."""

    def __init__(self) -> None:
        self.web_active = 0

    def status(self) -> list[RouteStatus]:
        return [
            RouteStatus(
                "web",
                "tcp",
                "127.0.0.1:8080",
                None,
                [TargetStatus("127.0.0.1:80", True, self.web_active), TargetStatus("127.0.0.1:81", False, 0)],
            ),
            RouteStatus("dns", "udp", "127.0.0.1:5353", None, [TargetStatus("127.0.0.1:53", True, 0)]),
        ]


class Admin:
    def __init__(self) -> None:
        self.source = FakeServer()
        self.metrics = MetricsObserver()
        process = ProcessStatus("0.1.0", 12.0, 1, "/etc/portway/portway.yml", None, None)
        self.thread = AdminThread(
            lambda: AdminServer(
                AdminApp(
                    metrics=lambda: b"",
                    status=lambda: render_status(
                        build_status(self.source.status(), self.metrics.snapshot(), process)
                    ),
                    token=TOKEN,
                ),
                "127.0.0.1:0",
            )
        )
        self.thread.start()
        assert self.thread.server is not None
        self.url = self.thread.server.url

    def open_connections(self, n: int) -> None:
        for _ in range(n):
            self.metrics.accepted("web", "tcp")
        self.source.web_active += n

    def close_connections(self, n: int) -> None:
        for _ in range(n):
            self.metrics.closed(record("web", c2t=1000, t2c=50_000))
        self.source.web_active -= n


@pytest.fixture
def admin() -> Iterator[Admin]:
    a = Admin()
    yield a
    a.thread.stop()


def fetch_status(url: str, token: str | None) -> tuple[int, Any]:
    req = urllib.request.Request(url + "/api/status")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def test_status_document(admin: Admin) -> None:
    assert fetch_status(admin.url, None)[0] == 401
    admin.open_connections(3)
    admin.close_connections(1)
    code, doc = fetch_status(admin.url, TOKEN)
    assert code == 200
    assert doc["schema"] == 1 and doc["process"]["config"] == "/etc/portway/portway.yml"
    web = doc["routes"][0]
    assert web["name"] == "web" and web["listen"] == "127.0.0.1:8080" and web["match"] is None
    assert web["totals"]["connections"] == 3 and web["totals"]["active"] == 2
    assert web["totals"]["bytes_target_to_client"] == 50_000
    assert web["totals"]["closes"] == {"normal": 1}
    assert web["targets"] == [
        {"target": "127.0.0.1:80", "up": True, "active": 2},
        {"target": "127.0.0.1:81", "up": False, "active": 0},
    ]
    assert status_from_json(doc).routes[1].protocol == "udp"  # the document parses back


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (os.access(CHROMEDRIVER, os.X_OK) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip("chromium or chromedriver is missing (Debian packages chromium, chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=420,900",  # a phone-sized window
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def shown(driver: Any, route: str, field: str) -> str:
    from selenium.webdriver.common.by import By

    css = f'section[data-route="{route}"] [data-field="{field}"]'
    elements = driver.find_elements(By.CSS_SELECTOR, css)
    return str(elements[0].text) if elements else ""


def wait_shown(driver: Any, route: str, field: str, want: str, timeout: float = 10.0) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: shown(d, route, field) == want,
        message=f"{route} {field} never showed {want!r} (last: {shown(driver, route, field)!r})",
    )


def test_page_follows_live_connections(admin: Admin, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(admin.url + "/?token=" + TOKEN)
    wait_shown(browser, "web", "active", "0")
    # The token left the address bar and lives in sessionStorage.
    assert "token" not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('portway-token')") == TOKEN
    loaded_at = browser.execute_script("return performance.timeOrigin")

    admin.open_connections(3)
    wait_shown(browser, "web", "active", "3")
    wait_shown(browser, "web", "connections", "3")
    admin.close_connections(2)
    wait_shown(browser, "web", "active", "1")
    assert shown(browser, "dns", "active") == "0"
    # Updated in place: the same document, never reloaded.
    assert browser.execute_script("return performance.timeOrigin") == loaded_at
    cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, 'section[data-route="web"] td')]
    assert cells[:4] == ["127.0.0.1:80", "1", "127.0.0.1:81", "0"]
    dots = browser.find_elements(By.CSS_SELECTOR, 'section[data-route="web"] .dot')
    assert [d.get_attribute("title") for d in dots] == ["up", "down"]
    # The charts have points.
    points = browser.find_element(By.CSS_SELECTOR, 'section[data-route="web"] polyline').get_attribute(
        "points"
    )
    assert len(points.split()) >= 3
    assert browser.find_element(By.ID, "error").text == ""
    shot = tmp_path / "status-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000


def test_page_without_token_says_so(admin: Admin, browser: Any) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(admin.url + "/")
    WebDriverWait(browser, 10, poll_frequency=0.1).until(
        lambda d: "unauthorized" in d.find_element("id", "error").text
    )
