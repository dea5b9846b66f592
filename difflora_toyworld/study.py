"""The study around the headline table: baselines, sampler settings, reference counts and the
paper's ablations in miniature, every row scored on the same held-out identities, scenes and seeds
as `results.py` (docs/TOYWORLD.md, "The study").

    python -m difflora_toyworld study --world WORLD [--parts baselines,sampling,photos,ablations,...]

Rows, each a way to get one LoRA per held-out identity from what the training set offers:
  baselines   the mean training LoRA (no identity information); the training LoRA of the nearest
              identity by face embedding; ridge regression from the reference photo's face and image
              embeddings to the top principal components of the training LoRAs (weights2weights' idea
              of a linear identity space), its size and strength chosen on held-back training identities;
              all three from the LoRAs the hypernet learned from (world.hypernet_loras)
  sampling    the hypernet's LoRA at DDIM 25/10/5 steps and DPM-Solver++ 10/5, and at guidance 1-5
  photos      the LoRA predicted from 1, 3 and 5 reference photos of the person
  ablations   hypernets trained here on the same LoRAs: face embedding only, image embedding only
              (MIF's sources), plain-MSE LAE (lam 0), a 64x LAE instead of 128x; each with its LAE
              reconstruction row where its LAE differs
  validation  the sampler settings' grid (VALIDATION_SAMPLING) on 32 identities that are neither trained on
              nor held out (world.VALIDATION_FIRST on): the default is chosen there by the one-standard-
              error rule (choose_sampling), then scored on the held-out identities like every row
  strength    the hypernet's LoRA applied at strengths above 1 (a predictor trained by MSE leans to
              the mean of the people a photo could be, a weaker LoRA than any one of theirs), with the
              trained and nearest-identity LoRAs at the same strength as controls; the strength is
              chosen on the validation identities (choose_strength) and scored held-out
  weight-space  the two weight spaces of identity-loras on the first 500 training identities: the
              world's own (free: A and B trained, canonical form and gauge) and shared-down (one frozen
              A, only B trained), each with its own LAE and DiT; the shared-down held-out LoRAs are
              trained too, for their trained and reconstruction rows
Ablation runs live in WORLD/study/<name>/ and resume like the build's stages.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difflora.diffusion import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS
from difflora.train.data import EMB_SUFFIX

from . import toy_sdxl
from .lookup import FaceIndex
from .render import Identity, caption, sample_identities

log = logging.getLogger("difflora_toyworld")

PARTS = ("baselines", "sampling", "photos", "ablations", "validation", "strength", "weight-space")
# name -> (LAE overrides or None for the world's LAE, DiT overrides)
ABLATIONS = {
    "face-only": (None, {"sources": "face", "p_no_face": 0.0}),
    "image-only": (None, {"sources": "image", "p_no_face": 0.0}),
    "lae-mse": ({"lam": 0.0}, {}),
    "lae-64x": ({"size": "toy-64x"}, {}),
    "lae-32x": ({"size": "toy-32x"}, {}),
}
SAMPLING = [("ddim", 25, 3.0), ("ddim", 10, 3.0), ("ddim", 5, 3.0), ("dpm++", 10, 3.0), ("dpm++", 5, 3.0),
            ("ddim", 25, 1.0), ("ddim", 25, 2.0), ("ddim", 25, 5.0)]
# The grid the sampler default is chosen from, on the validation identities (not the held-out ones).
VALIDATION_SAMPLING = [(sampler, steps, guidance) for guidance in (1.5, 2.0, 2.5, 3.0, 4.0)
                       for sampler, steps in (("ddim", 25), ("ddim", 10), ("dpm++", 5))]
VALIDATION_IDENTITIES = 32
PHOTOS = (1, 3, 5)
# Apply Predicted LoRA strengths the strength part scores (1 is every other row's).
STRENGTHS = (1.0, 1.25, 1.5, 2.0)
CONTROL_STRENGTH = 1.5  # the trained and nearest LoRAs are scored here too: is it the prediction or the world?
# The sampler setting of every row that is not about the sampler, fixed so rows of different runs compare.
REFERENCE = {"sampler": "ddim", "steps": 25, "guidance": 3.0}
PACK_SAMPLING = {"sampler": DEFAULT_SAMPLER, "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE}  # results' predicted row
RIDGE_COMPONENTS = (16, 64, 256)
RIDGE_ALPHAS = (0.1, 1.0, 10.0, 100.0)
WEIGHT_SPACES = ("free", "shared-down")
WEIGHT_SPACE_IDENTITIES = 500  # training identities of each weight space's hypernet (a sixth of the world)


@dataclass
class MeasuredPerson:
    """One person a study row is scored on: a held-out identity or a validation one."""

    name: str
    person: Identity
    lora: Path | None  # None: a validation identity, which has photos but no trained LoRA
    photos: list[Path]


class LoraScorer:
    """The measurement of results.py (pipeline, classifier, scenes, seeds) for any one LoRA per person:
    the held-out identities, or other people (`on`)."""

    def __init__(self, world_root, identities: int | None = None, device: str = "cpu", seed: int = 0,
                 steps: int = 20, guidance: float = 4.0):
        from diffusers.utils import logging as diffusers_logging

        from .attributes import load_classifier
        from .results import EVAL_SCENES, SEEDS_PER_SCENE, eval_scene
        from .world import HELDOUT_FIRST, TRIGGER, World

        diffusers_logging.set_verbosity_error()
        self.world = World(world_root)
        self.cfg = self.world.load_config()
        self.clf = load_classifier(self.world.classifier)
        self.pipe = toy_sdxl.load_pipeline(self.world.base, device)
        self.device, self.steps, self.guidance = device, steps, guidance
        n = self.cfg.heldout_identities if identities is None else min(identities, self.cfg.heldout_identities)
        self.people = []
        for i, person in enumerate(sample_identities(n, self.cfg.seed, first=HELDOUT_FIRST)):
            name = f"id_{HELDOUT_FIRST + i:05d}"
            lora = self.world.loras / "heldout" / f"{name}.safetensors"
            if lora.is_file():
                photos = sorted((self.world.data / "heldout" / name).glob("*.png"))
                self.people.append(MeasuredPerson(name, person, lora, photos))
        self.scenes = [eval_scene(b, e) for b, e in EVAL_SCENES for _ in range(SEEDS_PER_SCENE)]
        self.prompts = [caption(s, TRIGGER) for s in self.scenes]
        self.seeds = [seed + i for i in range(len(self.scenes))]

    def on(self, people: list[MeasuredPerson]) -> "LoraScorer":
        """The same measurement (pipeline, classifier, scenes, seeds) on other people."""
        other = copy.copy(self)
        other.people = people
        return other

    def score(self, loras: list[dict | None], strength: float = 1.0) -> dict:
        """Identity and prompt accuracy of one LoRA per held-out identity (None: the base model),
        applied at `strength`."""
        from .attributes import identity_accuracy, prompt_accuracy
        from .results import generate

        ida, pa = [], []
        for person, lora in zip(self.people, loras):
            imgs = generate(self.pipe, lora, self.prompts, self.seeds, self.steps, self.guidance, strength)
            ida.append(identity_accuracy(self.clf, imgs, person.person))
            pa.append(prompt_accuracy(self.clf, imgs, self.scenes))
        return {"identity_accuracy": float(np.mean(ida)), "identity_accuracy_sem": float(np.std(ida) / np.sqrt(len(ida))),
                "prompt_accuracy": float(np.mean(pa)), "per_identity": [float(x) for x in ida]}


def first_photo_embeddings(hn, scorer: LoraScorer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(face (1, Df), image (1, Di)) of each held-out person's first photo, by the hypernet's encoders."""
    from difflora.encoders import encode_references, load_image_file
    from difflora.pipeline import resolve_encoders

    face, image = resolve_encoders(hn, None, None)
    out = []
    for person in scorer.people:
        refs = encode_references([load_image_file(person.photos[0])], face, image)
        out.append((refs.face.float().reshape(1, -1), refs.image.float().reshape(1, -1)))
    return out


