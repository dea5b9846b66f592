"""What the pack adds to ComfyUI's web server: the queued-graph file check and the toy photos' previews.

Only a running server has `PromptServer.instance`; where there is none (ComfyUI imported in-process,
as the tests do) nothing is registered and the nodes work the same.
"""

from __future__ import annotations

import sys

from aiohttp import web

from .folders import toy_photo_preview, toy_photos
from .graph_files import remember_queued_graph

TOY_PHOTO_ROUTE = "/difflora/toy_photo/{name}"


async def _toy_photo(request: web.Request) -> web.StreamResponse:
    # Only the pack's own photos by exact name: no path from the request reaches the file system.
    path = toy_photos().get(request.match_info["name"])
    if path is None:
        return web.Response(status=404, text="no toy-world photo of that name")
    return web.Response(body=_enlarged_png(path), content_type="image/png", headers={"Cache-Control": "max-age=3600"})


def _enlarged_png(path) -> bytes:
    import io

    from PIL import Image

    with Image.open(path) as im:
        preview = toy_photo_preview(im.convert("RGB"))
    out = io.BytesIO()
    preview.save(out, format="PNG")
    return out.getvalue()


def register_server_routes() -> bool:
    """Register on the running server, once; False when there is no server (in-process use)."""
    # ComfyUI's main.py imports its `server` module and starts the server before loading packs;
    # never import it here (in-process use would drag the whole web app in).
    server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    if server is None or not hasattr(server, "add_on_prompt_handler") or getattr(server, "_difflora_routes", False):
        return False
    server.add_on_prompt_handler(remember_queued_graph)
    server.routes.get(TOY_PHOTO_ROUTE)(_toy_photo)
    server._difflora_routes = True
    return True
