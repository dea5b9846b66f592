"""The real ComfyUI web frontend in headless Chromium: load the pack's templates as a user does and
look at what the user sees (for tests/test_browser.py and `python -m devtools.browser`).

    python -m devtools.browser    # rewrites workflows/*.jpg (template thumbnails) and docs/screenshots/

The frontend is the `comfyui-frontend-package` the harness ComfyUI pins (DIFFLORA_COMFYUI: 1.32.9 for
0.3.75, 1.49.6 for 0.33.0; devtools/get_comfyui.py `frontend_root`), served by the harness server; the
browser is the system's Chromium (Debian's `chromium`), driven by Playwright, whose own browser download
cannot work on these machines.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from .comfy_server import PACK_LINK_NAME

REPO = Path(__file__).resolve().parent.parent

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOY_OUTPUTS = [16, 33]  # the toy-world template's Save Image nodes: personalized, base model
TOY_PHOTO_NODE, TOY_SAVE_LORA, TOY_ENCODE = 2, 17, 6
# Newer template browsers list a pack's templates under its folder name, the harness's install name.
PACK_CATEGORY = PACK_LINK_NAME

# Every node's box as the frontend lays it out (title bar included), and the saved view.
_GEOMETRY_JS = """() => { const c = window.app.canvas, ds = c.ds;
  return {scale: ds.scale, offset: Array.from(ds.offset),
          nodes: window.app.graph._nodes.map(n => ({id: n.id, type: n.type, title: n.title,
                                                   box: Array.from(n.getBounding())}))}; }"""


def chromium_path() -> str | None:
    for name in (os.environ.get("DIFFLORA_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        found = name and shutil.which(name)
        if found:
            return found
    return None


@contextmanager
def browser_page(url: str):
    """A fresh page of headless Chromium at `url`, once the ComfyUI app has started."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            from .make_workflows import WINDOW  # the window the templates' saved views are fitted to

            page = browser.new_page(viewport={"width": WINDOW[0], "height": WINDOW[1]})
            page.goto(url)
            page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
            yield page
        finally:
            browser.close()


def open_template(page, name: str) -> None:
    """Open the Templates browser (the side bar's button; it opens by itself on a first visit) and
    click the template's card, as a user does. Newer frontends list a pack's templates under the
    pack's own category (its folder name) in the browser's side list."""
    card = page.get_by_text(name, exact=True).first
    try:
        card.wait_for(state="visible", timeout=10_000)
    except Exception:  # noqa: BLE001 - playwright's TimeoutError: the browser is not open yet
        open_pack_templates(page)
        card.wait_for(state="visible", timeout=30_000)
    card.click()
    page.wait_for_function(f"() => window.app.graph._nodes.length > 0 && "
                           f"(window.app.extensionManager.workflow.activeWorkflow?.filename === {json.dumps(name)})",
                           timeout=60_000)
    # Load Image nodes fetch their photo after the graph loads; their preview is part of their box.
    page.wait_for_function("() => window.app.graph._nodes.filter(n => n.type === 'LoadImage')"
                           ".every(n => n.imgs && n.imgs.length && n.imgs[0].complete)", timeout=60_000)
    time.sleep(0.5)  # one more frame: sizes settle after the images draw


def template_card_text(page, name: str) -> str:
    """What the template browser's card of `name` says (the browser must be open on the pack's templates)."""
    card = page.locator(f'[data-testid="template-workflow-{name}"]').first
    card.wait_for(state="visible", timeout=30_000)
    time.sleep(0.5)  # the pack's description goes in once the card is drawn
    return card.inner_text()


def open_pack_templates(page) -> None:
    """The Templates browser (it opens by itself on a first visit), showing the pack's templates."""
    category = page.get_by_text(PACK_CATEGORY, exact=True).first
    try:
        category.wait_for(state="visible", timeout=5_000)
    except Exception:  # noqa: BLE001 - playwright's TimeoutError: the browser is not open
        page.locator(".side-bar-button", has_text="Templates").first.click()
    try:
        category.wait_for(state="visible", timeout=10_000)
        category.click()
    except Exception:  # noqa: BLE001 - this frontend has no category list: it shows every template at once
        pass


def close_templates(page) -> None:
    """Close the Templates browser with its close button: the text-less button at its top right."""
    page.evaluate("""() => { const d = document.querySelector('[role=dialog]'); if (!d) return;
        const right = b => b.getBoundingClientRect().right - b.getBoundingClientRect().top;
        const close = Array.from(d.querySelectorAll('button')).filter(b => b.offsetParent && !b.innerText.trim())
            .sort((a, b) => right(b) - right(a))[0];
        close?.click(); }""")
    page.locator('[data-testid^="template-workflow-"]').first.wait_for(state="hidden", timeout=10_000)