def predicted(hn, scorer: LoraScorer, photos: int = 1, **sample_kwargs) -> tuple[list[dict], float]:
    """The hypernet's LoRA per held-out identity from its first `photos` photos; mean seconds each."""
    from difflora.pipeline import features_from_images, predict_lora
    from difflora.encoders import load_image_file

    loras, seconds = [], []
    for person in scorer.people:
        t0 = time.perf_counter()
        features = features_from_images(hn, [load_image_file(p) for p in person.photos[:photos]])
        loras.append(predict_lora(hn, features, **sample_kwargs))
        seconds.append(time.perf_counter() - t0)
    return loras, float(np.mean(seconds))


class TrainingSet(FaceIndex):
    """The training LoRAs the hypernet learned from (`folder`, default the world's: world.hypernet_loras),
    in the hypernet's normalized space, with their identities' embeddings."""

    def __init__(self, world, hn, folder=None):
        from difflora.train.data import load_lora_dataset
        from .world import hypernet_loras

        folder = folder or hypernet_loras(world, world.load_config())
        data = load_lora_dataset(folder, hn.spec, embeddings=True)
        super().__init__(folder, hn.spec, data)
        with torch.no_grad():
            chunks = data.chunks(range(len(data.names)), 256)
            self.x = torch.cat([hn.weight_normalizer.normalize(c) for c in chunks])  # (N, P)
        self.photo_face = data.face                                                                     # (n_i, Df)
        self.photo_image = data.image                                                                   # (n_i, Di)


