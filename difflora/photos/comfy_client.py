"""A client of a running ComfyUI server's HTTP API, for `augment` (stdlib only, no ComfyUI import).

    POST /upload/image   the reference photo, into the server's input folder
    POST /prompt         an API-format graph -> prompt_id
    GET  /history/<id>   polled until the prompt finished (or failed)
    GET  /view           each image the prompt's output nodes report
    POST /queue, /interrupt   a prompt given up on (time-out, Ctrl-C), taken off the server

Every failure is a `GeneratorError` sentence naming the server's URL; whether it is worth
retrying is the caller's choice (`GeneratorError.retry`). `timeout` bounds a whole prompt, its
answers' bodies included; answers are size-capped, so a server gone wrong cannot fill the memory.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from ..errors import GeneratorError

log = logging.getLogger("difflora.train")

REQUEST_TIMEOUT = 30.0           # seconds a single request may stall, whatever is left of the prompt's time
CANCEL_TIMEOUT = 5.0             # each request that takes a given-up prompt off the server
MAX_JSON_BYTES = 32 * 2**20      # a prompt's history is kilobytes
MAX_IMAGE_BYTES = 256 * 2**20    # an uncompressed 8192 x 8192 RGBA PNG
_CHUNK = 1 << 16


class ComfyClient:
    def __init__(self, url: str, timeout: float = 600.0, poll: float = 0.2):
        self.url = url.rstrip("/")
        self.timeout, self.poll = timeout, poll
        self.client_id = uuid.uuid4().hex
        self.stopping = threading.Event()   # set: every prompt in flight is given up and cancelled

    # -- HTTP ----------------------------------------------------------------------------
    def _open(self, path: str, body: bytes | None = None, headers: dict | None = None, *,
              deadline: float | None = None, limit: int | None = None, stoppable: bool = True) -> bytes:
        """The answer's body. `deadline` (time.monotonic()) bounds the whole request, body included."""
        name, limit = path.split("?")[0], limit or MAX_JSON_BYTES
        deadline = deadline if deadline is not None else time.monotonic() + REQUEST_TIMEOUT
        if deadline <= time.monotonic():
            raise self._overdue(f"the prompt (before {name})")
        request = urllib.request.Request(self.url + path, data=body, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=_socket_timeout(deadline)) as response:
                return self._read_body(response, name, deadline, limit, stoppable)
        except urllib.error.HTTPError as e:
            detail = e.read(2000).decode(errors="replace")
            raise generator_error(f"ComfyUI at {self.url} answered {name} with HTTP {e.code}: {detail}",
                                  retry=e.code >= 500) from None
        except urllib.error.URLError as e:   # nothing accepted the connection
            error = generator_error(f"The ComfyUI server at {self.url} is not reachable ({e.reason}): start it "
                                    "(python main.py --listen 127.0.0.1) or pass its address with --server.",
                                    retry=True)
            error.unreached = True   # so nothing of it is on the server to cancel
            raise error from None
        except TimeoutError as e:            # connected, then no (whole) answer in time
            raise generator_error(f"ComfyUI at {self.url} accepted the connection but did not answer {name} in time "
                                  f"({e or 'timed out'}): it may be busy or stuck; restart it, or raise --timeout if "
                                  "the workflow is slow.", retry=True) from None
        except (http.client.HTTPException, OSError) as e:   # IncompleteRead, BadStatusLine, a reset
            raise generator_error(f"ComfyUI at {self.url} broke off its answer to {name} ({type(e).__name__}: "
                                  f"{str(e)[:200]}); check the server's log if this repeats.", retry=True) from None

    def _read_body(self, response, name: str, deadline: float, limit: int, stoppable: bool) -> bytes:
        """The body, read in chunks: over `limit` bytes, past the deadline or once stopping, given up."""
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise self._too_large(name, int(declared), limit)
        chunks, size = [], 0
        while response.length != 0 and (chunk := response.read1(_CHUNK)):   # length: what is still declared
            size += len(chunk)
            if size > limit:
                raise self._too_large(name, size, limit)
            if stoppable and self.stopping.is_set():
                raise self._stopped()
            chunks.append(chunk)
            if response.length != 0 and time.monotonic() > deadline:
                raise TimeoutError(f"its answer was still arriving after the time allowed ({size} bytes so far)")
        if response.length:  # the connection closed before the declared length
            raise http.client.IncompleteRead(b"".join(chunks), response.length)
        return b"".join(chunks)

    def _too_large(self, name: str, size: int, limit: int) -> GeneratorError:
        return generator_error(f"ComfyUI at {self.url} answered {name} with {size:,} bytes or more, more than the "
                               f"{limit:,} such an answer can need: is it a ComfyUI server?")

    def _overdue(self, what: str) -> GeneratorError:
        return generator_error(f"ComfyUI at {self.url} did not finish {what} within {self.timeout:g} s (raise "
                               "--timeout if the workflow is slow).", retry=True)

    def _stopped(self) -> GeneratorError:
        return generator_error(f"stopped while waiting for ComfyUI at {self.url}")

    def _json(self, path: str, payload: dict | None = None, **kw) -> dict:
        """A JSON object from the server, else the 'is it a ComfyUI server?' sentence."""
        body = None if payload is None else json.dumps(payload).encode()
        raw = self._open(path, body, {"Content-Type": "application/json"} if body else None, **kw)
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):
            answer = None
        if not isinstance(answer, dict):
            raise generator_error(f"{self.url}{path.split('?')[0]} did not answer a JSON object: is it a ComfyUI "
                                  "server?")
        return answer

    # -- API -----------------------------------------------------------------------------
    def check(self) -> dict:
        """GET /system_stats: raises the 'not reachable' sentence when nothing answers."""
        stats = self._json("/system_stats", deadline=time.monotonic() + 10.0)
        if "system" not in stats:
            raise generator_error(f"{self.url} answered /system_stats without ComfyUI's fields: is it a ComfyUI server?")
        return stats

    def upload_image(self, data: bytes, name: str, subfolder: str = "difflora_augment") -> str:
        """The image into the server's input folder (overwriting a same-named one); returns the
        name a LoadImage node takes ("subfolder/name")."""
        boundary = uuid.uuid4().hex
        parts = []
        for key, value in (("overwrite", "true"), ("type", "input"), ("subfolder", subfolder)):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        raw = self._open("/upload/image", b"".join(parts),
                         {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        try:
            answer = json.loads(raw)
            stored, folder = answer["name"], answer.get("subfolder") or ""
            assert isinstance(stored, str) and stored and isinstance(folder, str)
        except (ValueError, TypeError, KeyError, AssertionError, RecursionError):
            raise generator_error(f"{self.url}/upload/image did not answer the stored image's name as JSON: is it a "
                                  "ComfyUI server?") from None
        return f"{folder}/{stored}" if folder else stored

    def queue(self, prompt: dict, deadline: float | None = None, prompt_id: str | None = None) -> str:
        """The id the server queued the prompt under (`prompt_id` when it takes the one given)."""
        payload = {"prompt": prompt, "client_id": self.client_id, **({"prompt_id": prompt_id} if prompt_id else {})}
        answer = self._json("/prompt", payload, deadline=deadline)
        if answer.get("node_errors"):
            raise generator_error(f"ComfyUI at {self.url} rejected the workflow: {json.dumps(answer['node_errors'])[:2000]}")
        prompt_id = answer.get("prompt_id")
        if not isinstance(prompt_id, str) or not prompt_id:
            raise generator_error(f"{self.url}/prompt answered without a prompt_id ({json.dumps(answer)[:200]}): is it "
                                  "a ComfyUI server?")
        return prompt_id

    def wait(self, prompt_id: str, deadline: float | None = None) -> dict:
        """The finished prompt's outputs {node_id: {"images": [...], ...}}."""
        deadline = deadline if deadline is not None else time.monotonic() + self.timeout
        while True:
            if self.stopping.is_set():
                raise self._stopped()
            if time.monotonic() > deadline:
                raise self._overdue(f"prompt {prompt_id}")
            try:
                entry = self._json(f"/history/{prompt_id}", deadline=min(deadline, time.monotonic() + REQUEST_TIMEOUT))
            except GeneratorError:
                if time.monotonic() > deadline:   # the prompt's own time ran out during this poll
                    raise self._overdue(f"prompt {prompt_id}") from None
                raise
            status = self._finished_status(entry.get(prompt_id))
            if status is not None:
                if status.get("status_str") == "error" or not status.get("completed"):
                    raise generator_error(f"ComfyUI at {self.url} failed running the workflow: {_failure(status)}", retry=True)
                return _outputs(entry[prompt_id], self.url)
            self.stopping.wait(self.poll)

    def _finished_status(self, entry) -> dict | None:
        """The history entry's status once the prompt finished; None while it runs."""
        status = entry.get("status") if isinstance(entry, dict) else None
        if entry is not None and not isinstance(entry, dict) or status is not None and not isinstance(status, dict):
            raise generator_error(f"{self.url}/history answered an entry of another shape than ComfyUI's: is it a "
                                  "ComfyUI server?")
        return status if status and status.get("completed") is not None else None

    def images(self, outputs: dict, node_ids: list[str] | None = None, deadline: float | None = None) -> list[bytes]:
        """The bytes of every image the output nodes (all, or `node_ids`) report, in node order."""
        found = []
        for node_id in sorted(outputs, key=_node_order):
            if node_ids and node_id not in node_ids:
                continue
            for item in _image_items(outputs[node_id], node_id, self.url):
                query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                                "type": item.get("type", "output")})
                found.append(self._open(f"/view?{query}", deadline=deadline, limit=MAX_IMAGE_BYTES))
        return found

    def run(self, prompt: dict, node_ids: list[str] | None = None) -> list[bytes]:
        """The images of one prompt, all within `timeout`; a prompt given up on (its time-out, a stop, a
        lost answer) is cancelled on the server first, so a retry never leaves it running beside."""
        deadline = time.monotonic() + self.timeout
        # Our own id (ComfyUI's /prompt takes one): a prompt whose answer was lost can be cancelled too.
        # The canonical hyphenated form: newer ComfyUI refuses any other with HTTP 400 (0.33.0 does).
        prompt_id = str(uuid.uuid4())
        try:
            prompt_id = self.queue(prompt, deadline, prompt_id)
            outputs = self.wait(prompt_id, deadline)
        except GeneratorError as e:
            if not getattr(e, "unreached", False):
                self.cancel(prompt_id)
            raise
        return self.images(outputs, node_ids, deadline)

    def cancel(self, prompt_id: str) -> None:
        """Take the prompt off the server: out of the queue when it waits (POST /queue {"delete"}), interrupted
        when it runs (POST /interrupt {"prompt_id"}: only when it is the running one, never another's)."""
        try:
            self._post_quietly("/queue", {"delete": [prompt_id]})
            queue = self._json("/queue", deadline=time.monotonic() + CANCEL_TIMEOUT, stoppable=False)
            running = [item[1] for item in queue.get("queue_running") or [] if isinstance(item, list) and len(item) > 1]
            if prompt_id in running:
                self._post_quietly("/interrupt", {"prompt_id": prompt_id})
        except GeneratorError as e:
            log.warning("Could not cancel prompt %s on %s (%s): remove it from ComfyUI's queue by hand.",
                        prompt_id, self.url, e)

    def _post_quietly(self, path: str, payload: dict) -> None:
        self._open(path, json.dumps(payload).encode(), {"Content-Type": "application/json"},
                   deadline=time.monotonic() + CANCEL_TIMEOUT, stoppable=False)


