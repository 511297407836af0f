"""The web page in a real browser (Playwright driving Debian's chromium): a template's form, a job whose graph
lights up as it runs, its image in the gallery, a screenshot."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.service.server import Server

CHROMIUM = Path("/usr/bin/chromium")


def test_the_page_runs_a_template_lights_up_its_graph_and_shows_the_image(server: Server, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium package is not installed (apt-get install chromium)")
    token = (server.data / "token").read_text().strip()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                             args=["--no-sandbox", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 720})
            page.goto(f"{server.url}/")
            page.fill("#token", token)
            page.dispatch_event("#token", "change")
            page.click("button.tpl:text-is('tiny_sd')")
            assert page.input_value("input[name=steps]") == "2"  # the form shows the param's default
            page.fill("input[name=seed]", "11")
            page.click("button[type=submit]")
            page.wait_for_selector("#graph .node.done[data-node=save]", timeout=30_000)
            page.wait_for_selector("#gallery img", timeout=30_000)
            states = page.eval_on_selector_all("#graph .node", "nodes => nodes.map(n => [n.dataset.node, "
                                               "n.getAttribute('class')])")
            width = page.eval_on_selector("#gallery img", "img => img.decode().then(() => img.naturalWidth)")
            # the graph (five layers, wider than the panel at this size) is scaled to fit: no node is cut off
            inside = page.eval_on_selector("#graph", "panel => { const box = panel.getBoundingClientRect(); return "
                                           "[...panel.querySelectorAll('.node')].map(n => n.getBoundingClientRect())"
                                           ".every(r => r.left >= box.left - 1 && r.right <= box.right + 1); }")
            page.screenshot(path=str(tmp_path / "serve_page.png"))
        finally:
            browser.close()
    classes = dict(states)
    assert "done" in classes["sample"] and ("cached" in classes["sd"] or "done" in classes["sd"])
    assert inside, "a node of the graph is outside its panel"
    assert width == 32 and (tmp_path / "serve_page.png").stat().st_size > 1000