def mean_lora(hn, ts: TrainingSet, n: int) -> list[dict]:
    from difflora.pipeline import lora_state_dict

    flat = hn.weight_normalizer.denormalize(ts.x.mean(0))
    return [lora_state_dict(hn, flat)] * n


def nearest_identity(ts: FaceIndex, refs) -> list[dict]:
    """The training LoRA of the identity whose mean face embedding is closest to the reference's."""
    return [ts.lora(ts.nearest(face[0])) for face, _ in refs]


def _features(face: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    f = torch.nn.functional.normalize(face.float(), dim=-1)
    i = torch.nn.functional.normalize(image.float(), dim=-1)
    return torch.cat([f, i], -1)


def fit_ridge(ts: TrainingSet, seed: int = 0, val_fraction: float = 0.1) -> dict:
    """Ridge from one photo's [face, image] embedding to the top-k principal-component coefficients of
    the normalized training LoRAs; k and alpha chosen on held-back identities by normalized MSE, then
    refit on all. Every photo is a sample with its identity's target (as the DiT trains)."""
    n = len(ts.names)
    perm = np.random.default_rng(seed).permutation(n)
    val = set(perm[: max(1, int(n * val_fraction))].tolist())

    def components(rows: list[int]):
        """What every (k, alpha) shares for one row set: the PCA, and the photos' features and Gram."""
        x = ts.x[rows]
        mean = x.mean(0)
        _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
        feats = [_features(ts.photo_face[i], ts.photo_image[i]) for i in rows]
        owner = torch.cat([torch.full((f.shape[0],), j) for j, f in enumerate(feats)])  # (M,) photo -> row
        a = torch.cat(feats)                                                            # (M, F)
        a_mean = a.mean(0)
        a0 = a - a_mean
        v = v[: max(RIDGE_COMPONENTS)]
        return {"mean": mean, "v": v, "coef": (x - mean) @ v.T, "owner": owner, "a0": a0, "a_mean": a_mean,
                "gram": a0.T @ a0}

    def fit(pcs, k: int, alpha: float):
        y = pcs["coef"][pcs["owner"], :k]                                    # (M, k): each photo's identity target
        y_mean = y.mean(0)
        a0, gram = pcs["a0"], pcs["gram"]
        w = torch.linalg.solve(gram + alpha * a0.shape[0] * torch.eye(gram.shape[0]), a0.T @ (y - y_mean))  # (F, k)
        return {"mean": pcs["mean"], "basis": pcs["v"][:k], "w": w, "a_mean": pcs["a_mean"], "y_mean": y_mean}

    def predict(model, face, image):
        c = (_features(face, image) - model["a_mean"]) @ model["w"] + model["y_mean"]   # (B, k)
        return model["mean"] + c @ model["basis"]                                          # (B, P)

    train_rows = [i for i in range(n) if i not in val]
    pcs, scores = components(train_rows), {}
    for k in RIDGE_COMPONENTS:
        for alpha in RIDGE_ALPHAS:
            model = fit(pcs, k, alpha)
            err = [float(((predict(model, ts.photo_face[i][:1], ts.photo_image[i][:1])[0] - ts.x[i]) ** 2).mean())
                   for i in sorted(val)]
            scores[(k, alpha)] = float(np.mean(err))
    k, alpha = min(scores, key=scores.get)
    log.info("ridge: k %d, alpha %g chosen (validation normalized MSE %.4f; mean LoRA would give %.4f)", k, alpha,
             scores[(k, alpha)], float(((ts.x[sorted(val)] - ts.x[train_rows].mean(0)) ** 2).mean()))
    model = fit(components(list(range(n))), k, alpha)
    model["predict"] = predict
    model["choice"] = {"components": k, "alpha": alpha, "val_mse": scores[(k, alpha)],
                       "grid": {f"{kk}/{aa}": v for (kk, aa), v in scores.items()}}
    return model


def ridge_loras(hn, model: dict, refs) -> list[dict]:
    from difflora.pipeline import lora_state_dict

    return [lora_state_dict(hn, hn.weight_normalizer.denormalize(model["predict"](model, face, image)[0]))
            for face, image in refs]


def ablation_hypernet(world, cfg, name: str) -> Path:
    """Train (or resume) one ablation's LAE and DiT on the world's LoRAs; returns its hypernet file."""
    from .identity_encoder import load_encoder
    from .world import run_dit, run_lae

    lae_overrides, dit_overrides = ABLATIONS[name]
    root = world.root / "study" / name
    hypernet = root / "hypernet.safetensors"
    if hypernet.is_file():
        return hypernet
    lae = world.lae / "lae_final.safetensors"
    if lae_overrides is not None:
        lae = root / "lae" / "lae_final.safetensors"
        if not lae.is_file():
            run_lae(world, cfg, run=root / "lae", **lae_overrides)
    run_dit(world, cfg, load_encoder(world.face), load_encoder(world.image), run=root / "dit", lae=lae,
            hypernet=hypernet, **dit_overrides)
    return hypernet


def validation_people(world, cfg, n: int = VALIDATION_IDENTITIES) -> list[MeasuredPerson]:
    """n identities no model trained on and the results do not score (world.VALIDATION_FIRST on), their
    photos rendered as the held-out ones' are (WORLD/study/validation/): settings are chosen on them."""
    from .render import write_identity_folders
    from .world import TRIGGER, VALIDATION_FIRST

    root = world.root / "study" / "validation"
    people = []
    for i, person in enumerate(sample_identities(n, cfg.seed, first=VALIDATION_FIRST)):
        name = f"id_{VALIDATION_FIRST + i:05d}"
        if not (root / name / f"{cfg.lora_photos - 1:03d}.png").is_file():
            write_identity_folders(root, 1, cfg.lora_photos, cfg.seed, subject=TRIGGER,
                                   first_identity=VALIDATION_FIRST + i)
        people.append(MeasuredPerson(name, person, None, sorted((root / name).glob("*.png"))))
    return people


def one_standard_error_choice(scored: dict, prompt: dict, floor: float, cost) -> tuple:
    """(chosen, best, eligible settings): among the settings whose prompt accuracy is at least `floor`
    (all if none is), the best by mean identity accuracy (`scored`: setting -> per-identity array);
    then the cheapest by `cost` whose paired mean over the same identities is within one paired
    standard error of it (ties: the higher accuracy)."""
    eligible = [s for s in scored if prompt[s] >= floor] or list(scored)
    best = max(eligible, key=lambda s: scored[s].mean())
    near = []
    for s in eligible:
        diff = scored[best] - scored[s]
        se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
        if diff.mean() <= se:
            near.append(s)
    return min(near, key=lambda s: (cost(s), -scored[s].mean())), best, eligible


def choose_sampling(rows: dict, settings, max_prompt_drop: float = 0.05) -> dict:
    """The one-standard-error rule (one_standard_error_choice) on the validation rows of `settings`:
    the prompt at most `max_prompt_drop` below the base model's (the prompt target), cost the steps."""
    scored = {s: np.asarray(rows[validation_key(*s)]["per_identity"]) for s in settings}
    prompt = {s: rows[validation_key(*s)]["prompt_accuracy"] for s in settings}
    # Cost is the step count: one DiT call a step, guidance batching both branches into it.
    chosen, best, eligible = one_standard_error_choice(scored, prompt, rows["val-base"]["prompt_accuracy"] - max_prompt_drop,
                                                       cost=lambda s: s[1])
    sampler, steps, guidance = chosen
    return {"sampler": sampler, "steps": steps, "guidance": guidance, "best": list(best),
            "identity_accuracy": float(scored[chosen].mean()),
            "best_identity_accuracy": float(scored[best].mean()), "eligible": len(eligible)}


def choose_strength(rows: dict, strengths=STRENGTHS, max_prompt_drop: float = 0.05) -> dict:
    """The same rule for Apply Predicted LoRA's strength on the validation rows (val-strength-S): the
    setting nearest 1 (the LoRA as predicted) among those within one paired SE of the best."""
    scored = {s: np.asarray(rows[strength_key(s, "val")]["per_identity"]) for s in strengths}
    prompt = {s: rows[strength_key(s, "val")]["prompt_accuracy"] for s in strengths}
    chosen, best, eligible = one_standard_error_choice(scored, prompt, rows["val-base"]["prompt_accuracy"] - max_prompt_drop,
                                                       cost=lambda s: abs(s - 1.0))
    return {"strength": chosen, "best": best, "identity_accuracy": float(scored[chosen].mean()),
            "best_identity_accuracy": float(scored[best].mean()), "eligible": len(eligible)}


def sampling_key(sampler: str, steps: int, guidance: float) -> str:
    return f"sample-{sampler}-{steps}-g{guidance:g}"


def validation_key(sampler: str, steps: int, guidance: float) -> str:
    return f"val-{sampler}-{steps}-g{guidance:g}"


def strength_key(strength: float, of: str = "predicted") -> str:
    """The row of one LoRA kind (predicted, trained, nearest; val: predicted for the validation people)."""
    return f"{of}-strength-{strength:g}"


def sampling_label(sampler: str, steps: int, guidance: float) -> str:
    return f"{'DDIM' if sampler == 'ddim' else 'DPM-Solver++'} {steps} steps, guidance {guidance:g}"


def _symlink_unless_there(src: Path, dst: Path) -> None:
    """Link dst to src (a resumed run finds the links it made)."""
    if not dst.exists():
        dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())