def _socket_timeout(deadline: float) -> float:
    return max(0.01, min(REQUEST_TIMEOUT, deadline - time.monotonic()))


def _outputs(entry: dict, url: str) -> dict:
    outputs = entry.get("outputs") or {}
    if not isinstance(outputs, dict) or not all(isinstance(v, dict) for v in outputs.values()):
        raise generator_error(f"{url}/history answered outputs of another shape than ComfyUI's: is it a ComfyUI "
                              "server?")
    return outputs


def _image_items(output: dict, node_id: str, url: str) -> list[dict]:
    items = output.get("images") or []
    if not isinstance(items, list):
        items = [items]   # one malformed entry, refused below
    if not all(isinstance(i, dict) and isinstance(i.get("filename"), str) for i in items):
        raise generator_error(f"{url}/history reported an output image of node {node_id} without a filename "
                              f"({json.dumps(items)[:200]}): is it a ComfyUI server?")
    return items


def generator_error(message: str, retry: bool = False) -> GeneratorError:
    error = GeneratorError(message)
    error.retry = retry
    return error


def _failure(status: dict) -> str:
    for event, data in status.get("messages", []):
        if event == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type')}: "
                    f"{data.get('exception_message')}")
        if event == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')}"
    return "no error message"


def _node_order(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)
