"""The real web frontend (comfyui-frontend-package 1.32.9) in headless Chromium: every template opens
from the Templates browser with no dialog, no two nodes overlap and the whole graph is in view at its
saved view; the toy-world template queued with the Run button finishes with its images shown."""

from __future__ import annotations

import os

import pytest

from devtools import browser
from devtools.make_workflows import VIEW, graphs

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

if browser.chromium_path() is None:
    why = ("no Chromium on this machine" + ("" if os.geteuid() == 0 else " and no root to install it") +
           ": .ci/run installs Debian's chromium (apt-get install chromium)")
    pytest.skip(why, allow_module_level=True)


@pytest.fixture(scope="module")
def page(comfy_path, tmp_path_factory):
    server = browser.harness_server(tmp_path_factory.mktemp("browser"))
    try:
        with browser.browser_page(server.url) as page:
            yield page
    finally:
        server.stop()


@pytest.mark.parametrize("name", sorted(graphs()))
def test_template_opens_cleanly_and_fits_the_view(page, name, tmp_path):
    browser.open_template(page, name)
    page.screenshot(path=str(tmp_path / f"{name}.png"))  # kept under pytest's tmp dir for a look
    assert browser.open_dialogs(page) == []
    geo = browser.geometry(page)
    assert len(geo["nodes"]) == len(graphs()[name][0])
    assert browser.overlaps(geo["nodes"]) == []
    assert browser.off_view(geo, VIEW) == []
    assert geo["scale"] >= 0.55  # node text is drawn (the frontend draws boxes only when zoomed out further)


def test_toy_world_runs_from_the_run_button(page):
    browser.open_template(page, "difflora_toy_world")
    browser.run_from_ui(page, browser.TOY_OUTPUTS)
    shown = page.evaluate(f"() => {browser.TOY_OUTPUTS}.map(id => window.app.graph.getNodeById(id).imgs.length)")
    assert shown == [4, 4]  # a batch of four, personalized and base
    assert browser.open_dialogs(page) == []
    assert browser.overlaps(browser.geometry(page)["nodes"]) == []  # the previews fit where they show