def weight_space_hypernet(world, cfg, space: str, n: int = WEIGHT_SPACE_IDENTITIES, processes: int = 1) -> Path:
    """Train (or resume) the LAE and DiT of one weight space on the first `n` training identities
    (WORLD/study/ws-<space>/); returns its hypernet file. Free reuses the world's LoRAs; shared-down
    trains its own, held-out ones included, from the same photos, at the rank the hypernet learns (a
    shared down-projection has no per-LoRA top components to cut a higher rank to)."""
    from .identity_encoder import load_encoder
    from .split import identity_name, exclusion
    from .world import _loras_complete, run_dit, run_identity_loras, run_lae, training_people

    root = world.root / "study" / f"ws-{space}"
    hypernet = root / "hypernet.safetensors"
    if hypernet.is_file():
        return hypernet
    face, image = load_encoder(world.face), load_encoder(world.image)
    # The world's own hypernet never learned from identities with a held-out pair; neither do these.
    excluded = set(map(identity_name, exclusion(training_people(cfg), cfg.heldout_pairs)[1]))
    names = sorted(p.name for p in (world.data / "train").iterdir() if p.is_dir() and p.name not in excluded)[:n]
    loras = root / "loras" / "train"
    if space == "free":
        loras.mkdir(parents=True, exist_ok=True)
        for name in names:
            if (world.loras / "train" / f"{name}.safetensors").is_file():  # not one identity-loras skipped
                for suffix in (".safetensors", EMB_SUFFIX):
                    _symlink_unless_there(world.loras / "train" / (name + suffix), loras / (name + suffix))
    else:
        data = root / "data" / "train"
        data.mkdir(parents=True, exist_ok=True)
        for name in names:
            _symlink_unless_there(world.data / "train" / name, data / name)
        for split, src in (("heldout", world.data / "heldout"), ("train", data)):
            out = root / "loras" / split
            if not _loras_complete(out / "report.json"):
                run_identity_loras(world, split, cfg, face, image, processes, data=str(src), out=str(out),
                                   weight_space=space, rank=cfg.hypernet_rank or cfg.lora_rank)
    lae = root / "lae" / "lae_final.safetensors"
    if not lae.is_file():
        run_lae(world, cfg, run=lae.parent, loras=str(loras))
    run_dit(world, cfg, face, image, run=root / "dit", lae=lae, hypernet=hypernet, loras=str(loras))
    return hypernet


