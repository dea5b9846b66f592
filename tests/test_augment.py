"""augment's bad inputs and its bookkeeping, with a stub face encoder (a face is a flat colour, its
embedding that colour), fake generators and a fake ComfyUI HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from devtools.comfy_server import free_port
from difflora.encoders.base import DetectedFace, FaceEncoder
from difflora.errors import DiffLoRAError, GeneratorError
from difflora.photos import augment
from difflora.photos.augment import augment_identities
from difflora.train.config import AugmentConfig
from difflora.photos.generators import ComfyUIGenerator

RED, BLUE = (200, 30, 30), (30, 30, 200)


class ColourFaces(FaceEncoder):
    """Black: no face. White: two faces. Else one face whose embedding is the mean colour."""

    kind, embedding_dim = "colour", 3

    def _detect(self, image):
        mean = image.reshape(-1, 3).mean(0)
        count = 0 if mean.max() < 5 else 2 if mean.min() > 250 else 1
        return [DetectedFace(box=(0, 0, image.shape[1], image.shape[0]), score=1.0) for _ in range(count)]

    def embed(self, image, face):
        return torch.tensor(image.reshape(-1, 3).mean(0), dtype=torch.float32)


def flat(colour, size=64):
    return np.full((size, size, 3), colour, np.uint8)


def one_photo_data(root: Path, names=("ann", "bob")) -> Path:
    for name in names:
        (root / name).mkdir(parents=True)
        Image.fromarray(flat(RED)).save(root / name / "001.png")
        (root / name / "001.txt").write_text("a photo of sks person\n")
    return root


class ScriptedGenerator:
    """Photo k's colour is script(k) (k recovered from the call order per reference)."""

    def __init__(self, script, stop_after: int | None = None):
        self.script, self.stop_after, self.calls, self.lock = script, stop_after, [], threading.Lock()

    def generate(self, reference, prompt, seed):
        with self.lock:
            self.calls.append((reference.parent.name, prompt, seed))
            n = len(self.calls)
        if self.stop_after is not None and n == self.stop_after:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does; StopRequest turns it into a flag
        return [flat(self.script(seed))]


def config(tmp_path, **kw) -> AugmentConfig:
    base = dict(data=str(tmp_path / "data"), out=str(tmp_path / "out"), target_images=4, concurrency=1,
                min_face_similarity=0.99, progress=False)
    return AugmentConfig(**{**base, **kw})


def test_no_face_several_faces_and_another_person_are_rejected_counted_never_kept(tmp_path):
    one_photo_data(tmp_path / "data", ("ann",))
    colours = iter([(0, 0, 0), (255, 255, 255), BLUE, RED, RED, RED])
    reports = augment_identities(config(tmp_path), generator=ScriptedGenerator(lambda seed: next(colours)),
                                 face_encoder=ColourFaces())
    r = reports[0]
    assert (r.status, r.generated, r.kept, r.rejected) == ("augmented", 6, 3, 3)
    reasons = [p["reason"] for p in r.photos if p["status"] == "rejected"]
    assert reasons[0] == "no face found" and reasons[1] == "2 faces found"
    assert reasons[2].startswith("another person (face similarity 0.") and r.photos[2]["similarity"] < 0.99
    out = tmp_path / "out" / "ann"
    assert sorted(p.name for p in out.glob("gen_*.png")) == sorted(p["file"] for p in r.photos if p["file"])
    assert len(list(out.glob("gen_*.png"))) == 3 and (out / "reference.png").is_file()
    assert not list((tmp_path / "out").rglob("*.partial"))


def test_a_generator_that_never_matches_ends_short_with_a_sentence(tmp_path):
    one_photo_data(tmp_path / "data", ("ann",))
    r = augment_identities(config(tmp_path, max_attempts=5), generator=ScriptedGenerator(lambda s: BLUE),
                           face_encoder=ColourFaces())[0]
    assert (r.status, r.generated, r.kept) == ("short", 5, 0)
    assert "raise --max-attempts" in r.reason
    assert not list((tmp_path / "out" / "ann").glob("gen_*"))


