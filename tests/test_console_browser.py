"""The console in a real browser (Debian's Chromium, headless, driven by Playwright) against the real Serve app:
log in (a wrong key is refused), see the demo task's champion, promote a version with the button and see /predict
answer with it, roll it back, abort a canary. Every page is screenshotted and the browser's console must stay free of
errors."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from flywheel.config import Settings
from flywheel.registry import Registry
from tests.conftest import ADMIN_TOKEN
from tests.test_serving import wait_for_version

pytestmark = [pytest.mark.serve, pytest.mark.vllm]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# A closed network: no background fetches, no component updates (each would log a refused connection).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[tuple[object, list[str]]]:
    """A fresh headless Chromium page, and the errors its console and scripts report."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs Debian's `chromium`")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("dialog", lambda dialog: dialog.accept())  # each button asks for confirmation: say yes
        try:
            yield page, errors
        finally:
            browser.close()


def _screenshots() -> Path:
    folder = Path(os.environ.get("FLYWHEEL_SCREENSHOTS", "console-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_an_admin_logs_in_sees_the_champion_and_moves_it_with_the_buttons(
        served: tuple[str, Settings], served_registry: Registry, browser_page: tuple[object, list[str]]) -> None:
    url, _ = served
    page, errors = browser_page
    shots = _screenshots()
    if served_registry.alias("champion") != "demo-v1":
        served_registry.promote("demo-v1", actor="test", reason="reset")
    wait_for_version(url, "demo-v1")
    try:
        page.goto(f"{url}/console")
        assert page.url.endswith("/console/login")
        page.get_by_label("Admin key").fill("fw_0123456789ab_" + "x" * 43)
        page.get_by_role("button", name="Log in").click()
        assert "not known" in page.get_by_role("alert").inner_text()
        page.screenshot(path=shots / "login-refused.png")
        refused = [e for e in errors if "status of 401" in e]  # the browser logs the refusal's status: expected
        assert len(refused) == 1, errors
        errors.remove(refused[0])

        page.get_by_label("Admin key").fill(ADMIN_TOKEN)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(f"{url}/console")
        assert page.locator("tr[data-task=demo] td.champion").inner_text() == "demo-v1"
        assert ADMIN_TOKEN not in page.url
        cookie = next(c for c in page.context.cookies() if c["name"] == "flywheel_console")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and ADMIN_TOKEN not in cookie["value"]
        page.screenshot(path=shots / "tasks.png", full_page=True)

        page.get_by_role("link", name="demo", exact=True).click()
        page.get_by_role("button", name="Promote demo-v2").click()
        page.wait_for_selector("p.done")
        assert "demo-v2 is champion" in page.locator("p.done").inner_text()
        assert served_registry.alias("champion") == "demo-v2"
        assert served_registry.history("champion")[-1].actor == "admin-token (console)"
        wait_for_version(url, "demo-v2")  # /predict answers with what the button promoted
        page.screenshot(path=shots / "task.png", full_page=True)

        page.get_by_role("button", name="Roll back champion").click()
        page.wait_for_function("document.querySelector('p.done').innerText.includes('rolled back')")
        assert served_registry.alias("champion") == "demo-v1"
        wait_for_version(url, "demo-v1")

        served_registry.promote("demo-v2", alias="canary", traffic_fraction=0.1, actor="test", reason="a trial")
        page.reload()
        page.get_by_role("button", name="Abort canary").click()
        page.wait_for_function("document.querySelector('p.done').innerText.includes('aborted')")
        assert served_registry.aliases()["canary"].traffic_fraction == 0.0

        page.goto(f"{url}/console/tasks/demo/versions/demo-v2")
        page.screenshot(path=shots / "version.png", full_page=True)
        for path, name in (("review", "review"), ("lineage?id=demo-v2", "lineage")):
            page.goto(f"{url}/console/{path}")
            assert page.locator("h1").count() == 1
            page.screenshot(path=shots / f"{name}.png", full_page=True)
        assert errors == []
    finally:
        if served_registry.aliases().get("canary") and served_registry.aliases()["canary"].traffic_fraction:
            served_registry.end_canary(actor="test", reason="reset")
        if served_registry.alias("champion") != "demo-v1":
            served_registry.promote("demo-v1", actor="test", reason="reset")