class StudyRows:
    """The rows of one study, in OUT/study.json: each scored once and saved as soon as it is (a rerun
    keeps rows already scored; delete study.json to redo them)."""

    def __init__(self, path: Path, scorer: LoraScorer):
        self.path, self.scorer = path, scorer
        self.done = json.loads(path.read_text()) if path.is_file() else {}
        self.rows = self.done.get("rows", {})

    def score(self, key: str, group: str, label: str, make, on: LoraScorer | None = None,
              strength: float = 1.0) -> None:
        """`make()` -> (one LoRA per person, extra columns), scored by `on` (default the held-out people)
        with the LoRAs applied at `strength`."""
        if key in self.rows:
            return
        t0 = time.perf_counter()
        loras, extra = make()
        self.rows[key] = {"group": group, "label": label, **(on or self.scorer).score(loras, strength), **extra,
                          "seconds": time.perf_counter() - t0}
        log.info("%-28s identity %.3f ± %.3f, prompt %.3f", label, self.rows[key]["identity_accuracy"],
                 self.rows[key]["identity_accuracy_sem"], self.rows[key]["prompt_accuracy"])
        self.save()

    def save(self) -> None:
        from .results import atomic_write_text

        atomic_write_text(self.path, json.dumps({**self.done, "rows": self.rows,
                                                 "identities": [p.name for p in self.scorer.people]}, indent=1))


