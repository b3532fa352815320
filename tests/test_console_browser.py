"""The console in a real browser (Debian's Chromium, headless, driven by Playwright) against the real Serve app:
log in (a wrong key is refused), see the demo task's champion, promote a version with the button and see /predict
answer with it, roll it back, abort a canary; approve a correction in the review queue and find it reviewed on its
lineage page; start a retrain and see its run end with a verdict. Every page is screenshotted and the browser's
console must stay free of errors."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from flywheel.config import Settings
from flywheel.registry import Registry
from tests.conftest import ADMIN_TOKEN, free_port
from tests.test_console import console_app, pending_correction, trained_run
from tests.test_serving import wait_for_version

# What a basic accessibility check asks of a page: every control has a name a screen reader reads (a label, an
# aria-label, or a button's text), and every piece of text stands out from its background by WCAG AA's 4.5:1.
A11Y_PROBLEMS = r"""() => {
  const problems = [];
  for (const el of document.querySelectorAll("input:not([type=hidden]), select, textarea, button")) {
    const named = (el.labels && el.labels.length) || el.getAttribute("aria-label") || el.textContent.trim();
    if (!named) problems.push("unlabelled " + el.outerHTML.slice(0, 80));
  }
  const rgb = (c) => (c.match(/[\d.]+/g) || []).map(Number);
  const channel = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
  const lum = ([r, g, b]) => 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = rgb(getComputedStyle(e).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] > 0)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  for (const el of document.querySelectorAll("body *")) {
    const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!own || !el.getClientRects().length || el.closest("svg")) continue;
    const [a, b] = [lum(rgb(getComputedStyle(el).color).slice(0, 3)), lum(background(el))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    const text = el.textContent.trim().slice(0, 30);
    if (ratio < 4.5) problems.push(`contrast ${ratio.toFixed(2)} on ${el.tagName} "${text}"`);
  }
  return problems;
}"""

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# A closed network: no background fetches, no component updates (each would log a refused connection).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture
def chromium() -> Iterator[Any]:
    """Debian's Chromium, headless, through Playwright."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs Debian's `chromium`")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def _page(browser: Any, color_scheme: str = "light") -> tuple[Any, list[str]]:
    """A fresh page, and the errors its console and scripts report."""
    errors: list[str] = []
    page = browser.new_context(viewport={"width": 1400, "height": 900}, color_scheme=color_scheme).new_page()
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: dialog.accept())  # each button asks for confirmation: say yes
    return page, errors


@pytest.fixture
def browser_page(chromium: Any) -> tuple[Any, list[str]]:
    return _page(chromium)


@pytest.fixture
def console_server(tmp_path: Path) -> Iterator[tuple[str, Registry]]:
    """The console alone (tests/test_console.py's app) on a real HTTP server, for checks that need no engine."""
    app, settings, registry, _ = console_app(tmp_path)
    registry.promote(f"{registry.task}-v3", alias="canary", traffic_fraction=0.2, actor="gate")
    pending_correction(settings, registry.task)
    trained_run(settings, registry.task)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", registry
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_page_names_its_controls_and_reads_clearly_in_light_and_dark(
        chromium: Any, console_server: tuple[str, Registry], scheme: str) -> None:
    url, registry = console_server
    task = registry.task
    page, errors = _page(chromium, scheme)
    page.goto(f"{url}/console")
    assert page.evaluate(A11Y_PROBLEMS) == []  # the login form
    page.evaluate("""() => {  // the check itself: it must see faint text and a nameless field
      const faint = document.createElement("p");
      faint.textContent = "faint";
      Object.assign(faint.style, {color: "#aaa", background: "#fff"});
      document.body.append(faint, document.createElement("input"));
    }""")
    found = page.evaluate(A11Y_PROBLEMS)
    assert any('"faint"' in p for p in found) and any(p.startswith("unlabelled <input") for p in found), found
    page.reload()
    _log_in(page, url)
    shots = _screenshots()
    for name, path in (("tasks", ""), ("task", f"/tasks/{task}"), ("version", f"/tasks/{task}/versions/{task}-v2"),
                       ("loop", "/loop"), ("review", "/review"), ("lineage", f"/lineage?id={task}-v2")):
        page.goto(f"{url}/console{path}")
        assert page.evaluate(A11Y_PROBLEMS) == [], path
        page.screenshot(path=shots / f"{name}-{scheme}.png", full_page=True)
    assert errors == []


