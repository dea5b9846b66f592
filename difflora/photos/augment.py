"""augment: many varied photos of a person from the few they have (docs/METHOD.md section 5: the
paper generates each person's photos with PhotoMaker before training their LoRA).

Per identity folder of --data (read only): its usable photos are counted (identity_filter.py);
when fewer than --target-images, the generator draws the person of the reference photo with
prompts from a list (poses, scenes, lighting), and a photo is kept only when exactly one face is
found and it matches the reference (the identity filter's threshold). --out receives a complete
data set in docs/TRAINING.md's layout: every identity's photos and captions copied (the reference
as reference.<ext>), the kept photos as gen_<k>_<j>.png with their captions, and beside the folders
`<name>.augment.json` (every photo tried: prompt, seed, kept or why not, similarity, seconds) and
`<name>.contact.png` (the reference, then what was kept). Photo k of an identity always has the
same prompt and seed; the JSON is rewritten (atomically) after every photo, so a stopped run
continues where it stopped and nothing recorded there is generated again. Ctrl-C queues no new
prompt and retries none (the prompts in flight finish); a second Ctrl-C cancels them on the
server and stops at once. `augment_report.json` is written however the run ends.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..encoders import load_face_encoder
from ..encoders.base import FaceEncoder, l2_normalize
from ..encoders.images import list_image_files
from ..errors import DiffLoRAError, GeneratorError
from ..train.config import AugmentConfig
from ..train.data import identity_folders
from ..train.identity_filter import REFERENCE_STEM, FaceMatches, face_matches
from ..train.loop import StopRequest, step_seed

log = logging.getLogger("difflora.train")

STATE_SUFFIX = ".augment.json"
SHEET_SUFFIX = ".contact.png"
REPORT = "augment_report.json"
WORK = ".augment"         # face-embedding caches of the source folders (never written beside them)
RETRY_DELAY = 1.0         # seconds before the first retry; doubled each time
DEFAULT_PROMPTS = (
    "a photo of sks person, close-up portrait, soft window light",
    "a photo of sks person, smiling, outdoors in a park, daylight",
    "a photo of sks person, looking to the side, city street at night, neon light",
    "a photo of sks person, three-quarter view, studio portrait, grey background",
    "a photo of sks person, laughing, at the beach, golden hour",
    "a photo of sks person, serious expression, office, overhead light",
    "a photo of sks person, profile view, in a cafe, warm light",
    "a photo of sks person, wearing a coat, snowy mountains, overcast",
    "a photo of sks person, head tilted, in a library, dim light",
    "a photo of sks person, upper body, in a kitchen, morning light",
    "a photo of sks person, looking up, forest, dappled sunlight",
    "a photo of sks person, surprised, at a concert, coloured stage light",
)


@dataclass
class IdentityAugment:
    """One identity's report (also its resume state, `<out>/<name>.augment.json`)."""

    name: str
    status: str = "pending"   # augmented | enough | short | skipped | interrupted
    reason: str = ""
    source_usable: int = 0    # usable photos in the source folder
    target: int = 0
    generated: int = 0        # photos the generator returned
    kept: int = 0
    rejected: int = 0
    seconds: float = 0.0      # generation and filtering, over every run
    reference: str = ""       # the source photo used (and copied) as the reference
    unreadable: list[str] = field(default_factory=list)   # source files not copied: no image Pillow reads
    photos: list[dict] = field(default_factory=list)  # index, image, seed, prompt, status, similarity, reason, file, seconds

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "photos"}


def read_prompts(path: str) -> list[tuple[str, str]]:
    """(prompt, caption) pairs: a line is `prompt` or `prompt | caption`; blank lines and # comments skipped."""
    if not path:
        return [(p, p) for p in DEFAULT_PROMPTS]
    p = Path(path)
    if not p.is_file():
        raise DiffLoRAError(f"Prompt list {p} not found: pass --prompts with a text file of one prompt a line.")
    pairs = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            prompt, _, caption = (part.strip() for part in line.partition(" | "))
            pairs.append((prompt, caption or prompt))
    if not pairs:
        raise DiffLoRAError(f"Prompt list {p} holds no prompt (one a line; # starts a comment).")
    return pairs