def _timed_prediction(hn, scorer: LoraScorer, **kwargs):
    """predicted() as a row's make(): the LoRAs, and the seconds per prediction as a column."""
    loras, seconds = predicted(hn, scorer, **kwargs)
    return loras, {"predict_seconds": seconds}


def _main_rows(study: StudyRows, scorer: LoraScorer, hn) -> None:
    from safetensors.torch import load_file

    from .results import reconstruct

    n = len(scorer.people)
    study.score("base", "main", "base model", lambda: ([None] * n, {}))
    study.score("trained", "main", "trained identity LoRA", lambda: ([load_file(p.lora) for p in scorer.people], {}))
    study.score("reconstructed", "main", "LAE reconstruction",
                lambda: ([reconstruct(hn, p.lora) for p in scorer.people], {}))
    study.score("predicted", "main", "DiffLoRA (1 photo, DDIM 25, guidance 3)",
                lambda: _timed_prediction(hn, scorer, **REFERENCE))


def _baseline_rows(study: StudyRows, scorer: LoraScorer, hn) -> None:
    ts, refs = TrainingSet(scorer.world, hn), first_photo_embeddings(hn, scorer)
    study.score("mean-lora", "baselines", "mean training LoRA", lambda: (mean_lora(hn, ts, len(scorer.people)), {}))
    study.score("nearest", "baselines", "nearest training identity (face embedding)",
                lambda: (nearest_identity(ts, refs), {}))

    def ridge():
        model = fit_ridge(ts, scorer.cfg.seed)
        return ridge_loras(hn, model, refs), {"ridge": model["choice"]}
    study.score("ridge", "baselines", "ridge regression to the top principal components", ridge)


def _sampling_rows(study: StudyRows, scorer: LoraScorer, hn) -> None:
    for sampler, steps, guidance in SAMPLING:
        study.score(sampling_key(sampler, steps, guidance), "sampling", sampling_label(sampler, steps, guidance),
                    lambda s=sampler, k=steps, g=guidance: _timed_prediction(hn, scorer, sampler=s, steps=k,
                                                                             guidance=g))


def _photo_rows(study: StudyRows, scorer: LoraScorer, hn) -> None:
    for k in PHOTOS:
        study.score(f"photos-{k}", "photos", f"{k} reference photo{'s' if k > 1 else ''}",
                    lambda k=k: _timed_prediction(hn, scorer, photos=k, **REFERENCE))


