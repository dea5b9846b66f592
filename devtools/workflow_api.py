"""Shipped workflows are UI-format graphs (what ComfyUI's "Load" opens); queueing one over
HTTP needs the API form. This converts with the server's own /object_info, the way the
frontend does, so a test proves the UI file itself is complete and consistent."""

from __future__ import annotations

import copy

# Widgets the frontend adds after a seed-like INT that have no input of their own.
_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# Nodes the frontend draws but never sends to the server.
_FRONTEND_ONLY = {"Note", "MarkdownNote"}
# Inputs that are always sockets, never widgets.
_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in _WIDGET_TYPES


def _widget_names(info: dict) -> list[tuple[str, list]]:
    out = []
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            if _is_widget(spec):
                out.append((name, spec))
    return out


def ui_to_api(workflow: dict, object_info: dict, overrides: dict | None = None,
              class_overrides: dict | None = None) -> dict:
    """UI workflow JSON -> API prompt. `overrides` maps node id (str) -> {input: value} and
    `class_overrides` node class -> {input: value}, for running a shipped graph on tiny test
    models (fewer steps, smaller images) without editing the file."""
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted / bypassed nodes do not run
            continue
        kind = node["type"]
        if kind in _FRONTEND_ONLY:  # notes live on the canvas only; the frontend never queues them
            continue
        if kind not in object_info:
            raise KeyError(f"node {node['id']}: type {kind!r} is not installed on this server")
        info = object_info[kind]
        inputs: dict = {}
        values = list(node.get("widgets_values") or [])
        linked = {i["name"]: i.get("link") for i in node.get("inputs", [])}
        pos = 0
        for name, spec in _widget_names(info):
            if pos >= len(values):
                break
            inputs[name] = values[pos]
            pos += 1
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if options.get("control_after_generate") and pos < len(values) and values[pos] in _CONTROL_VALUES:
                pos += 1
        for name, link_id in linked.items():
            if link_id is None:
                continue
            _, src, slot, _, _, _ = links[link_id]
            inputs[name] = [str(src), slot]
        for name, value in {**(class_overrides or {}).get(kind, {}),
                            **(overrides or {}).get(str(node["id"]), {})}.items():
            inputs[name] = value
        # As the frontend queues a graph: each node's title under _meta (the pack's reports name nodes by it).
        title = node.get("title") or info.get("display_name") or kind
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs, "_meta": {"title": title}}
    return copy.deepcopy(prompt)