def switch_to_tab(page, name: str) -> None:
    """Click the open workflow's tab, as a user switches between workflows."""
    page.get_by_text(name, exact=True).first.click()
    page.wait_for_function(f"() => window.app.extensionManager.workflow.activeWorkflow?.filename === {json.dumps(name)}",
                           timeout=30_000)
    time.sleep(1.0)  # the tab's graph and its kept outputs are restored, then drawn


def error_report(page, contains: str, timeout: float = 120.0) -> str:
    """Every error text the frontend shows after a Run, once it shows `contains`: a dialog (frontend 1.32),
    or the errors panel its toast's "View details" opens, each entry's details expanded (frontend 1.49)."""
    deadline = time.monotonic() + timeout
    while True:
        details = page.get_by_role("button", name="View details")
        if details.count() and details.first.is_visible():
            _try_click(details.first)
            time.sleep(1.0)
        for info in page.locator("[aria-label^='Info for'][aria-expanded='false']").all():
            if info.is_visible():
                _try_click(info)
        text = "\n".join([*open_dialogs(page), page.locator("body").inner_text()])
        if contains in text:
            return text
        if time.monotonic() > deadline:
            raise TimeoutError(f"no error showing {contains!r} after {timeout:.0f} s; the page shows:\n{text[-3000:]}")
        time.sleep(1.0)


def _try_click(locator) -> None:
    try:
        locator.click(timeout=5_000)
    except Exception:  # noqa: BLE001 - covered or gone meanwhile: the next look tries again
        pass


def dismiss_errors(page) -> None:
    """Close an error dialog (frontend 1.32) or the errors panel (frontend 1.49)."""
    page.keyboard.press("Escape")
    panel = page.locator("[aria-label='Toggle properties panel'], [aria-label='Close panel']")
    if panel.count() and panel.first.is_visible():
        panel.first.click()
    time.sleep(0.5)


def feed_image_to(page, filename: str, node_id: int, input_name: str) -> None:
    """Add a Load Image node of `filename` (in the server's input folder) and connect it to an input."""
    page.evaluate(f"""() => {{ const LG = window.LiteGraph, g = window.app.graph, target = g.getNodeById({node_id});
        const n = LG.createNode('LoadImage'); n.pos = [target.pos[0] - 340, target.pos[1] + 700]; g.add(n);
        n.widgets.find(w => w.name === 'image').value = {json.dumps(filename)};
        n.connect(0, target, target.findInputSlot({json.dumps(input_name)})); }}""")
    time.sleep(0.5)


def combo_options(page, node_id: int, widget: str) -> list:
    return page.evaluate(f"() => window.app.graph.getNodeById({node_id}).widgets.find(w => w.name === "
                         f"{json.dumps(widget)}).options.values")


def toy_photo_url(page, name: str) -> str:
    """The address the pack serves a toy-world photo at (nodes/server_routes.py), as the page asks for it."""
    return page.evaluate(f"() => new URL(window.comfyAPI.api.api.apiURL('/difflora/toy_photo/' + "
                         f"encodeURIComponent({json.dumps(name)})), location.href).href")


def node_value(page, node_id: int, widget: str):
    return page.evaluate(f"() => window.app.graph.getNodeById({node_id}).widgets.find(w => w.name === "
                         f"{json.dumps(widget)}).value")


def pick(page, node_id: int, widget: str, value) -> None:
    """Set a combo as picking from its menu does: the value, then the widget's callback."""
    page.evaluate(f"""() => {{ const n = window.app.graph.getNodeById({node_id});
        const w = n.widgets.find(w => w.name === {json.dumps(widget)});
        w.value = {json.dumps(value)}; w.callback?.(w.value, window.app.canvas, n); }}""")


def preview_sources(page, node_id: int, timeout: float = 15.0) -> list[str]:
    """The sources of the images a node previews, once they have loaded."""
    page.wait_for_function(f"() => (window.app.graph.getNodeById({node_id}).imgs || []).every(i => i.complete)",
                           timeout=timeout * 1000)
    return page.evaluate(f"() => (window.app.graph.getNodeById({node_id}).imgs || []).map(i => i.src)")


def geometry(page) -> dict:
    return page.evaluate(_GEOMETRY_JS)


def open_dialogs(page) -> list[str]:
    """Texts of the dialogs open now (a missing-nodes or missing-models dialog would be one)."""
    return [t for t in page.locator(".p-dialog").all_inner_texts() if t.strip()]