def _ablation_rows(study: StudyRows, scorer: LoraScorer, ablations) -> None:
    from difflora.hypernet_file import load_hypernet

    from .results import reconstruct

    for name in ablations:
        lae_overrides = ABLATIONS[name][0]
        h = load_hypernet(ablation_hypernet(scorer.world, scorer.cfg, name))
        study.score(f"ablation-{name}", "ablations", f"{name}: DiffLoRA (1 photo)",
                    lambda h=h: _timed_prediction(h, scorer, **REFERENCE))
        if lae_overrides is not None:
            study.score(f"ablation-{name}-recon", "ablations", f"{name}: LAE reconstruction",
                        lambda h=h: ([reconstruct(h, p.lora) for p in scorer.people], {}))


def _validation_rows(study: StudyRows, scorer: LoraScorer, hn, identities: int | None) -> None:
    """The sampler grid on the validation identities, the setting chosen there, and that setting
    scored on the held-out identities."""
    grid = list(VALIDATION_SAMPLING)
    k = VALIDATION_IDENTITIES if identities is None else min(identities, VALIDATION_IDENTITIES)
    val = scorer.on(validation_people(scorer.world, scorer.cfg, k))
    study.score("val-base", "validation", "validation identities: base model",
                lambda: ([None] * len(val.people), {}), on=val)
    for setting in grid:
        study.score(validation_key(*setting), "validation", f"validation identities: {sampling_label(*setting)}",
                    lambda s=setting: _timed_prediction(hn, val, sampler=s[0], steps=s[1], guidance=s[2]), on=val)
    study.done["validation_choice"] = choice = choose_sampling(study.rows, grid)
    study.save()
    log.info("chosen on the validation identities: %s", choice)
    sampler, steps, guidance = choice["sampler"], choice["steps"], choice["guidance"]
    study.score(sampling_key(sampler, steps, guidance), "sampling", sampling_label(sampler, steps, guidance),
                lambda: _timed_prediction(hn, scorer, sampler=sampler, steps=steps, guidance=guidance))


def _strength_rows(study: StudyRows, scorer: LoraScorer, hn, identities: int | None) -> None:
    """The predicted LoRA (pack default sampler) at each strength on the validation identities, the
    strength chosen there, and every strength on the held-out identities beside the controls."""
    from safetensors.torch import load_file

    from .world import hypernet_loras

    k = VALIDATION_IDENTITIES if identities is None else min(identities, VALIDATION_IDENTITIES)
    val = scorer.on(validation_people(scorer.world, scorer.cfg, k))
    # One prediction per person serves every strength (made only if a row still needs it).
    val_predicted = functools.cache(lambda: _timed_prediction(hn, val, **PACK_SAMPLING))
    held_predicted = functools.cache(lambda: _timed_prediction(hn, scorer, **PACK_SAMPLING))
    study.score("val-base", "validation", "validation identities: base model",
                lambda: ([None] * len(val.people), {}), on=val)
    for s in STRENGTHS:
        study.score(strength_key(s, "val"), "validation", f"validation identities: DiffLoRA (1 photo) at strength {s:g}",
                    val_predicted, on=val, strength=s)
    study.done["strength_choice"] = choose_strength(study.rows)
    for s in STRENGTHS:
        study.score(strength_key(s), "strength", f"DiffLoRA (1 photo, pack sampler) at strength {s:g}",
                    held_predicted, strength=s)
    c = CONTROL_STRENGTH
    study.score(strength_key(c, "trained"), "strength", f"trained identity LoRA at strength {c:g}",
                lambda: ([load_file(p.lora) for p in scorer.people], {}), strength=c)
    study.score(strength_key(c, "nearest"), "strength", f"nearest training identity at strength {c:g}",
                lambda: (nearest_identity(FaceIndex(hypernet_loras(scorer.world, scorer.cfg), hn.spec),
                                          first_photo_embeddings(hn, scorer)), {}), strength=c)


