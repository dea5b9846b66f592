"""The model files a user places, as weights_manifest.json describes them: what a missing one is for.
(Plain Python, no ComfyUI import: tests read it from its file.)

A graph should not fail on its files one Run at a time, nor with a bare "not in list". Each of the
pack's loaders checks its file at validation (ComfyUI's own loaders check theirs in the same pass, so
the first Run reports every missing file together), and this module says where the file goes, what
it is for and where it comes from, from the manifest the pack ships.
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


def missing_files_message(missing: list[MissingFile]) -> str:
    """One message naming every missing file: where it goes, what it is for, where to get it."""
    lines = [f"{len(missing)} file(s) this graph needs {'is' if len(missing) == 1 else 'are'} not installed:"]
    for f in missing:
        role, source = describe(f.folder, f.name)
        line = f"- ComfyUI/models/{f.folder}/{f.name}" + (f" (asked for by {f.node})" if f.node else "")
        line += f": {role}" if role else ""
        line += f". Get it: {source}" if source else ""
        lines.append(line)
    lines.append(f"To try DiffLoRA with nothing to download, open the template '{TOY_TEMPLATE}' (it uses only files "
                 "that ship with the pack).")
    return "\n".join(lines)