def test_a_stop_mid_run_is_continued_by_the_rerun_without_regenerating(tmp_path):
    one_photo_data(tmp_path / "data")
    script = lambda seed: RED if seed % 3 else BLUE  # noqa: E731 - some photos of another person
    cfg = config(tmp_path, target_images=5)
    first = ScriptedGenerator(script, stop_after=3)
    reports = augment_identities(cfg, generator=first, face_encoder=ColourFaces())
    assert [r.status for r in reports] == ["interrupted", "interrupted"]  # bob: stopped before it started
    second = ScriptedGenerator(script)
    reports = augment_identities(cfg, generator=second, face_encoder=ColourFaces())
    assert [r.status for r in reports] == ["augmented", "augmented"]
    assert not set(first.calls) & set(second.calls)                     # nothing finished is generated again
    # ... and the result is the uninterrupted run's: same photos tried, same kept.
    whole = ScriptedGenerator(script)
    again = augment_identities(config(tmp_path, out=str(tmp_path / "whole"), target_images=5), generator=whole,
                               face_encoder=ColourFaces())
    assert sorted(first.calls + second.calls) == sorted(whole.calls)
    assert [[p["file"] for p in r.photos] for r in reports] == [[p["file"] for p in r.photos] for r in again]


def test_the_source_folders_are_never_written(tmp_path):
    data = one_photo_data(tmp_path / "data")
    before = sorted((p.relative_to(data), p.stat().st_mtime_ns) for p in data.rglob("*"))
    augment_identities(config(tmp_path), generator=ScriptedGenerator(lambda s: RED), face_encoder=ColourFaces())
    assert sorted((p.relative_to(data), p.stat().st_mtime_ns) for p in data.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]  # no cache beside the source folders
    with pytest.raises(DiffLoRAError, match="inside --data"):
        augment_identities(config(tmp_path, out=str(data / "augmented")), generator=ScriptedGenerator(lambda s: RED),
                           face_encoder=ColourFaces())


# --- the ComfyUI backend ------------------------------------------------------------------------

def workflow_file(tmp_path, graph=None) -> Path:
    graph = graph or {
        "2": {"class_type": "LoadImage", "inputs": {"image": "x.png"}, "_meta": {"title": "Reference photo"}},
        "10": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]},
               "_meta": {"title": "Positive prompt"}},
        "14": {"class_type": "KSampler", "inputs": {"seed": 0, "steps": 2}, "_meta": {"title": "KSampler"}},
        "16": {"class_type": "SaveImage", "inputs": {"images": ["15", 0]}, "_meta": {"title": "Save Image"}}}
    path = tmp_path / "workflow_api.json"
    path.write_text(json.dumps(graph))
    return path


NODES = dict(image_node="Reference photo", prompt_node="Positive prompt", seed_node="KSampler")


def test_an_unreachable_server_is_a_sentence_naming_its_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(GeneratorError, match=f"The ComfyUI server at {url} is not reachable"):
        ComfyUIGenerator(url, workflow_file(tmp_path), **NODES)


def test_a_workflow_without_the_named_nodes_names_the_missing_ones(tmp_path):
    graph = {"14": {"class_type": "KSampler", "inputs": {"seed": 0}, "_meta": {"title": "KSampler"}},
             "10": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1]}, "_meta": {"title": "Prompt"}}}
    with pytest.raises(GeneratorError) as e:
        ComfyUIGenerator("http://127.0.0.1:1", workflow_file(tmp_path, graph), image_node="Reference photo",
                         prompt_node="Prompt", seed_node="14")
    message = str(e.value)
    assert "'Reference photo' (the reference image node)" in message
    assert "'Prompt' has no input text" in message and "'14'" not in message
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": []}))
    with pytest.raises(GeneratorError, match="UI format: export it with Workflow > Export"):
        ComfyUIGenerator("http://127.0.0.1:1", ui, **NODES)