def make_generator(cfg: AugmentConfig, face_encoder: FaceEncoder | None = None):
    from .generators import ComfyUIGenerator, diffusers_generator

    if cfg.backend == "diffusers":
        return diffusers_generator(cfg, face_encoder)
    if not cfg.workflow:
        raise DiffLoRAError("augment --backend comfyui needs --workflow: an API-format workflow JSON (ComfyUI: "
                            "Workflow > Export (API)) drawing the person of a reference photo.")
    return ComfyUIGenerator(cfg.server, cfg.workflow, cfg.image_node, cfg.prompt_node, cfg.seed_node,
                            cfg.prompt_input, (cfg.output_node,) if cfg.output_node else (), cfg.timeout)


def augment_identities(cfg: AugmentConfig, generator=None, face_encoder: FaceEncoder | None = None
                       ) -> list[IdentityAugment]:
    """Run augment over every identity folder; returns every identity's report. `generator`: any object
    with `generate(reference: Path, prompt: str, seed: int) -> list of (H, W, 3) uint8 images`."""
    if not cfg.data or not cfg.out:
        raise DiffLoRAError("augment needs --data (one folder of photos per identity, read only) and --out (the "
                            "folder the augmented data set goes to).")
    data, out = Path(cfg.data).resolve(), Path(cfg.out).resolve()
    if out == data or data in out.parents:
        raise DiffLoRAError(f"--out {out} is inside --data {data}: augment never writes into the source folders; "
                            "pass another --out.")
    for name, value, low in (("--concurrency", cfg.concurrency, 1), ("--retries", cfg.retries, 0),
                             ("--target-images", cfg.target_images, 1), ("--max-attempts", cfg.max_attempts, 0)):
        if value < low:
            raise DiffLoRAError(f"{name} must be at least {low} (it is {value}).")
    folders = identity_folders(data)
    prompts = read_prompts(cfg.prompts)
    if face_encoder is None:
        face_encoder = load_face_encoder(cfg.face_encoder, root=cfg.insightface_root or None)
    generator = generator or make_generator(cfg, face_encoder)
    (out / WORK).mkdir(parents=True, exist_ok=True)
    reports = []
    try:
        with StopRequest() as stop:
            from tqdm.auto import tqdm

            for folder in tqdm(folders, desc="augment", disable=not cfg.progress):
                if stop.flag:
                    reports.append(IdentityAugment(folder.name, "interrupted", "stopped before it started"))
                    continue
                reports.append(_augment_one(folder, out, cfg, generator, face_encoder, prompts, stop))
    finally:  # also when a failure or a second Ctrl-C stops the run: the report says where it stopped
        _write_summary(out, cfg, folders, reports)
    return reports


def _write_summary(out: Path, cfg: AugmentConfig, folders: list[Path], reports: list[IdentityAugment]) -> None:
    reports = reports + [_state_after_a_stop(out, folder.name) for folder in folders[len(reports):]]
    summary = {"config": cfg.to_dict(), "identities": [r.summary() for r in reports]}
    _write_text(out / REPORT, json.dumps(summary, indent=1))
    counts = {s: sum(r.status == s for r in reports) for s in ("augmented", "enough", "short", "skipped",
                                                                "interrupted")}
    log.info("augment: %s (report: %s)", ", ".join(f"{v} {k}" for k, v in counts.items()), out / REPORT)


def _state_after_a_stop(out: Path, name: str) -> IdentityAugment:
    """An identity the run did not finish: its saved state, or 'interrupted' when it has none."""
    try:
        report = _read_state(out / f"{name}{STATE_SUFFIX}", name)
    except DiffLoRAError:
        report = IdentityAugment(name)
    if report.status == "pending":
        report.status, report.reason = "interrupted", "not started: the run stopped before it"
    return report


@dataclass
class _Drawing:
    """One identity's photos being drawn: where they go and what they are judged against."""

    report: IdentityAugment
    state_path: Path
    dst: Path
    reference: Path
    faces: FaceMatches
    missing: int        # kept photos still wanted
    attempts: int       # photos that may be tried in all


