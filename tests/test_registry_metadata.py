"""What the ComfyUI registry, ComfyUI-Manager and ComfyUI itself read off the pack: pyproject.toml's
[project] and [tool.comfy], LICENSE, requirements.txt, and which files `comfy node pack` zips.

`comfy node validate` (comfy-cli) checks less than this (it parses the same fields and runs ruff's
exec/eval rules) and needs comfy-cli installed from PyPI, so CI runs these checks instead.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
# comfy-cli's validate_version: [operator]MAJOR.MINOR.PATCH[-suffix], comma-separated.
COMFY_VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")
# What a user installs: [project].dependencies (the registry's list) and the [faces] extra.
USER_REQUIREMENTS = [Requirement(r) for r in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["faces"]]
# Files the pack needs at run time inside ComfyUI: none of them may be left out of the zip.
RUNTIME = ("__init__.py", "LICENSE", "pyproject.toml", "README.md", "requirements.txt", "weights_manifest.json",
           "nodes/", "difflora/", "difflora_toyworld/", "web/", "assets/", "workflows/")
DEV_ONLY = ("tests/", "devtools/", "benchmarks/", "scripts/", ".ci/", "docs/toyworld_results/", "constraints.txt")


def _pins(path: Path) -> dict[str, Requirement]:
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    reqs = [Requirement(ln) for ln in lines if ln and not ln.startswith("#")]
    return {r.name.lower(): r for r in reqs}


def test_tool_comfy_names_publisher_display_name_and_an_icon_in_this_repository():
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", COMFY["PublisherId"]), COMFY.get("PublisherId")
    assert COMFY["DisplayName"] == "DiffLoRA"
    repo = urlparse(PROJECT["urls"]["Repository"])
    assert repo.scheme == "https" and repo.netloc == "github.com" and repo.path.count("/") == 2
    icon = urlparse(COMFY["Icon"])
    owner_name = repo.path.strip("/")
    # GitHub's raw URL of a committed file: /OWNER/NAME/BRANCH/PATH
    assert icon.scheme == "https" and icon.netloc == "raw.githubusercontent.com"
    assert icon.path.startswith(f"/{owner_name}/main/"), icon.path
    icon_file = REPO / icon.path.removeprefix(f"/{owner_name}/main/")
    assert icon_file.suffix in (".svg", ".png", ".jpg", ".gif") and icon_file.is_file()
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(icon_file)], cwd=REPO,
                             capture_output=True).returncode == 0
    assert tracked, f"{icon_file} is not committed: the registry's icon URL would be a 404"


def test_requires_comfyui_is_valid_and_holds_for_the_harness_comfyui(comfy_path):
    spec = COMFY["requires-comfyui"]
    assert all(COMFY_VERSION_PART.match(part.strip()) for part in spec.split(",")), spec
    harness = re.search(r'__version__ = "([^"]+)"', (comfy_path / "comfyui_version.py").read_text()).group(1)
    assert Version(harness) in SpecifierSet(spec), f"the harness ComfyUI {harness} is outside {spec}"


def test_comfyui_reads_the_same_fields(comfy_path):
    # ComfyUI's own parser (it reads [tool.comfy] at start-up, e.g. for a web directory).
    sys.path.insert(0, str(comfy_path))
    try:
        from comfy_config import config_parser
    finally:
        sys.path.remove(str(comfy_path))
    config = config_parser.extract_node_configuration(str(REPO))
    assert config.tool_comfy.publisher_id == COMFY["PublisherId"]
    assert config.tool_comfy.icon == COMFY["Icon"]
    assert config.project.supported_comfyui_version == COMFY["requires-comfyui"]
    assert config.project.urls.repository == PROJECT["urls"]["Repository"]
    assert config.project.license.text == "Apache-2.0"
    # No web key in [tool.comfy]: ComfyUI would serve web/ a second time under the project name
    # (WEB_DIRECTORY in __init__.py already does), and the frontend would register the script twice.
    assert not config.tool_comfy.web


def test_license_file_is_the_apache_2_text_the_project_declares():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text


def test_user_requirements_are_ranges_and_torch_is_not_pinned():
    exact = [str(r) for r in USER_REQUIREMENTS if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not exact, f"exact pins where users install: {exact} (they belong in constraints.txt)"
    torch = next(r for r in USER_REQUIREMENTS if r.name == "torch")
    assert Version("2.4") in torch.specifier and Version("3.0") in torch.specifier, str(torch)


def test_constraints_pin_every_user_requirement_inside_its_range():
    pins = _pins(REPO / "constraints.txt")
    for req in USER_REQUIREMENTS:
        if req.name == "numpy":  # a range today as before: CI resolves it, nothing pins it
            continue
        pin = pins.get(req.name.lower())
        assert pin is not None, f"{req.name} has no pin in constraints.txt"
        (spec,) = pin.specifier
        assert spec.operator == "==", str(pin)
        assert req.specifier.contains(spec.version, prereleases=True), f"pin {pin} is outside {req}"
    bootstrap = (REPO / "scripts" / "bootstrap.sh").read_text()
    assert "-c constraints.txt" in bootstrap, "bootstrap.sh must install with the tested pins"
    assert "constraints.txt" in bootstrap.split("want=", 1)[1].splitlines()[0], "a pin change must reinstall"


def test_requirements_txt_never_installs_or_changes_torch():
    reqs = [Requirement(ln.strip()) for ln in (REPO / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    names = {r.name.lower() for r in reqs}
    assert not names & {"torch", "torchvision", "torchaudio"}, names
    assert not [str(r) for r in reqs if any(s.operator in ("==", "===") for s in r.specifier)]


def _comfyignore_patterns() -> list[str]:
    lines = [ln.strip() for ln in (REPO / ".comfyignore").read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """gitwildmatch (what comfy-cli applies) for the three forms .comfyignore uses, checked below:
    '/path' or '/dir/' anchored at the root, 'name/' a directory at any depth, '*.ext' a basename."""
    parts = path.split("/")
    for p in patterns:
        if p.startswith("/"):
            if path == p[1:] or (p.endswith("/") and path.startswith(p[1:])):
                return True
        elif p.endswith("/"):
            if any(fnmatch.fnmatch(d, p[:-1]) for d in parts[:-1]):
                return True
        elif fnmatch.fnmatch(parts[-1], p):
            return True
    return False


def test_comfyignore_keeps_dev_files_out_of_the_zip_and_everything_the_pack_runs_in():
    patterns = _comfyignore_patterns()
    assert all(re.fullmatch(r"/[\w./-]+|[\w.*-]+/|\*[\w.-]+", p) for p in patterns), patterns
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    zipped = [f for f in tracked if not _ignored(f, patterns)]
    leaked = [f for f in zipped if f.startswith(DEV_ONLY)]
    assert not leaked, f"dev files in the registry zip: {leaked[:5]}"
    lost = [f for f in tracked if f.startswith(RUNTIME) and f not in zipped]
    assert not lost, f"files the pack needs, left out of the zip: {lost[:5]}"
    assert any(f.startswith("assets/toyworld/") for f in zipped)  # the toy world runs from the zip


@pytest.mark.parametrize("path", ["tests/test_x.py", "difflora/__pycache__/a.pyc", "x.egg-info/PKG-INFO",
                                  "docs/toyworld_results/grid.png", "constraints.txt"])
def test_ignore_matcher_drops(path):
    assert _ignored(path, _comfyignore_patterns())


@pytest.mark.parametrize("path", ["difflora/tests_helpers.py", "docs/TOYWORLD.md", "nodes/scripts.py"])
def test_ignore_matcher_keeps(path):
    assert not _ignored(path, _comfyignore_patterns())
