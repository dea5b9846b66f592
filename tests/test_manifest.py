"""weights_manifest.json: complete, in agreement with the README, and true for the files we build."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from devtools import harness_models

REPO = Path(__file__).resolve().parent.parent
MANIFEST = json.loads((REPO / "weights_manifest.json").read_text())
FIELDS = {"id", "variant", "role", "folder", "file", "path", "size", "sha256", "source", "required"}


def _readme_rows() -> dict[str, tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Models", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] not in ("id", "---"):
            rows[cells[0]] = (cells[1], cells[2].strip("`"))
    return rows


def test_every_entry_is_complete():
    ids = [m["id"] for m in MANIFEST["models"]]
    assert len(ids) == len(set(ids))
    for m in MANIFEST["models"]:
        assert set(m) == FIELDS, m["id"]
        assert m["source"], m["id"]
        assert m["sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", m["sha256"])


def test_readme_model_table_agrees_with_manifest():
    rows = _readme_rows()
    expected = {m["id"]: (m["variant"], f"{m['folder']}/{m['file']}" if m["folder"] else
                          m["path"] or "(pip package)")
                for m in MANIFEST["models"]}
    assert rows == expected


def test_every_workflow_model_name_is_in_the_manifest():
    real = {(m["folder"], m["file"]) for m in MANIFEST["models"] if m["variant"] == "real"}
    for folder, (name, _) in harness_models.MODELS.items():
        assert (folder, name) in real


def test_test_fixtures_build_to_the_listed_bytes(tmp_path):
    built = harness_models.build_models(tmp_path)
    listed = {m["folder"]: m for m in MANIFEST["models"] if m["variant"] == "test-fixture"}
    assert set(built) == set(listed)
    for folder, path in built.items():
        entry = listed[folder]
        assert path.name == entry["file"]
        assert path.stat().st_size == entry["size"], folder
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], folder
