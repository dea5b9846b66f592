"""The folder an evaluation reads (and `generate` writes), docs/METHOD.md section 6.

    EVAL_ROOT/
      prompts.txt                                  M prompts, one a line; "{person}" marks the subject
      references/<identity>/<photo>.png|jpg|...    the photo(s) each method personalizes from
      generated/<method>/<identity>/p<PPP>_k<KK>.png   image K of prompt P (both from 0)
      generated/<method>/timing.json               optional: {"<identity>": seconds to personalize}
      fid_reference/<any>.png|jpg|...              optional: the real set FID compares against
                                                   (default: every reference photo)

Several methods side by side (DiffLoRA, DreamBooth-LoRA, ...) give the rows of the paper's
table. The protocol is N identities x M prompts x K images (paper: 25 x 30 x 1); a layout
that holds fewer is scored as it is, and the counts are reported with the figures.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..encoders.images import IMAGE_EXTENSIONS, list_image_files
from ..errors import DiffLoRAError

log = logging.getLogger("difflora.eval")
PERSON = "{person}"
PROMPTS_FILE, REFERENCES, GENERATED, FID_REFERENCE, TIMING = (
    "prompts.txt", "references", "generated", "fid_reference", "timing.json")
_IMAGE_NAME = re.compile(r"^p(\d+)_k(\d+)$")
PAPER_PROTOCOL = {"identities": 25, "prompts": 30, "images_per_prompt": 1}

# 30 prompts in the spirit of PhotoMaker's evaluation set: recontextualization, stylization,
# accessories and actions, so CLIP-T measures prompt following and the rest identity.
DEFAULT_PROMPTS = (
    "a photo of {person}", "a close-up portrait of {person}", "{person} wearing a red hat",
    "{person} wearing sunglasses", "{person} wearing a santa hat", "{person} wearing a suit and tie",
    "{person} in a chef outfit", "{person} in a police uniform", "{person} in an astronaut suit",
    "{person} on the beach", "{person} in the snow", "{person} in a busy city street at night",
    "{person} in a forest", "{person} in front of the Eiffel Tower", "{person} on top of a mountain",
    "{person} in a library", "{person} riding a bicycle", "{person} playing the guitar",
    "{person} reading a book", "{person} drinking coffee in a cafe", "{person} holding a flower",
    "{person} with a dog", "{person} swimming in a pool", "{person} cooking in a kitchen",
    "an oil painting of {person}", "a watercolor painting of {person}", "a pencil sketch of {person}",
    "{person} as a cartoon character", "a pop art poster of {person}", "a cinematic film still of {person}",
)


def fill(prompt: str, person: str) -> str:
    """The prompt with its subject: the trigger phrase for generation, the class phrase for CLIP-T.
    A prompt without the placeholder gets the subject prepended."""
    return prompt.replace(PERSON, person) if PERSON in prompt else f"{person}, {prompt}"


def image_name(prompt_index: int, k: int, ext: str = ".png") -> str:
    return f"p{prompt_index:03d}_k{k:02d}{ext}"


@dataclass
class GeneratedImage:
    path: Path
    prompt_index: int
    k: int


@dataclass
class MethodImages:
    """One method's images: identity -> images, and its personalization times."""

    name: str
    images: dict[str, list[GeneratedImage]]
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.images.values())