def _log_in(page: Any, url: str) -> None:
    page.goto(f"{url}/console/login")
    page.get_by_label("Admin key").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{url}/console")


def test_a_correction_approved_in_the_review_queue_is_reviewed_on_its_lineage_page(
        browser_page: tuple[Any, list[str]], console_server: tuple[str, Registry]) -> None:
    url, _ = console_server
    page, errors = browser_page
    _log_in(page, url)
    page.get_by_role("navigation", name="Console").get_by_role("link", name="Review queue").click()
    event_id = page.locator("tr[data-event]").get_attribute("data-event")
    page.get_by_label(f"Select correction {event_id}").check()
    page.get_by_label("Reason (recorded)").fill("the card menu is right")
    page.get_by_role("button", name="Approve selected").click()
    page.wait_for_selector("p.done")
    assert "approved 1" in page.locator("p.done").inner_text() and "Nothing waits for review." in page.content()

    page.get_by_role("link", name="Lineage").click()
    page.get_by_label("Version, request id or event id").fill(event_id)
    page.get_by_role("button", name="Search").click()
    event = page.locator(f'section[data-event="{event_id}"]')
    assert event.locator("dd.trust").inner_text() == "reviewed"
    assert "approve by admin-token (console): the card menu is right" in event.inner_text()
    assert errors == []


def test_start_retrain_asks_first_then_its_run_shows_with_its_verdict(
        browser_page: tuple[Any, list[str]], console_server: tuple[str, Registry]) -> None:
    """The console's home holds one pending correction: the retrain ends at its dataset stage, insufficient_data,
    in seconds (a real `flywheel retrain` child), and the page shows the run from start to verdict."""
    url, registry = console_server
    page, errors = browser_page
    asked: list[str] = []
    page.on("dialog", lambda dialog: asked.append(dialog.message))  # _page's own handler says yes
    _log_in(page, url)
    page.goto(f"{url}/console/tasks/{registry.task}")
    page.get_by_role("button", name="Start retrain").click()
    page.wait_for_selector("p.done")
    assert asked == [f"Start a retrain of {registry.task} now? The gate decides whether it ships."]
    run_id = page.locator("p.done").inner_text().split()[1]
    assert "by console:admin-token" in page.locator("ol.timeline").inner_text()
    page.goto(f"{url}/console/loop")
    verdict = page.locator(f'tr[data-run="{run_id}"] .verdict')
    deadline = time.monotonic() + 120
    while verdict.inner_text() == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
        page.reload()
    assert verdict.inner_text() == "insufficient_data"
    assert "at least 20 are needed" in page.locator(f'tr[data-run="{run_id}"]').inner_text()
    assert errors == []


def _screenshots() -> Path:
    folder = Path(os.environ.get("FLYWHEEL_SCREENSHOTS", "console-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.mark.serve
@pytest.mark.vllm
def test_an_admin_logs_in_sees_the_champion_and_moves_it_with_the_buttons(
        served: tuple[str, Settings], served_registry: Registry, browser_page: tuple[Any, list[str]]) -> None:
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
        page.wait_for_function("document.querySelector('p.done')?.innerText.includes('rolled back')")
        assert served_registry.alias("champion") == "demo-v1"
        wait_for_version(url, "demo-v1")

        served_registry.promote("demo-v2", alias="canary", traffic_fraction=0.1, actor="test", reason="a trial")
        page.reload()
        page.get_by_role("button", name="Abort canary").click()
        page.wait_for_function("document.querySelector('p.done')?.innerText.includes('aborted')")
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