def overlaps(nodes: list[dict]) -> list[tuple[str, str]]:
    """Pairs of nodes whose boxes intersect."""
    out = []
    for i, a in enumerate(nodes):
        ax, ay, aw, ah = a["box"]
        for b in nodes[i + 1:]:
            bx, by, bw, bh = b["box"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                out.append((f"#{a['id']} {a['title']}", f"#{b['id']} {b['title']}"))
    return out


def off_view(geo: dict, view: tuple[int, int, int, int]) -> list[str]:
    """Nodes not wholly inside `view` (left, top, right, bottom, in window pixels) at the saved view."""
    s, (ox, oy) = geo["scale"], geo["offset"]
    left, top, right, bottom = view
    out = []
    for n in geo["nodes"]:
        x, y, w, h = n["box"]
        sx0, sy0, sx1, sy1 = (x + ox) * s, (y + oy) * s, (x + w + ox) * s, (y + h + oy) * s
        if sx0 < left - 1 or sy0 < top - 1 or sx1 > right + 1 or sy1 > bottom + 1:
            out.append(f"#{n['id']} {n['title']} at ({sx0:.0f}, {sy0:.0f})-({sx1:.0f}, {sy1:.0f})")
    return out


def run_from_ui(page, output_nodes: list[int], timeout: float = 240.0) -> None:
    """Press Run and wait until every one of `output_nodes` (Save Image nodes) shows its images."""
    page.get_by_role("button", name="Run").first.click()
    page.wait_for_function(f"() => {json.dumps(output_nodes)}.every(id => "
                           "(window.app.graph.getNodeById(id)?.imgs || []).length > 0)", timeout=timeout * 1000)
    time.sleep(0.5)


def harness_server(base_dir: Path):
    """The harness ComfyUI with the real frontend, the pack, and the tiny models and photos under the
    shipped graphs' file names, so every template finds what it names."""
    from . import harness_models
    from .comfy_server import ComfyServer
    from .get_comfyui import frontend_root, get_comfyui

    server = ComfyServer(get_comfyui(), base_dir=base_dir, front_end_root=frontend_root())
    server.start()
    harness_models.install(server, harness_models.build_models(base_dir / "harness_models"))
    harness_models.reference_photos(server.input_dir)
    return server


@contextmanager
def models_missing(server, files: list[tuple[str, str]]):
    """The server as a bare install sees it: these (folder, name) model files moved away meanwhile."""
    import tempfile

    with tempfile.TemporaryDirectory() as away:
        moved = [(server.models_dir(folder) / name, Path(away) / f"{folder}__{name}") for folder, name in files]
        for path, aside in moved:
            path.rename(aside)
        try:
            yield
        finally:
            for path, aside in moved:
                aside.rename(path)


def show_missing_files(server, page) -> str:
    """Queue difflora_basic with its checkpoint, CLIP vision and hypernet not installed; the report shown."""
    from .make_workflows import CKPT, CLIP_VISION, HYPERNET

    with models_missing(server, [("checkpoints", CKPT), ("clip_vision", CLIP_VISION), ("difflora", HYPERNET)]):
        open_template(page, "difflora_basic")
        page.get_by_role("button", name="Run").first.click()
        return error_report(page, contains="Missing model files")


def main() -> None:
    """Template thumbnails (workflows/<name>.jpg, what the template browser shows) and screenshots, on the
    floor ComfyUI's frontend; on another (DIFFLORA_COMFYUI=0.33.0) the toy template after a Run and the
    missing-files report, named after that frontend."""
    import tempfile

    from PIL import Image

    from .get_comfyui import COMFYUI_VERSION, SOURCES, selected_version
    from .make_workflows import graphs, VIEW

    shots = REPO / "docs" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    floor = selected_version() == COMFYUI_VERSION
    suffix = "" if floor else f"_frontend-{SOURCES[selected_version()].frontend}"
    with tempfile.TemporaryDirectory() as tmp:
        server = harness_server(Path(tmp))
        try:
            with browser_page(server.url) as page:
                for name in sorted(graphs()) if floor else []:
                    open_template(page, name)
                    png = shots / f"template_{name}.png"
                    page.screenshot(path=str(png))
                    left, top, right, bottom = VIEW
                    thumb = Image.open(png).convert("RGB").crop((left, top, right, bottom))
                    thumb.thumbnail((640, 400))
                    thumb.save(REPO / "workflows" / f"{name}.jpg", quality=85)
                    print(f"wrote {png.relative_to(REPO)} and workflows/{name}.jpg")
                open_template(page, "difflora_toy_world")
                run_from_ui(page, TOY_OUTPUTS)
                page.screenshot(path=str(shots / f"toy_world_run{suffix}.png"))
                print(f"wrote docs/screenshots/toy_world_run{suffix}.png")
                show_missing_files(server, page)
                time.sleep(1.5)  # the expanded details fade in
                page.screenshot(path=str(shots / f"missing_files{suffix}.png"))
                print(f"wrote docs/screenshots/missing_files{suffix}.png")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