def _weight_space_rows(study: StudyRows, scorer: LoraScorer) -> None:
    from difflora.hypernet_file import load_hypernet
    from safetensors.torch import load_file

    from .results import reconstruct

    for space in WEIGHT_SPACES:
        h = load_hypernet(weight_space_hypernet(scorer.world, scorer.cfg, space))
        own = [scorer.world.root / "study" / f"ws-{space}" / "loras" / "heldout" / p.lora.name
               for p in scorer.people] if space != "free" else [p.lora for p in scorer.people]
        if space != "free":
            study.score(f"ws-{space}-trained", "weight space", f"{space} weight space: trained identity LoRA",
                        lambda own=own: ([load_file(f) for f in own], {}))
        study.score(f"ws-{space}-recon", "weight space", f"{space} weight space: LAE reconstruction",
                    lambda h=h, own=own: ([reconstruct(h, f) for f in own], {}))
        study.score(f"ws-{space}-predicted", "weight space", f"{space} weight space: DiffLoRA (1 photo)",
                    lambda h=h: _timed_prediction(h, scorer, **REFERENCE))


def run_study(world_root, parts=PARTS, identities: int | None = None, device: str = "cpu",
              out: str | os.PathLike | None = None, ablations=tuple(ABLATIONS),
              hypernet: str | os.PathLike | None = None) -> Path:
    """Score the rows of `parts` (kept rows are not scored again) into OUT/study.json and study.md.
    `hypernet`: the one the main, baseline, sampling, photo and validation rows measure (default the
    world's), e.g. an ablation's WORLD/study/<name>/hypernet.safetensors."""
    from difflora.hypernet_file import load_hypernet

    from .results import atomic_write_text

    scorer = LoraScorer(world_root, identities, device)
    out = Path(out or scorer.world.root / "study")
    out.mkdir(parents=True, exist_ok=True)
    study = StudyRows(out / "study.json", scorer)
    hn = load_hypernet(hypernet or scorer.world.hypernet)
    study.done["hypernet"] = str(hypernet or scorer.world.hypernet)

    _main_rows(study, scorer, hn)
    if "baselines" in parts:
        _baseline_rows(study, scorer, hn)
    if "sampling" in parts:
        _sampling_rows(study, scorer, hn)
    if "photos" in parts:
        _photo_rows(study, scorer, hn)
    if "ablations" in parts:
        _ablation_rows(study, scorer, ablations)
    if "validation" in parts:
        _validation_rows(study, scorer, hn, identities)
    if "strength" in parts:
        _strength_rows(study, scorer, hn, identities)
    if "weight-space" in parts:
        _weight_space_rows(study, scorer)
    atomic_write_text(out / "study.md", markdown(study.rows, len(scorer.people), study.done.get("validation_choice"),
                                                 study.done.get("strength_choice")))
    print((out / "study.md").read_text())
    return out


def markdown(rows: dict, identities: int, choice: dict | None = None, strength: dict | None = None) -> str:
    base = rows["base"]["identity_accuracy"]
    gain = rows["trained"]["identity_accuracy"] - base
    lines = [f"# Toy world study ({identities} held-out identities)", "",
             "Reproduce: `python -m difflora_toyworld study --world WORLD`", "",
             "| group | method | identity accuracy | share of the trained gain | prompt accuracy |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows.values():
        # Validation identities have no trained LoRAs: the held-out gain is not theirs to share.
        if r["group"] == "validation":
            share = ""
        else:
            share = f"{(r['identity_accuracy'] - base) / gain:.2f}" if gain > 0 else "nan"
        lines.append(f"| {r['group']} | {r['label']} | {r['identity_accuracy']:.3f} ± {r['identity_accuracy_sem']:.3f} "
                     f"| {share} | {r['prompt_accuracy']:.3f} |")
    if choice:
        lines += ["", f"Chosen on the validation identities (one-standard-error rule, `study.choose_sampling`): "
                      f"{sampling_label(choice['sampler'], choice['steps'], choice['guidance'])} "
                      f"(validation identity {choice['identity_accuracy']:.3f}; the best, "
                      f"{sampling_label(*choice['best'])}, {choice['best_identity_accuracy']:.3f})."]
    if strength:
        lines += ["", f"Strength chosen on the validation identities (`study.choose_strength`): {strength['strength']:g} "
                      f"(validation identity {strength['identity_accuracy']:.3f}; the best, {strength['best']:g}, "
                      f"{strength['best_identity_accuracy']:.3f})."]
    return "\n".join(lines) + "\n"
