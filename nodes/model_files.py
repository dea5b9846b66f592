"""The model files a user places, as weights_manifest.json describes them: what a missing one is for.
(Plain Python, no ComfyUI import: tests read it from its file.)

A graph should not fail on its files one Run at a time, nor with a bare "not in list". The pack checks
a whole graph when it is queued (`files_in_graph`: the manifest's files wherever a node names one,
core loaders' checkpoints and CLIP visions included, and the loader inputs the pack knows), and this
module says where each missing file goes, what it is for and where it comes from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

MANIFEST = Path(__file__).resolve().parent.parent / "weights_manifest.json"
TOY_TEMPLATE = "difflora_toy_world"


@dataclass(frozen=True)
class MissingFile:
    folder: str        # a ComfyUI model folder ("checkpoints", "difflora", "insightface", ...)
    name: str          # the name the graph asks for; a folder of files ends in "/"
    node: str = ""     # which node asks, e.g. "#1 Load Checkpoint"


@lru_cache(maxsize=1)
def _entries() -> tuple[dict, ...]:
    try:
        models = json.loads(MANIFEST.read_text(encoding="utf-8"))["models"]
    except (OSError, ValueError, KeyError):
        return ()  # an installed copy without the manifest: the message still names folder and file
    return tuple(m for m in models if m.get("variant") in ("real", "embedded-default"))


def describe(folder: str, name: str) -> tuple[str, str]:
    """(what the file is for, where it comes from) from the manifest; ("", "") for a file it does not list."""
    for m in _entries():
        # A name ending in "/" is a folder of files (an insightface pack: models/antelopev2/).
        if m.get("folder") == folder and (m.get("file") == name or (name.endswith("/") and
                                                                     str(m.get("file", "")).startswith(name))):
            return m.get("role", ""), m.get("source", "")
    return "", ""


def manifest_folder(name: str) -> str | None:
    """The model folder the manifest puts a file of this name in; None for a name it does not list."""
    return next((m["folder"] for m in _entries() if m.get("folder") and m.get("file") == name), None)


def files_in_graph(prompt: dict, loader_inputs: dict[tuple[str, str], str]) -> list[MissingFile]:
    """Every model file an API-format graph names: (folder, name, node) for each input that is one of
    `loader_inputs` {(class_type, input name): folder}, or whose value is a file the manifest lists."""
    found = []
    for node_id, node in sorted(prompt.items(), key=lambda kv: (len(str(kv[0])), str(kv[0]))):
        if not isinstance(node, dict):
            continue
        kind = node.get("class_type", "")
        title = (node.get("_meta") or {}).get("title") or kind
        for key, value in (node.get("inputs") or {}).items():
            if not isinstance(value, str):
                continue  # a link or a number
            folder = loader_inputs.get((kind, key)) or manifest_folder(value)
            if folder:
                found.append(MissingFile(folder, value, f"#{node_id} {title}"))
    return found


def _path(f: MissingFile) -> str:
    return f"models/{f.folder}/{f.name}"


def missing_files_message(missing: list[MissingFile]) -> str:
    """One message naming every missing file: where it goes, what it is for, where to get it.
    The first line names every file with its folder: some frontends show only that line at first."""
    many = len(missing) > 1
    lines = [f"Missing model file{'s' if many else ''} (ComfyUI/models/...): {', '.join(_path(f) for f in missing)}"
             + (f" ({len(missing)} files, each below)" if many else "")]
    for f in missing:
        role, source = describe(f.folder, f.name)
        line = f"- ComfyUI/{_path(f)}" + (f" (asked for by {f.node})" if f.node else "")
        line += f": {role}" if role else ""
        line += f". Get it: {source}" if source else ""
        lines.append(line)
    lines.append(f"To try DiffLoRA with nothing to download, open the template '{TOY_TEMPLATE}' (it uses only files "
                 "that ship with the pack).")
    return "\n".join(lines)
