"""A client of a running ComfyUI server's HTTP API, for `augment` (stdlib only, no ComfyUI import).

    POST /upload/image   the reference photo, into the server's input folder
    POST /prompt         an API-format graph -> prompt_id
    GET  /history/<id>   polled until the prompt finished (or failed)
    GET  /view           each image the prompt's output nodes report

Every failure is a `GeneratorError` sentence naming the server's URL; whether it is worth
retrying is the caller's choice (`GeneratorError.retry`).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from ..errors import GeneratorError


class ComfyClient:
    def __init__(self, url: str, timeout: float = 600.0, poll: float = 0.2):
        self.url = url.rstrip("/")
        self.timeout, self.poll = timeout, poll
        self.client_id = uuid.uuid4().hex

    # -- HTTP ----------------------------------------------------------------------------
    def _open(self, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30.0):
        request = urllib.request.Request(self.url + path, data=body, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:2000]
            raise generator_error(f"ComfyUI at {self.url} answered {path.split('?')[0]} with HTTP {e.code}: {detail}",
                         retry=e.code >= 500) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise generator_error(f"The ComfyUI server at {self.url} is not reachable ({reason}): start it (python main.py "
                         "--listen 127.0.0.1) or pass its address with --server.", retry=True) from None

    def _json(self, path: str, payload: dict | None = None, timeout: float = 30.0):
        body = None if payload is None else json.dumps(payload).encode()
        raw = self._open(path, body, {"Content-Type": "application/json"} if body else None, timeout)
        try:
            return json.loads(raw or b"null")
        except ValueError:
            raise generator_error(f"{self.url}{path} did not answer JSON: is it a ComfyUI server?") from None

    # -- API -----------------------------------------------------------------------------
    def check(self) -> dict:
        """GET /system_stats: raises the 'not reachable' sentence when nothing answers."""
        stats = self._json("/system_stats", timeout=10.0)
        if not isinstance(stats, dict) or "system" not in stats:
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
        answer = json.loads(raw)
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    def queue(self, prompt: dict) -> str:
        answer = self._json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if answer.get("node_errors"):
            raise generator_error(f"ComfyUI at {self.url} rejected the workflow: {json.dumps(answer['node_errors'])[:2000]}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str) -> dict:
        """The finished prompt's outputs {node_id: {"images": [...], ...}}."""
        deadline = time.monotonic() + self.timeout
        while True:
            entry = (self._json(f"/history/{prompt_id}") or {}).get(prompt_id)
            status = (entry or {}).get("status") or {}
            if entry and status.get("completed") is not None:
                if status.get("status_str") == "error" or not status.get("completed"):
                    raise generator_error(f"ComfyUI at {self.url} failed running the workflow: {_failure(status)}", retry=True)
                return entry.get("outputs") or {}
            if time.monotonic() > deadline:
                raise generator_error(f"ComfyUI at {self.url} did not finish prompt {prompt_id} within {self.timeout:.0f} s "
                             "(raise --timeout if the workflow is slow).", retry=True)
            time.sleep(self.poll)

    def images(self, outputs: dict, node_ids: list[str] | None = None) -> list[bytes]:
        """The bytes of every image the output nodes (all, or `node_ids`) report, in node order."""
        found = []
        for node_id in sorted(outputs, key=_node_order):
            if node_ids and node_id not in node_ids:
                continue
            for item in outputs[node_id].get("images", []):
                query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                                "type": item.get("type", "output")})
                found.append(self._open(f"/view?{query}"))
        return found

    def run(self, prompt: dict, node_ids: list[str] | None = None) -> list[bytes]:
        return self.images(self.wait(self.queue(prompt)), node_ids)


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
