"""The photo generators `augment` runs: one interface, `generate(reference, prompt, seed) -> images`.

- `ComfyUIGenerator`: the user's own ComfyUI server and an API-format workflow (File > Export
  (API) in ComfyUI) built around any identity method they use (PhotoMaker, InstantID, PuLID,
  IP-Adapter FaceID, a DiffLoRA hypernet). Three nodes are named, by id or by title: the LoadImage
  that gets the reference photo, the node whose text input gets the prompt, the node whose seed
  input gets the seed. Every image the workflow's output nodes report is one generated photo.
- `FaceIDGenerator` (`diffusers_generator`, faceid_generator.py): no server; a local SDXL with
  IP-Adapter FaceID in this process, the face entering as the reference's ArcFace embedding.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import GeneratorError
from .comfy_client import ComfyClient, _node_order, generator_error

SEED_INPUTS = ("seed", "noise_seed")  # KSampler, KSamplerAdvanced / RandomNoise
MAX_PHOTO_PIXELS = 8192 * 8192        # an upscaled SDXL photo is 4096 x 4096; beyond, a decompression bomb


def load_workflow(path: str | Path) -> dict:
    """An API-format workflow {node_id: {"class_type", "inputs"}}; a UI-format one is refused."""
    p = Path(path)
    if not p.is_file():
        raise GeneratorError(f"Workflow {p} not found: pass --workflow with an API-format workflow JSON "
                             "(in ComfyUI: Workflow > Export (API)).")
    try:
        graph = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise GeneratorError(f"Workflow {p} is not JSON ({e}).") from None
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise GeneratorError(f"Workflow {p} is in ComfyUI's UI format: export it with Workflow > Export (API) "
                             "and pass that file.")
    if not isinstance(graph, dict) or not graph or not all(
            isinstance(n, dict) and "class_type" in n and isinstance(n.get("inputs"), dict) for n in graph.values()):
        raise GeneratorError(f"Workflow {p} is not an API-format workflow (a mapping of node ids to "
                             "{class_type, inputs}).")
    return graph


def find_node(graph: dict, name: str) -> str | None:
    """The id of the node called `name`: its id, else its unique title (`_meta.title`)."""
    if name in graph:
        return name
    titled = _titled(graph, name)
    return titled[0] if len(titled) == 1 else None


def _titled(graph: dict, title: str) -> list[str]:
    return [i for i, n in graph.items() if (n.get("_meta") or {}).get("title") == title]


def _not_found(graph: dict, name: str, what: str) -> str:
    """Why `name` names no node: no such id or title, or a title several nodes share."""
    shared = _titled(graph, name)
    if len(shared) > 1:
        ids = ", ".join(sorted(shared, key=_node_order))
        return f"{name!r} ({what}): {len(shared)} nodes have that title (ids {ids}); name one by its id or give it a " \
               "title of its own"
    return f"{name!r} ({what})"


def named_inputs(graph: dict, image_node: str, prompt_node: str, seed_node: str,
                 prompt_input: str = "text", where: str = "the workflow") -> dict[str, tuple[str, str]]:
    """{role: (node id, input name)} for the three injected values, or one sentence naming every
    node that is missing or lacks its input."""
    wanted = {"reference image": (image_node, ("image",)), "prompt": (prompt_node, (prompt_input,)),
              "seed": (seed_node, SEED_INPUTS)}
    found, missing = {}, []
    for role, (name, inputs) in wanted.items():
        node_id = find_node(graph, name)
        if node_id is None:
            missing.append(_not_found(graph, name, f"the {role} node"))
            continue
        have = [i for i in inputs if i in graph[node_id]["inputs"]]
        if not have:
            missing.append(f"{name!r} has no input {' or '.join(inputs)} (it is a {graph[node_id]['class_type']})")
            continue
        found[role] = (node_id, have[0])
    if missing:
        titles = sorted({(n.get("_meta") or {}).get("title", "") for n in graph.values()} - {""})
        raise GeneratorError(f"{where} lacks {'; '.join(missing)}. Name nodes by id or by title "
                             f"(--image-node, --prompt-node, --seed-node); its titles are {titles}.")
    return found


class ComfyUIGenerator:
    """Queues the workflow on the server with the reference, prompt and seed injected."""

    name = "comfyui"

    def __init__(self, url: str, workflow: str | Path, image_node: str, prompt_node: str, seed_node: str,
                 prompt_input: str = "text", output_nodes: tuple[str, ...] = (), timeout: float = 600.0):
        self.graph = load_workflow(workflow)
        self.targets = named_inputs(self.graph, image_node, prompt_node, seed_node, prompt_input,
                                    where=f"Workflow {workflow}")
        self.output_nodes = []
        for name in output_nodes:
            node_id = find_node(self.graph, name)
            if node_id is None:
                why = _not_found(self.graph, name, "--output-node")
                raise GeneratorError(f"Workflow {workflow} has no single output node {why}.")
            self.output_nodes.append(node_id)
        self.client = ComfyClient(url, timeout=timeout)
        self.client.check()
        self._uploaded: dict[Path, str] = {}
        self._upload_lock = threading.Lock()  # prompts run in threads; upload each reference once

    def _upload(self, reference: Path) -> str:
        with self._upload_lock:
            if reference not in self._uploaded:
                data = reference.read_bytes()
                # A content-derived name: two identities' "reference.png" never overwrite each other.
                name = f"{hashlib.sha256(data).hexdigest()[:16]}{reference.suffix.lower()}"
                self._uploaded[reference] = self.client.upload_image(data, name)
            return self._uploaded[reference]

    def generate(self, reference: Path, prompt: str, seed: int) -> list[np.ndarray]:
        graph = json.loads(json.dumps(self.graph))  # a fresh copy per prompt (threads share self.graph)
        for role, value in (("reference image", self._upload(reference)), ("prompt", prompt), ("seed", seed)):
            node_id, key = self.targets[role]
            graph[node_id]["inputs"][key] = value
        images = []
        for data in self.client.run(graph, self.output_nodes or None):
            try:
                images.append(decode_photo(data))
            except ValueError as e:
                raise generator_error(f"ComfyUI at {self.client.url} returned an output that is not a usable image "
                                      f"({e}); check that the workflow's output node saves PNG or JPEG photos.",
                                      retry=True) from None
        if not images:
            raise GeneratorError(f"The workflow ran on {self.client.url} but no output node reported an image: "
                                 "end it with SaveImage or PreviewImage.")
        return images

    def cancel(self) -> None:
        """Give up every prompt in flight, cancelling each on the server (a second Ctrl-C)."""
        self.client.stopping.set()


def decode_photo(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 of an image file's bytes, or ValueError saying why not (never Pillow's repr of a buffer)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PHOTO_PIXELS:
                raise ValueError(f"{image.width} x {image.height} pixels, more than a photo has")
            return np.asarray(image.convert("RGB"))
    except Image.DecompressionBombError as e:  # Pillow refuses twice its own limit at open
        raise ValueError(f"a decompression bomb: {str(e).split(',')[0]}") from None
    except (OSError, SyntaxError, EOFError) as e:  # not an image file, or a damaged one
        raise ValueError(f"{len(data):,} bytes starting {data[:16]!r}: {type(e).__name__}") from None


def diffusers_generator(cfg, face_encoder=None):
    """The in-process backend: SDXL + IP-Adapter FaceID run by diffusers (faceid_generator.py)."""
    from .faceid_generator import faceid_generator

    return faceid_generator(cfg, face_encoder)
