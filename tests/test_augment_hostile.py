"""augment against a misbehaving ComfyUI and careless input (issue 27): every fault ends in a sentence,
the reports are written, a prompt given up on is cancelled on the server, and Ctrl-C stops.

The fake server listens on 127.0.0.1 only; every stall it scripts ends by itself within seconds
(or when the test ends), and the client's time-outs are short, so no test can hang.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import struct
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difflora.errors import GeneratorError
from difflora.photos import augment, comfy_client
from difflora.photos.augment import augment_identities
from difflora.photos.generators import ComfyUIGenerator
from tests.test_augment import (
    NODES,
    RED,
    ColourFaces,
    ScriptedGenerator,
    config,
    flat,
    one_photo_data,
    workflow_file,
)

STALL = 3.0  # the longest any scripted stall lasts (seconds)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


class Server:
    """What the fake ComfyUI did (events, in order) and how it behaves (`routes` overrides)."""

    def __init__(self):
        self.lock, self.closing = threading.Lock(), threading.Event()
        self.events: list[tuple[str, str]] = []
        self.routes: dict = {}
        self.running: list[str] = []
        self.prompts = 0
        self.url = ""

    def log(self, what: str, detail: str = "") -> None:
        with self.lock:
            self.events.append((what, detail))

    def count(self, what: str) -> int:
        with self.lock:
            return sum(e[0] == what for e in self.events)

    def stall(self) -> None:
        self.closing.wait(STALL)


class Handler(BaseHTTPRequestHandler):
    server_state: Server

    def log_message(self, *a):
        pass

    def send(self, body: bytes, code: int = 200, kind: str = "application/json", length: int | None = None):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, value, code: int = 200):
        self.send(json.dumps(value).encode(), code)

    def _route(self, method: str):
        s = self.server_state
        path = self.path.split("?")[0]
        key = f"{method} {'/history' if path.startswith('/history/') else path}"
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else b""
        s.log(key, path.rsplit("/", 1)[1] if key == "GET /history" else body.decode(errors="replace")[:200])
        route = s.routes.get(key) or DEFAULTS.get(key)
        if route is None:
            return self.send(b"{}", 404)
        route(self, s, path, body)

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")


def _prompt(h, s: Server, path, body) -> int:
    with s.lock:
        s.prompts += 1
        number = s.prompts
        s.running.append(f"p{number}")
    h.send_json({"prompt_id": f"p{number}", "number": number, "node_errors": {}})
    return number


def _history_done(h, s: Server, path, body):
    pid = path.rsplit("/", 1)[1]
    h.send_json({pid: {"status": {"completed": True, "status_str": "success"},
                       "outputs": {"16": {"images": [{"filename": f"{pid}.png", "subfolder": "", "type": "output"}]}}}})


def _queue_post(h, s: Server, path, body):
    for pid in json.loads(body).get("delete", []):
        with s.lock:
            if pid in s.running[1:]:   # only a waiting prompt leaves the queue; the running one needs /interrupt
                s.running.remove(pid)
    h.send(b"")


def _interrupt(h, s: Server, path, body):
    pid = json.loads(body or b"{}").get("prompt_id")
    with s.lock:
        if s.running and s.running[0] == pid:
            s.running.pop(0)
    h.send(b"")


DEFAULTS = {
    "GET /system_stats": lambda h, s, p, b: h.send_json({"system": {}, "devices": []}),
    "POST /upload/image": lambda h, s, p, b: h.send_json({"name": "ref.png", "subfolder": "difflora_augment"}),
    "POST /prompt": _prompt,
    "GET /history": _history_done,
    "GET /view": lambda h, s, p, b: h.send(png(flat(RED)), kind="image/png"),
    "GET /queue": lambda h, s, p, b: h.send_json({"queue_running": [[0, pid, {}, {}, []] for pid in s.running[:1]],
                                                  "queue_pending": [[0, pid, {}, {}, []] for pid in s.running[1:]]}),
    "POST /queue": _queue_post,
    "POST /interrupt": _interrupt,
}


def _stalled_history(h, s: Server, path, body):
    h.send_json({})   # never finishes


@pytest.fixture
def server():
    state = Server()
    handler = type("ScriptedComfy", (Handler,), {"server_state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    state.closing.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def no_retry_delay(monkeypatch):
    monkeypatch.setattr(augment, "RETRY_DELAY", 0.0)


def run_augment(tmp_path, server: Server, timeout: float = 5.0, **kw):
    """augment over one one-photo identity against `server`; returns (reports or the exception, out folder)."""
    one_photo_data(tmp_path / "data", ("ann",))
    cfg = config(tmp_path, server=server.url, workflow=str(workflow_file(tmp_path)), **{"retries": 0, **kw}, **NODES)
    generator = ComfyUIGenerator(server.url, cfg.workflow, **NODES, timeout=timeout)
    generator.client.poll = 0.02
    return augment_identities(cfg, generator=generator, face_encoder=ColourFaces()), tmp_path / "out"


def saved_state(out: Path, name: str = "ann") -> dict:
    return json.loads((out / f"{name}.augment.json").read_text())


def reported(out: Path) -> dict:
    return {r["name"]: r for r in json.loads((out / "augment_report.json").read_text())["identities"]}


# --- row 5: answers of the wrong shape ---------------------------------------------------------------

WRONG_SHAPES = {
    "/prompt without prompt_id": ("POST /prompt", lambda h, s, p, b: h.send_json({"number": 1})),
    "/prompt null": ("POST /prompt", lambda h, s, p, b: h.send(b"null")),
    "/history a list": ("GET /history", lambda h, s, p, b: h.send_json([1, 2])),
    "an output without filename": ("GET /history", lambda h, s, p, b: h.send_json(
        {p.rsplit("/", 1)[1]: {"status": {"completed": True}, "outputs": {"16": {"images": [{"type": "output"}]}}}})),
    "/upload/image HTML": ("POST /upload/image", lambda h, s, p, b: h.send(b"<html>hello</html>", kind="text/html")),
    "/upload/image without name": ("POST /upload/image", lambda h, s, p, b: h.send_json({"subfolder": "x"})),
}


@pytest.mark.parametrize("case", list(WRONG_SHAPES))
def test_answers_of_the_wrong_shape_are_a_sentence_and_the_reports_are_written(tmp_path, server, case):
    route, behaviour = WRONG_SHAPES[case]
    server.routes[route] = behaviour
    with pytest.raises(GeneratorError, match="is it a ComfyUI server") as e:
        run_augment(tmp_path, server)
    assert "run the command again" in str(e.value)
    out = tmp_path / "out"
    assert saved_state(out)["status"] == "interrupted" and "is it a ComfyUI server" in saved_state(out)["reason"]
    assert reported(out)["ann"]["status"] == "interrupted"


# --- row 6: a body cut short, a garbage status line ----------------------------------------------------

def _cut_short(h, s, p, b):
    h.send(png(flat(RED))[:20], kind="image/png", length=5000)   # then the connection closes


def _garbage_status(h, s, p, b):
    h.wfile.write(b"HELLO THERE\r\n\r\n")


@pytest.mark.parametrize("route, behaviour", [("GET /view", _cut_short), ("GET /history", _garbage_status)],
                         ids=["incomplete-read", "bad-status-line"])
def test_a_broken_answer_is_retried_then_a_sentence(tmp_path, server, route, behaviour):
    server.routes[route] = behaviour
    with pytest.raises(GeneratorError, match="broke off its answer") as e:
        run_augment(tmp_path, server, retries=2)
    assert server.count("POST /prompt") == 3                                # retried like a lost connection
    assert "run the command again" in str(e.value)
    assert reported(tmp_path / "out")["ann"]["status"] == "interrupted"


# --- row 7 and an unreadable image (row 13): never a Pillow traceback or a buffer's repr -------------

@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("data, says", [(png_header(40000, 40000), "decompression bomb"),
                                        (png_header(10000, 10000), "10000 x 10000 pixels, more than a photo has"),
                                        (b"<html>not an image</html>", "bytes starting b'<html>")],
                         ids=["bomb", "too-many-pixels", "html"])
def test_an_unusable_image_is_a_sentence(tmp_path, server, data, says):
    server.routes["GET /view"] = lambda h, s, p, b: h.send(data, kind="image/png")
    with pytest.raises(GeneratorError, match="not a usable image") as e:
        run_augment(tmp_path, server, retries=1)
    assert says in str(e.value) and "BytesIO" not in str(e.value)
    assert server.count("POST /prompt") == 2 and reported(tmp_path / "out")["ann"]["status"] == "interrupted"
    from difflora.photos.generators import decode_photo

    with pytest.raises(ValueError, match=says.split(" (")[0][:20]):
        decode_photo(data)


# --- row 8: --timeout bounds a whole prompt; answers are size-capped ---------------------------------

def _trickle(h, s: Server, p, b):
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Length", "100000")
    h.end_headers()
    end = time.monotonic() + STALL
    try:
        while time.monotonic() < end and not s.closing.is_set():
            h.wfile.write(b"\x00")
            h.wfile.flush()
            s.closing.wait(0.1)
    except OSError:
        pass   # the client gave up


def test_a_trickling_answer_is_given_up_at_the_prompts_timeout(tmp_path, server):
    server.routes["GET /view"] = _trickle
    with pytest.raises(GeneratorError, match="did not (answer /view in time|finish the prompt)") as e:
        run_augment(tmp_path, server, timeout=1.5)   # the server would trickle on for STALL seconds
    assert "raise --timeout" in str(e.value)


def _endless(h, s: Server, p, b, declared: str | None = None):
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    if declared:
        h.send_header("Content-Length", declared)
    h.end_headers()
    try:
        for _ in range(128):   # 8 MiB at most, then the connection closes
            if s.closing.is_set():
                break
            h.wfile.write(b" " * 65536)
    except OSError:
        pass


@pytest.mark.parametrize("declared", [None, str(10**12)], ids=["no-length", "huge-length"])
def test_an_endless_answer_is_cut_at_the_size_cap(tmp_path, server, monkeypatch, declared):
    monkeypatch.setattr(comfy_client, "MAX_JSON_BYTES", 1 << 20, raising=False)
    server.routes["GET /history"] = lambda h, s, p, b: _endless(h, s, p, b, declared)
    too_large = r"answered /history/p1 with [\d,]+ bytes or more, more than the 1,048,576"
    with pytest.raises(GeneratorError, match=too_large):
        run_augment(tmp_path, server)


# --- row 9: a timed-out prompt is cancelled on the server before it is queued again -------------------

def test_a_timed_out_prompt_is_cancelled_on_the_server_before_it_is_queued_again(tmp_path, server):
    server.routes["GET /history"] = _stalled_history
    with pytest.raises(GeneratorError, match="did not finish prompt p2 within"):
        run_augment(tmp_path, server, timeout=0.6, retries=1)
    posts = [e for e in server.events if e[0] in ("POST /prompt", "POST /queue", "POST /interrupt")]
    assert [e[0] for e in posts] == ["POST /prompt", "POST /queue", "POST /interrupt",
                                     "POST /prompt", "POST /queue", "POST /interrupt"]
    assert json.loads(posts[1][1]) == {"delete": ["p1"]} and json.loads(posts[2][1]) == {"prompt_id": "p1"}
    assert json.loads(posts[4][1]) == {"delete": ["p2"]} and json.loads(posts[5][1]) == {"prompt_id": "p2"}
    assert server.running == []                                             # nothing left on the server


# --- row 4: Ctrl-C while prompts stall on the server ----------------------------------------------------

def _interrupting_prompt(after: int):
    def prompt(h, s: Server, p, b):
        if _prompt(h, s, p, b) == after:
            s.log("SIGINT", "first")
            os.kill(os.getpid(), signal.SIGINT)   # what Ctrl-C does
    return prompt


def test_a_first_ctrl_c_stops_new_prompts_and_retries(tmp_path, server):
    server.routes["POST /prompt"] = _interrupting_prompt(after=2)
    server.routes["GET /history"] = _stalled_history
    reports, out = run_augment(tmp_path, server, timeout=1.0, retries=3, concurrency=2)
    assert reports[0].status == "interrupted" and saved_state(out)["status"] == "interrupted"
    assert server.count("POST /prompt") == 2                   # none new, none retried after the Ctrl-C
    deleted = sorted(json.loads(d)["delete"][0] for e, d in server.events if e == "POST /queue")
    assert deleted == ["p1", "p2"] and server.running == []    # the two in flight, cancelled at their time-out


class _Told(logging.Handler):
    """Set once augment logged that the first Ctrl-C was taken (two signals close together count as one)."""

    def __init__(self):
        super().__init__()
        self.taken = threading.Event()

    def emit(self, record):
        if "Press Ctrl-C again" in record.getMessage():
            self.taken.set()


def test_a_second_ctrl_c_cancels_the_prompts_in_flight_and_stops_at_once(tmp_path, server):
    told = _Told()
    logging.getLogger("difflora.train").addHandler(told)
    server.routes["POST /prompt"] = _interrupting_prompt(after=2)

    def history(h, s: Server, p, b):
        h.send_json({})
        with s.lock:
            second = told.taken.is_set() and ("SIGINT", "second") not in s.events
            if second:
                s.events.append(("SIGINT", "second"))
        if second:
            os.kill(os.getpid(), signal.SIGINT)

    server.routes["GET /history"] = history
    try:
        with pytest.raises(KeyboardInterrupt):
            run_augment(tmp_path, server, timeout=5.0, retries=3, concurrency=2)
    finally:
        logging.getLogger("difflora.train").removeHandler(told)
    out = tmp_path / "out"
    assert server.count("POST /prompt") == 2, server.events
    assert sorted(json.loads(d)["delete"][0] for e, d in server.events if e == "POST /queue") == ["p1", "p2"], \
        server.events
    assert server.running == []
    assert saved_state(out)["status"] == "interrupted" and "second Ctrl-C" in saved_state(out)["reason"]
    assert reported(out)["ann"]["status"] == "interrupted"


# --- row 13: a hung /prompt, and a title two nodes share ------------------------------------------------

def test_a_hung_prompt_request_is_not_called_unreachable_and_is_cancelled(tmp_path, server):
    def hung(h, s: Server, p, b):
        s.log("queued as", json.loads(b)["prompt_id"])   # ComfyUI takes the client's id
        s.stall()

    server.routes["POST /prompt"] = hung
    with pytest.raises(GeneratorError) as e:
        run_augment(tmp_path, server, timeout=0.5)
    assert "accepted the connection but did not answer /prompt in time" in str(e.value)
    assert "not reachable" not in str(e.value)
    sent = [d for e, d in server.events if e == "queued as"]
    assert [json.loads(d)["delete"] for e, d in server.events if e == "POST /queue"] == [sent]  # its answer lost


def test_a_title_two_nodes_share_is_named_as_such(tmp_path):
    graph = json.loads(workflow_file(tmp_path).read_text())
    graph["15"] = {"class_type": "KSampler", "inputs": {"seed": 0}, "_meta": {"title": "KSampler"}}
    with pytest.raises(GeneratorError) as e:
        ComfyUIGenerator("http://127.0.0.1:1", workflow_file(tmp_path, graph), **NODES)
    assert "'KSampler' (the seed node): 2 nodes have that title (ids 14, 15); name one by its id" in str(e.value)


# --- row 3: an unreadable reference.png beside a good photo ------------------------------------------

def test_the_reference_actually_used_is_the_one_copied_and_unreadable_files_are_reported(tmp_path):
    data = tmp_path / "data" / "ann"
    data.mkdir(parents=True)
    Image.fromarray(flat(RED)).save(data / "x.png")
    (data / "x.txt").write_text("a photo of sks person\n")
    (data / "reference.png").write_bytes(b"this is not an image")
    reports = augment_identities(config(tmp_path), generator=ScriptedGenerator(lambda s: RED),
                                 face_encoder=ColourFaces())
    out = tmp_path / "out"
    assert (out / "ann" / "reference.png").read_bytes() == (data / "x.png").read_bytes()
    assert (out / "ann" / "reference.txt").read_text() == "a photo of sks person\n"
    assert not (out / "ann" / "x.png").exists()                # copied once, as the reference
    r = reports[0]
    assert r.status == "augmented" and r.reference == "x.png" and r.unreadable == ["reference.png"]
    assert reported(out)["ann"]["unreadable"] == ["reference.png"]


def test_a_second_ctrl_c_ends_the_command_with_a_sentence_and_status_130(tmp_path, monkeypatch, caplog):
    from difflora.train.__main__ import EXIT_INTERRUPTED, main

    def stopped_at_once(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(augment, "augment_identities", stopped_at_once)
    assert main(["augment", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == EXIT_INTERRUPTED == 130
    assert "Stopped at once (second Ctrl-C); run the same command again" in caplog.text


@pytest.mark.comfy
@pytest.mark.slow
def test_prompts_given_up_on_are_taken_off_a_real_comfyui(comfy_server):
    """The running prompt is interrupted, a waiting one leaves the queue (ComfyUI's own server.py)."""
    from devtools.comfy_server import txt2img_graph
    from devtools.tiny_sdxl import CHECKPOINT_NAME
    from difflora.photos.comfy_client import ComfyClient

    client = ComfyClient(comfy_server.url, timeout=2.0, poll=0.05)
    seed = int(time.time()) % 10**6   # an identical graph would be served from ComfyUI's cache
    endless = txt2img_graph(CHECKPOINT_NAME, seed=seed, steps=10000)       # hours on a CPU
    # A canonical UUID: ComfyUI 0.33.0 refuses any other prompt_id.
    running = client.queue(txt2img_graph(CHECKPOINT_NAME, seed=seed + 1, steps=10000), prompt_id=str(uuid.uuid4()))
    with pytest.raises(GeneratorError, match="did not finish prompt"):
        client.run(endless)       # waits behind `running` until its time-out: deleted from the queue
    client.cancel(running)        # running: interrupted
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        queue = client._json("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            break
        time.sleep(0.2)
    assert not queue["queue_running"] and not queue["queue_pending"], queue
    history = client._json(f"/history/{running}")[running]["status"]
    assert any(event == "execution_interrupted" for event, _ in history["messages"]), history