def _augment_one(src: Path, out: Path, cfg: AugmentConfig, generator, face_encoder: FaceEncoder,
                 prompts: list[tuple[str, str]], stop: StopRequest) -> IdentityAugment:
    name, dst = src.name, out / src.name
    faces = face_matches(src, face_encoder, cfg.min_face_similarity,
                         cache_path=out / WORK / f"{name}.{face_encoder.kind}.faces.safetensors")
    matched = isinstance(faces, FaceMatches)
    _copy_source(src, dst, faces.reference_file if matched else None, set(faces.unreadable) if matched else set())
    state_path = out / f"{name}{STATE_SUFFIX}"
    report = _read_state(state_path, name)
    report.target = cfg.target_images
    if not matched:
        report.status, report.reason = "skipped", f"no usable reference photo: {faces}"
        return _save(report, state_path)
    _record_source(report, faces)
    missing = cfg.target_images - report.source_usable
    if missing <= 0:
        report.status, report.reason = "enough", f"{report.source_usable} usable photos already"
        return _save(report, state_path)
    drawing = _Drawing(report, state_path, dst, src / faces.reference_file, faces, missing,
                       cfg.max_attempts or 3 * missing)
    try:
        error = _draw_photos(drawing, cfg, generator, face_encoder, prompts, stop)
    except KeyboardInterrupt:  # a second Ctrl-C: the prompts in flight were cancelled
        report.status, report.reason = "interrupted", "stopped at once (second Ctrl-C); run the command again"
        _save(report, state_path)
        raise
    _contact_sheet(drawing.reference, dst, report, out / f"{name}{SHEET_SUFFIX}")
    return _conclude(drawing, error, stop)


def _record_source(report: IdentityAugment, faces: FaceMatches) -> None:
    report.source_usable = len(faces.matching)
    report.reference, report.unreadable = faces.reference_file, list(faces.unreadable)
    if faces.unreadable:
        log.warning("%s: %d photo(s) unreadable, not copied: %s (replace them with photos Pillow reads).",
                    report.name, len(faces.unreadable), ", ".join(faces.unreadable))


def _draw_photos(drawing: _Drawing, cfg: AugmentConfig, generator, face_encoder: FaceEncoder,
                 prompts: list[tuple[str, str]], stop: StopRequest) -> GeneratorError | None:
    """Prompts run `--concurrency` at a time until enough photos are kept, the attempts run out, a prompt
    fails for good (returned) or a Ctrl-C (no new prompts nor retries; the ones in flight finish)."""
    report, name = drawing.report, drawing.report.name
    done = {p["index"] for p in report.photos}
    todo = iter([k for k in range(drawing.attempts) if k not in done])
    error, told, pending = None, False, {}
    pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="augment")
    try:
        while True:
            while len(pending) < cfg.concurrency and report.kept < drawing.missing and error is None and not stop.flag:
                k = next(todo, None)
                if k is None:
                    break
                prompt, caption = prompts[k % len(prompts)]
                seed = step_seed(cfg.seed, "augment", name, k) % 2**32
                job = pool.submit(_generate, generator, drawing.reference, prompt, seed, cfg.retries, stop)
                pending[job] = (k, prompt, caption, seed)
            if not pending:
                return error
            if stop.flag and not told:
                told = True
                log.warning("Stopping: no new prompts or retries; %d prompt(s) in flight finish (at most --timeout). "
                            "Press Ctrl-C again to cancel them and stop at once.", len(pending))
            finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for job in finished:
                error = error or _record(job, pending.pop(job), drawing, face_encoder, stop)
    except KeyboardInterrupt:
        if callable(getattr(generator, "cancel", None)):
            generator.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _record(job, prompt_info: tuple, drawing: _Drawing, face_encoder: FaceEncoder,
            stop: StopRequest) -> GeneratorError | None:
    """One finished prompt's photos judged, the kept ones written, the state saved; or its failure."""
    k, prompt, caption, seed = prompt_info
    report = drawing.report
    try:
        images, seconds = job.result()
    except GeneratorError as e:
        return None if stop.flag else e   # after a Ctrl-C a failed prompt is simply tried again next run
    for j, image in enumerate(images):
        verdict = _judge(image, face_encoder, drawing.faces)
        photo = {"index": k, "image": j, "seed": seed, "prompt": prompt, "seconds": round(seconds, 3),
                 **verdict, "file": ""}
        if verdict["status"] == "kept":
            photo["file"] = _write_photo(drawing.dst, f"gen_{k:04d}_{j}", image, caption)
        report.photos.append(photo)
    report.seconds += seconds
    _tally(report)
    _save(report, drawing.state_path)   # after every prompt: a stop loses at most the ones in flight
    return None


def _conclude(drawing: _Drawing, error: GeneratorError | None, stop: StopRequest) -> IdentityAugment:
    report, missing = drawing.report, drawing.missing
    if error is not None:
        report.status, report.reason = "interrupted", str(error)
        _save(report, drawing.state_path)
        raise GeneratorError(f"{error} ({report.name}: {report.kept} generated photos kept so far; run the command "
                             "again to continue where it stopped.)")
    if stop.flag and report.kept < missing:
        report.status, report.reason = "interrupted", "stopped; run the command again to continue"
    elif report.kept >= missing:
        report.status, report.reason = "augmented", f"{report.source_usable} + {report.kept} usable photos"
    else:
        report.status = "short"
        report.reason = (f"only {report.kept} of the {missing} photos missing were kept after {drawing.attempts} "
                         "tries; raise --max-attempts, or check the workflow draws the person of its reference photo")
    log.info("%s: %s (%d generated, %d rejected)", report.name, report.reason, report.generated, report.rejected)
    return _save(report, drawing.state_path)


