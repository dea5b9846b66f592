"""The paper's evaluation protocol over an `EvalLayout`: every metric, every method.

Per image a score, per identity the mean of its images, per method the mean and standard
deviation over identities (each identity weighs the same, however many images it has). FID is
one number per method over all its images. A metric whose model is missing appears under
"skipped" with the file it needs, never as a number.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..encoders.images import load_image_file
from .layout import EvalLayout, fill, protocol_counts
from .metrics import MetricUnavailable, cosine_matrix, mean_similarity_to_references

log = logging.getLogger("difflora.eval")

# key, table header, higher is better, table scale (the paper prints cosines as percentages)
METRICS = (
    ("clip_t", "CLIP-T", True, 100.0), ("clip_i", "CLIP-I", True, 100.0), ("dino", "DINO", True, 100.0),
    ("face_sim", "Face Sim", True, 100.0), ("fid", "FID", False, 1.0), ("image_reward", "ImageReward", True, 1.0),
    ("time_s", "Time (s)", False, 1.0),
)


@dataclass
class EvalModels:
    """The loaded scorers; None where `skipped` says why."""

    clip: object | None = None
    dino: object | None = None
    face: object | None = None
    inception: object | None = None
    image_reward: object | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def names(self) -> dict[str, str]:
        return {k: getattr(self, k).name for k in ("clip", "dino", "face", "inception", "image_reward")
                if getattr(self, k) is not None}


def load_models(clip=None, dino=None, face=None, insightface_root=None, inception=None, image_reward=None,
                device: str | None = None) -> EvalModels:
    """Load what is given; record what cannot be loaded as skipped (with what it needs)."""
    from .metrics.clip import ClipScorer
    from .metrics.dino import DinoScorer
    from .metrics.face import FaceScorer
    from .metrics.fid import InceptionFeatures
    from .metrics.image_reward import ImageRewardScorer

    models = EvalModels()
    loaders = {
        "clip": (("clip_i", "clip_t"), lambda: ClipScorer.load(clip, device)),
        "dino": (("dino",), lambda: DinoScorer.load(dino, device)),
        "face": (("face_sim",), lambda: FaceScorer.load(face, insightface_root)),
        "inception": (("fid",), lambda: InceptionFeatures.load(inception, device)),
        "image_reward": (("image_reward",), lambda: ImageRewardScorer.load(image_reward, device)),
    }
    for attr, (keys, load) in loaders.items():
        try:
            setattr(models, attr, load())
        except MetricUnavailable as e:
            log.warning("%s", e)
            for k in keys:
                models.skipped[k] = e.needs
    return models


def summarize(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


class _ReferenceCache:
    """Reference embeddings per identity, computed once and shared by every method."""

    def __init__(self, layout: EvalLayout, models: EvalModels):
        self.layout, self.models, self._cache = layout, models, {}

    def get(self, identity: str) -> dict:
        if identity not in self._cache:
            images = [load_image_file(p) for p in self.layout.references(identity)]
            m, ref = self.models, {}
            if m.clip is not None:
                ref["clip"] = m.clip.image_embeds(images)
            if m.dino is not None:
                ref["dino"] = m.dino.image_embeds(images)
            if m.face is not None:
                faces = [e for e in (m.face.embed(im) for im in images) if e is not None]
                ref["face"] = torch.stack(faces) if faces else None
                if not faces:
                    log.warning("no face found in any reference photo of %s: Face Sim left out for it", identity)
            self._cache[identity] = ref
        return self._cache[identity]


def score_identity(models: EvalModels, ref: dict, images: list, texts: list[str], paths: list[Path],
                   prompt_idx: list[int], text: torch.Tensor | None) -> dict[str, list[float | None]]:
    """Per-image scores of one identity's generated images; `texts` are the prompts with the class
    phrase as subject, `text` their CLIP embeddings."""
    out: dict[str, list] = {}
    if models.clip is not None:
        emb = models.clip.image_embeds(images)
        out["clip_i"] = mean_similarity_to_references(emb, ref["clip"]).tolist()
        out["clip_t"] = cosine_matrix(emb, text)[torch.arange(len(images)), torch.tensor(prompt_idx)].tolist()
    if models.dino is not None:
        out["dino"] = mean_similarity_to_references(models.dino.image_embeds(images), ref["dino"]).tolist()
    if models.face is not None and ref.get("face") is not None:
        sims = []
        for im in images:
            e = models.face.embed(im)
            sims.append(None if e is None else float(mean_similarity_to_references(e[None], ref["face"])[0]))
        out["face_sim"] = sims
    if models.image_reward is not None:
        out["image_reward"] = [models.image_reward.scores(texts[i], [p])[0] for i, p in zip(prompt_idx, paths)]
    return out


def evaluate(layout: EvalLayout, models: EvalModels, methods: list[str] | None = None,
             class_phrase: str = "a person") -> dict:
    """Score every method under layout/generated/. Returns the JSON-able result (see report.py)."""
    t0 = time.monotonic()
    prompts = layout.prompts()
    methods = methods or layout.methods()
    if not methods:
        raise MetricUnavailable("evaluation", f"no method folder under {layout.root}/generated/")
    texts = [fill(p, class_phrase) for p in prompts]
    text = models.clip.text_embeds(texts) if models.clip is not None else None
    refs = _ReferenceCache(layout, models)
    fid_ref = None
    result = {"root": str(layout.root), "prompts": prompts, "class_phrase": class_phrase,
              "models": models.names(), "skipped": dict(models.skipped), "methods": {}}
    for method in methods:
        data = layout.method_images(method)
        per_identity, all_images = {}, []
        for identity, gen in sorted(data.images.items()):
            bad = [g.path.name for g in gen if g.prompt_index >= len(prompts)]
            if bad:
                raise MetricUnavailable("evaluation", f"{method}/{identity}: {bad[0]} names a prompt index past "
                                        f"the {len(prompts)} prompts in prompts.txt")
            images = [load_image_file(g.path) for g in gen]
            if models.inception is not None:
                all_images.extend(images)
            scores = score_identity(models, refs.get(identity), images, texts, [g.path for g in gen],
                                    [g.prompt_index for g in gen], text)
            per_identity[identity] = {k: summarize(v)["mean"] for k, v in scores.items()}
            if "face_sim" in scores:
                per_identity[identity]["face_detected"] = sum(v is not None for v in scores["face_sim"]) / len(gen)
            if identity in data.timing:
                per_identity[identity]["time_s"] = data.timing[identity]
            log.info("%s / %s: %s", method, identity, per_identity[identity])
        metrics = {k: summarize([v.get(k) for v in per_identity.values()])
                   for k, *_ in METRICS if k != "fid" and k not in models.skipped}
        if "face_detected" in next(iter(per_identity.values()), {}):
            metrics["face_detected"] = summarize([v.get("face_detected") for v in per_identity.values()])
        if models.inception is not None:
            if fid_ref is None:
                ref_paths, ref_kind = layout.fid_reference()
                fid_ref = (models.inception.features([load_image_file(p) for p in ref_paths]), ref_kind)
            from .metrics.fid import frechet_distance

            feats = models.inception.features(all_images)
            metrics["fid"] = {"value": frechet_distance(feats, fid_ref[0]), "n_generated": len(feats),
                              "n_reference": len(fid_ref[0]), "reference_set": fid_ref[1],
                              "weights": models.inception.weights, "comparable": models.inception.standard}
        if not data.timing:
            metrics.pop("time_s", None)
        result["methods"][method] = {"counts": protocol_counts(layout, data, prompts), "metrics": metrics,
                                     "per_identity": per_identity}
    result["seconds"] = time.monotonic() - t0
    return result