@dataclass
class EvalLayout:
    root: Path

    @property
    def prompts_file(self) -> Path:
        return self.root / PROMPTS_FILE

    def prompts(self) -> list[str]:
        if not self.prompts_file.is_file():
            raise DiffLoRAError(f"{self.prompts_file} not found: write one prompt a line, with {PERSON} "
                                "where the subject goes (python -m difflora.eval init writes the default 30).")
        lines = [l.strip() for l in self.prompts_file.read_text(encoding="utf-8").splitlines()]
        prompts = [l for l in lines if l and not l.startswith("#")]
        if not prompts:
            raise DiffLoRAError(f"{self.prompts_file} holds no prompt.")
        return prompts

    def write_prompts(self, prompts=DEFAULT_PROMPTS) -> Path:
        """prompts.txt, written atomically; one the user already has is never replaced."""
        self.make_root()
        text = "".join(p + "\n" for p in prompts)
        path = self.prompts_file
        if path.exists() or path.is_symlink():
            if not path.is_file():
                raise DiffLoRAError(f"{path} is not a regular file (a folder, pipe or device): move it away, then "
                                    "run init again.")
            if path.read_text(encoding="utf-8", errors="replace") == text:
                return path
            raise DiffLoRAError(f"{path} already exists and holds other prompts: it was left as it is. Delete or "
                                "rename it to write new ones, or keep it (generate and score read it).")
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return path

    def make_root(self) -> None:
        """ROOT and its folders, or a sentence when ROOT (or a folder in it) is a file."""
        for folder in (self.root, self.root / REFERENCES, self.root / GENERATED):
            if folder.exists() and not folder.is_dir():
                raise DiffLoRAError(f"{folder} is a file, not a folder: pass another evaluation ROOT (a folder, "
                                    "created when missing), or move that file away.")
            folder.mkdir(parents=True, exist_ok=True)

    def identities(self) -> list[str]:
        ref = self.root / REFERENCES
        if not ref.is_dir():
            raise DiffLoRAError(f"{ref} not found: put each identity's reference photo(s) in "
                                f"{REFERENCES}/<identity>/.")
        names = sorted(p.name for p in ref.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise DiffLoRAError(f"{ref} holds no identity folder ({REFERENCES}/<identity>/<photo>).")
        return names

    def references(self, identity: str) -> list[Path]:
        files = list_image_files(self.root / REFERENCES / identity)
        if not files:
            raise DiffLoRAError(f"{REFERENCES}/{identity}/ holds no image.")
        return files

    def methods(self) -> list[str]:
        gen = self.root / GENERATED
        return sorted(p.name for p in gen.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if gen.is_dir() else []

    def method_dir(self, method: str) -> Path:
        return self.root / GENERATED / method

    def method_images(self, method: str) -> MethodImages:
        folder = self.method_dir(method)
        if not folder.is_dir():
            raise DiffLoRAError(f"{folder} not found: generate images first (python -m difflora.eval generate).")
        images = {}
        for identity in self.identities():
            sub = folder / identity
            found = []
            for p in sorted(sub.iterdir()) if sub.is_dir() else []:
                m = _IMAGE_NAME.match(p.stem)
                if m and p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_file():  # a FIFO would block the read
                    log.warning("%s is not a regular file (a pipe, device or folder): skipped.", p)
                elif m and p.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append(GeneratedImage(p, int(m.group(1)), int(m.group(2))))
            if found:
                images[identity] = found
        return MethodImages(method, images, self.read_timing(method))

    def read_timing(self, method: str) -> dict[str, float]:
        path = self.method_dir(method) / TIMING
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return {str(k): float(v) for k, v in data.items()}
        except (ValueError, TypeError, AttributeError, RecursionError, UnicodeDecodeError) as e:
            raise DiffLoRAError(f"{path} is not a JSON object of {{identity: seconds}} ({type(e).__name__}: {e}): "
                                "fix it, or delete it (it is optional: the table then shows no times).") from None

    def write_timing(self, method: str, timing: dict[str, float]) -> Path:
        path = self.method_dir(method) / TIMING
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(timing, indent=1, sort_keys=True), encoding="utf-8")
        return path

    def fid_reference(self) -> tuple[list[Path], str]:
        """The real set for FID, and which it is (a reviewer must know)."""
        folder = self.root / FID_REFERENCE
        if folder.is_dir() and list_image_files(folder):
            return list_image_files(folder), FID_REFERENCE
        return [p for i in self.identities() for p in self.references(i)], REFERENCES


def protocol_counts(layout: EvalLayout, images: MethodImages, prompts: list[str]) -> dict:
    """What the layout holds against N x M x K, and what is missing."""
    ids = layout.identities()
    k = max((g.k + 1 for imgs in images.images.values() for g in imgs), default=0)
    expected = len(ids) * len(prompts) * k
    return {"identities": len(images.images), "identities_in_references": len(ids), "prompts": len(prompts),
            "images_per_prompt": k, "images": images.count, "images_expected": expected,
            "paper_protocol": (len(images.images), len(prompts), k) == tuple(PAPER_PROTOCOL.values())}