def _generate(generator, reference: Path, prompt: str, seed: int, retries: int, stop: StopRequest):
    """(images, seconds) of one prompt, retrying what may pass on a second try (never after a Ctrl-C)."""
    t0 = time.perf_counter()
    for attempt in range(retries + 1):
        try:
            return list(generator.generate(reference, prompt, seed)), time.perf_counter() - t0
        except GeneratorError as e:
            if not getattr(e, "retry", False) or attempt == retries or stop.flag:
                raise
            log.warning("Prompt failed (%s); retry %d of %d.", e, attempt + 1, retries)
            time.sleep(RETRY_DELAY * 2 ** attempt)
            if stop.flag:
                raise


def _judge(image: np.ndarray, face_encoder: FaceEncoder, faces: FaceMatches) -> dict:
    """Kept only with exactly one face that matches the reference face."""
    found = face_encoder.detect(image)
    if len(found) != 1:
        return {"status": "rejected", "similarity": None,
                "reason": "no face found" if not found else f"{len(found)} faces found"}
    embedding = l2_normalize(face_encoder.embed(image, found[0]).float().reshape(-1))
    similarity = float(embedding @ faces.reference.to(embedding))
    if similarity < faces.threshold:
        return {"status": "rejected", "similarity": round(similarity, 4),
                "reason": f"another person (face similarity {similarity:.3f} < {faces.threshold:.3f})"}
    return {"status": "kept", "similarity": round(similarity, 4), "reason": ""}


def _tally(report: IdentityAugment) -> None:
    report.generated = len(report.photos)
    report.kept = sum(p["status"] == "kept" for p in report.photos)
    report.rejected = report.generated - report.kept


def _copy_source(src: Path, dst: Path, reference: str | None, unreadable: set[str]) -> None:
    """Every readable photo and its caption, copied (atomically, once); the reference photo as reference.<ext>."""
    dst.mkdir(parents=True, exist_ok=True)
    for photo in (p for p in list_image_files(src) if p.name not in unreadable):
        stem = REFERENCE_STEM if photo.name == reference else photo.stem
        for file, target in ((photo.with_suffix(".txt"), dst / f"{stem}.txt"), (photo, dst / f"{stem}{photo.suffix}")):
            if file.is_file() and not target.exists():
                tmp = target.with_name(f".{target.name}.partial")
                shutil.copy2(file, tmp)
                os.replace(tmp, target)


def _write_photo(dst: Path, stem: str, image: np.ndarray, caption: str) -> str:
    _write_text(dst / f"{stem}.txt", caption + "\n")
    tmp = dst / f".{stem}.png.partial"
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, dst / f"{stem}.png")
    return f"{stem}.png"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_state(path: Path, name: str) -> IdentityAugment:
    if not path.is_file():
        return IdentityAugment(name)
    try:
        return IdentityAugment(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as e:
        raise DiffLoRAError(f"{path} is not an augment report ({e}): delete it to start {name} over.") from None


def _save(report: IdentityAugment, path: Path) -> IdentityAugment:
    _write_text(path, json.dumps(asdict(report), indent=1))
    return report


def _contact_sheet(reference: Path, dst: Path, report: IdentityAugment, path: Path, tile: int = 128,
                   columns: int = 8) -> None:
    """The reference (blue frame) then every kept photo (green frame), tile x tile each."""
    files = [reference] + [dst / p["file"] for p in report.photos if p["status"] == "kept"]
    rows = -(-len(files) // columns)
    sheet = Image.new("RGB", (columns * tile, rows * tile), "white")
    draw = ImageDraw.Draw(sheet)
    for i, file in enumerate(files):
        x, y = (i % columns) * tile, (i // columns) * tile
        with Image.open(file) as img:
            sheet.paste(img.convert("RGB").resize((tile - 8, tile - 8), Image.LANCZOS), (x + 4, y + 4))
        draw.rectangle((x + 1, y + 1, x + tile - 2, y + tile - 2), outline="royalblue" if i == 0 else "seagreen",
                       width=3)
    tmp = path.with_name(f".{path.name}.partial")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, path)