class FakeComfy(BaseHTTPRequestHandler):
    """Just enough of ComfyUI's API: the first /prompt fails (HTTP 500), later ones 'draw' a flat red
    image; records what was uploaded and queued, and the most prompts ever in flight."""

    state: dict = {}

    def log_message(self, *a):
        pass

    def _send(self, body: bytes, code=200, kind="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        s = self.state
        if self.path == "/system_stats":
            return self._send(json.dumps({"system": {}, "devices": []}).encode())
        if self.path.startswith("/history/"):
            pid = self.path.rsplit("/", 1)[1]
            with s["lock"]:
                s["polls"][pid] = s["polls"].get(pid, 0) + 1
                if s["polls"][pid] < 3:   # still running for two polls
                    return self._send(b"{}")
                s["running"].discard(pid)
            out = {"16": {"images": [{"filename": f"{pid}.png", "subfolder": "", "type": "output"}]}}
            return self._send(json.dumps({pid: {"status": {"completed": True, "status_str": "success"},
                                                "outputs": out}}).encode())
        if self.path.startswith("/view?"):
            import io
            buf = io.BytesIO()
            Image.fromarray(flat(RED)).save(buf, format="PNG")
            return self._send(buf.getvalue(), kind="image/png")
        self._send(b"{}", 404)

    def do_POST(self):
        s = self.state
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/upload/image":
            s["uploads"].append(body)
            return self._send(json.dumps({"name": "ref.png", "subfolder": "difflora_augment", "type": "input"}).encode())
        if self.path == "/prompt":
            with s["lock"]:
                s["attempts"] += 1
                if s["attempts"] == 1:
                    return self._send(b'{"error": "out of memory"}', 500)
                pid = f"p{s['attempts']}"
                s["queued"].append(json.loads(body)["prompt"])
                s["running"].add(pid)
                s["max_running"] = max(s["max_running"], len(s["running"]))
            return self._send(json.dumps({"prompt_id": pid, "number": 0, "node_errors": {}}).encode())
        self._send(b"{}", 404)


def test_comfyui_backend_injects_reference_prompt_and_seed_retries_and_bounds_concurrency(tmp_path, monkeypatch):
    monkeypatch.setattr(augment, "RETRY_DELAY", 0.0)
    FakeComfy.state = {"lock": threading.Lock(), "uploads": [], "queued": [], "polls": {}, "running": set(),
                       "max_running": 0, "attempts": 0}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeComfy)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        data = one_photo_data(tmp_path / "data", ("ann",))
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("# scenes\nbeach portrait | a photo of sks person at the beach\nstudio portrait\n")
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        cfg = config(tmp_path, server=url, workflow=str(workflow_file(tmp_path)), prompts=str(prompts),
                     target_images=6, concurrency=2, **NODES)
        generator = ComfyUIGenerator(url, cfg.workflow, **NODES, timeout=30)
        generator.client.poll = 0.01
        r = augment_identities(cfg, generator=generator, face_encoder=ColourFaces())[0]
    finally:
        httpd.shutdown()
    s = FakeComfy.state
    # 5 missing; a prompt still in flight when the 5th is kept is kept too (at most concurrency - 1 more).
    assert r.status == "augmented" and 5 <= r.kept <= 6
    assert len(s["queued"]) == r.kept and s["attempts"] == r.kept + 1   # the failed prompt was retried
    assert s["max_running"] <= 2                                 # --concurrency 2
    assert len(s["uploads"]) == 1 and (data / "ann" / "001.png").read_bytes() in s["uploads"][0]
    assert {g["2"]["inputs"]["image"] for g in s["queued"]} == {"difflora_augment/ref.png"}
    assert sorted(g["10"]["inputs"]["text"] for g in s["queued"]) == sorted(
        ["beach portrait", "studio portrait"][p["index"] % 2] for p in r.photos)
    assert sorted(g["14"]["inputs"]["seed"] for g in s["queued"]) == sorted(p["seed"] for p in r.photos)
    captions = {(tmp_path / "out" / "ann" / p["file"]).with_suffix(".txt").read_text().strip() for p in r.photos}
    assert captions == {"a photo of sks person at the beach", "studio portrait"}
