"""Build the toy world from nothing: every model of the DiffLoRA pipeline, trained with the project's code.

Stages, each writing its outputs atomically into the world folder so a stopped build resumes at
the first unfinished stage (identity-loras and the lae/dit loops also resume inside a stage):

  vae             the toy SDXL's VAE, trained from scratch            base/vae
  classifier      attribute classifier (the measuring instrument),   classifier.safetensors
                  on renders and their VAE reconstructions
  encoders        toy-face and toy-image embeddings                  toy_face / toy_image.safetensors
  unet            the toy SDXL's UNet, on described captions         base/ (diffusers), toy_sdxl.safetensors
  data            identity folders with trigger captions             data/train, data/heldout,
                  (and the compositional split's record)             data/compositional, split.json
  identity-loras  one DreamBooth LoRA per identity (project trainer) loras/train, loras/heldout,
                                                                     loras/compositional
  composable      the training LoRAs without a held-out pair         loras/train-composable (links)
  lae, dit        LoRA autoencoder, DiT + MIF (project trainers)     lae/, dit/, hypernet.safetensors

Identities are disjoint by construction: the base model, classifier and encoders see identities
[0, base_identities); the hypernet learns from [TRAIN_FIRST, ...) less those with a held-out pair
(split.py); the measurement uses [HELDOUT_FIRST, ...) and the compositional people, chosen from
[COMPOSITIONAL_FIRST, ...) for having a held-out pair; nothing was trained on either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from difflora.config_dict import ConfigDict
from difflora.errors import DiffLoRAError
from . import toy_sdxl
from .render import Identity
from .split import HELDOUT_PAIRS, Pair, check_pairs

log = logging.getLogger("difflora_toyworld")

TRAIN_FIRST = 20_000     # first identity index of the LoRA (hypernet training) identities
HELDOUT_FIRST = 50_000   # first identity index of the held-out identities
VALIDATION_FIRST = 60_000  # the study's validation identities: settings are chosen on them, not on the held-out
COMPOSITIONAL_FIRST = 70_000  # the compositional people are chosen from here on (split.select_with_pairs)
TRIGGER = "a sks person"


@dataclass
class WorldConfig(ConfigDict):
    """Sizes of one world; `WORLD_SIZES` names the two used (the committed one and the test one)."""

    seed: int = 0
    base_identities: int = 1500        # x photos_per_identity photos train the base, classifier, encoders
    photos_per_identity: int = 4
    classifier_steps: int = 2500       # on renders and their VAE reconstructions
    encoder_steps: int = 500
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_crop: int = 32                 # random crops: a quarter of the cost of whole photos
    vae_decoder_steps: int = 0         # then the decoder alone on whole photos (0: none)
    unet_size: str = "toy"             # toy_sdxl.UNET_SIZES
    unet_steps: int = 6000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    train_identities: int = 3000       # identity LoRAs the hypernet learns from
    heldout_identities: int = 32       # identity LoRAs for the comparison only
    # 12 photos so LoRAs of one person agree across photo sets; 80 x 4 so 3,000 identities train in one
    # sitting at a small cost in identity (figures: docs/TOYWORLD.md, "The identity-LoRA recipe").
    lora_photos: int = 12
    lora_steps: int = 80
    lora_batch: int = 4
    lora_lr: float = 2e-3
    lora_rank: int = 4
    hypernet_rank: int = 0             # the rank the LAE and DiT learn: 0 = the LoRAs' own, lower = their top components
    lae_size: str = "toy"              # sizes.LAE_SIZES
    lae_steps: int = 2000
    dit_steps: int = 3000
    device: str = "cpu"
    # Pairs of values no identity the LAE and DiT learn from has together; as many compositional people
    # as held-out ones have one each (split.py). Empty: no compositional split, as worlds before it.
    heldout_pairs: tuple[Pair, ...] = HELDOUT_PAIRS

    def __post_init__(self):
        self.heldout_pairs = check_pairs(self.heldout_pairs)

    def to_dict(self) -> dict:
        # As world.json stores it (pairs as lists), so a config read back compares equal.
        return json.loads(json.dumps(super().to_dict()))


WORLD_SIZES = {
    "default": WorldConfig(),
    # Toy world v2 (docs/TOYWORLD.md, "Toy world v2"): the base model drew described people at 0.40 of
    # the VAE's 0.75 and was still learning; on this base, 320 x 8 rank-16 LoRAs reached 0.63 identity
    # on validation people (160 x 8: 0.59) at 9 s an identity.
    "v2": WorldConfig(base_identities=5000, classifier_steps=4000, vae_steps=4000, unet_size="toy-attn",
                      unet_steps=12000, lora_rank=16, lora_steps=320, lora_batch=8, lora_lr=2e-3,
                      # cut to rank 4 they kept their identity accuracy (0.64 vs 0.63): the hypernet learns rank 4
                      hypernet_rank=4),
    # A world that builds in about a minute: for tests of the build machinery, not of quality. Its
    # hypernet learns rank 2 of the rank-4 LoRAs, as v2's learns rank 4 of rank 16.
    # 12 training identities: the 12th (id_20011) has a held-out pair, so the split excludes one.
    "smoke": WorldConfig(base_identities=60, classifier_steps=20, encoder_steps=20, vae_steps=10, vae_decoder_steps=3,
                         unet_size="toy-attn", unet_steps=10,
                         train_identities=12, heldout_identities=2, lora_photos=3, lora_steps=3, lae_steps=10,
                         hypernet_rank=2, dit_steps=10, unet_batch=8),
}


# What a setting added after the first worlds were built was before it existed: a world recorded
# without it was built this way. (A world built before the compositional split has no held-out pairs:
# its hypernet learned from every training identity.)
AS_BUILT_BEFORE_THE_SETTING = {"vae_decoder_steps": 0, "unet_size": "toy", "lora_rank": 4, "hypernet_rank": 0,
                               "lae_size": "toy", "heldout_pairs": []}


def settings_as_built(stored: dict) -> dict:
    """Recorded world settings (world.json, a checkpoint's metadata) as a WorldConfig dict; a setting
    they lack reads as what the build was before it existed."""
    return {**WorldConfig().to_dict(), **AS_BUILT_BEFORE_THE_SETTING, **stored}


class World:
    """Paths of a world folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __getattr__(self, name):  # world.classifier -> root/classifier.safetensors etc.
        files = {"classifier": "classifier.safetensors", "face": "toy_face.safetensors",
                 "image": "toy_image.safetensors", "checkpoint": "toy_sdxl.safetensors",
                 "hypernet": "hypernet.safetensors", "base": "base", "data": "data", "loras": "loras",
                 "lae": "lae", "dit": "dit", "config": "world.json", "split": "split.json"}
        if name not in files:
            raise AttributeError(name)
        return self.root / files[name]

    def stored_config(self) -> dict:
        """world.json as a WorldConfig dict (`settings_as_built`)."""
        return settings_as_built(json.loads(self.config.read_text()))

    def load_config(self) -> WorldConfig:
        return WorldConfig.from_dict(self.stored_config())


def _stage(name: str, done: bool, t0: float) -> bool:
    state = "done earlier, skipped" if done else "running"
    print(f"[world {time.monotonic() - t0:7.1f} s] {name}: {state}", flush=True)
    return not done


# Settings only a later stage reads, with what shows that stage has begun: until then they may change
# (a LoRA recipe is chosen on the world's own base, after the base stages: `build --base-only`).
LATER_STAGE_SETTINGS = {
    "identity-loras": (("lora_rank", "lora_steps", "lora_batch", "lora_lr"),
                       lambda world: world.loras.is_dir() and any(world.loras.iterdir())),
    "lae": (("hypernet_rank", "lae_size", "lae_steps"), lambda world: world.lae.is_dir() and any(world.lae.iterdir())),
    "dit": (("dit_steps",), lambda world: world.dit.is_dir() and any(world.dit.iterdir())),
}


def _unstarted_settings(world: World) -> set[str]:
    return {name for names, begun in LATER_STAGE_SETTINGS.values() if not begun(world) for name in names}


def _check_config(world: World, cfg: WorldConfig) -> None:
    """A world folder is built with one config; resuming with another would mix two worlds. Settings of
    stages that have not begun may change: world.json then records the new ones."""
    if world.config.is_file():
        old, new = world.stored_config(), cfg.to_dict()
        changed = sorted(k for k in new if old.get(k) != new[k])
        if changed and set(changed) <= _unstarted_settings(world):
            log.warning("%s: %s changed before their stage began; world.json records the new values",
                        world.root, ", ".join(changed))
            _write_config(world, cfg)
        elif changed:
            before_split = "heldout_pairs" in changed and not old["heldout_pairs"]
            raise DiffLoRAError(f"{world.root} was built with other settings ({', '.join(changed)} differ"
                                f"{'; it was built before the compositional split' if before_split else ''}); "
                                "use a new folder, or delete this one to rebuild.")
    else:
        world.root.mkdir(parents=True, exist_ok=True)
        _write_config(world, cfg)


def _write_config(world: World, cfg: WorldConfig) -> None:
    toy_sdxl.atomic_write_text(world.config, json.dumps(cfg.to_dict(), indent=1))


def build_world(root: str | os.PathLike, cfg: WorldConfig, tokenizer: str | os.PathLike,
                processes: int = 1, base_only: bool = False) -> World:
    """Run every unfinished stage; returns the world's paths. `processes` > 1 trains the identity
    LoRAs under `accelerate launch` with that many CPU processes (identities are independent).
    `base_only` stops after the base model and the identity folders, so that the LoRA recipe can be
    chosen on this base (`benchmarks/bench_lora_recipes.py --base WORLD/base`) before it is used."""
    from .identity_encoder import load_encoder
    from .render import make_dataset

    world = World(root)
    _check_config(world, cfg)
    t0 = time.monotonic()
    torch.manual_seed(cfg.seed)
    base_photos = _made_once(lambda: make_dataset(cfg.base_identities, cfg.photos_per_identity, cfg.seed))

    if not (world.base / "model_index.json").is_file():
        toy_sdxl.init_pipeline_folder(world.base, tokenizer, cfg.seed, cfg.unet_size)
    _vae_stage(world, cfg, base_photos, t0)
    _classifier_and_encoder_stages(world, cfg, base_photos, t0)
    _unet_and_checkpoint_stages(world, cfg, base_photos, t0)
    _data_stage(world, cfg, t0)
    if base_only:
        print(f"[world {time.monotonic() - t0:7.1f} s] base stages complete: {world.root}", flush=True)
        return world

    face, image = load_encoder(world.face), load_encoder(world.image)
    # The held-out and compositional ones first: the few the measurement needs.
    for split in ("heldout", "compositional", "train") if cfg.heldout_pairs else ("heldout", "train"):
        report = world.loras / split / "report.json"
        if _stage(f"identity-loras {split}", _loras_complete(report), t0):
            run_identity_loras(world, split, cfg, face, image, processes)
            # A stop request (Ctrl-C, SIGTERM) ends the trainer cleanly; the later stages must not
            # then start on the LoRAs trained so far.
            if not _loras_complete(report):
                raise DiffLoRAError(f"identity-loras ({split}) was interrupted before every identity was trained; "
                                    "run the build again to continue it.")
    if cfg.heldout_pairs and _stage("composable", (world.loras / "train-composable" / "split.json").is_file(), t0):
        link_composable_loras(world, cfg)

    if _stage("lae", (world.lae / "lae_final.safetensors").is_file(), t0):
        run_lae(world, cfg)
    if _stage("dit", world.hypernet.is_file(), t0):
        run_dit(world, cfg, face, image)
    print(f"[world {time.monotonic() - t0:7.1f} s] complete: {world.root}", flush=True)
    return world


def _made_once(make):
    """make() on the first call, the same object after: the base pool is rendered once, and only
    if a stage needs it (VAE, classifier, encoders and UNet all use it)."""
    made = []

    def get():
        if not made:
            made.append(make())
        return made[0]
    return get


def _vae_stage(world: World, cfg: WorldConfig, base_photos, t0: float) -> None:
    from .train_base import ProgressPrinter, train_vae, train_vae_decoder

    vae_done = world.base / "vae"
    if _stage("vae", (vae_done / "trained").is_file(), t0):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_done, local_files_only=True)
        train_vae(vae, base_photos().images, steps=cfg.vae_steps, batch_size=cfg.vae_batch, crop=cfg.vae_crop,
                  seed=cfg.seed, device=cfg.device, progress=ProgressPrinter("vae"))
        if cfg.vae_decoder_steps:
            train_vae_decoder(vae, base_photos().images, steps=cfg.vae_decoder_steps, batch_size=cfg.vae_batch,
                              seed=cfg.seed, device=cfg.device, progress=ProgressPrinter("vae decoder"))

        def save_vae(tmp):
            vae.save_pretrained(tmp)
            (tmp / "trained").write_text("1")
        toy_sdxl.write_dir_atomic(save_vae, vae_done)


def _classifier_and_encoder_stages(world: World, cfg: WorldConfig, base_photos, t0: float) -> None:
    from .attributes import pool_from_dataset, save_classifier, train_attribute_classifier
    from .identity_encoder import save_encoder, train_encoder
    from .train_base import reconstruct

    if _stage("classifier", world.classifier.is_file(), t0):
        # Every image it will score comes out of the VAE's decoder, so it learns from the renders and
        # from their VAE reconstructions, labelled alike (a reader of decoded pictures, not a new task).
        from diffusers import AutoencoderKL

        ds = base_photos()
        vae = AutoencoderKL.from_pretrained(world.base / "vae", local_files_only=True)
        decoded = reconstruct(vae, ds.images, cfg.device)
        pool = pool_from_dataset(ds, ds.images, decoded)
        save_classifier(train_attribute_classifier(cfg.classifier_steps, cfg.seed, pool=pool), world.classifier)
    for kind, path in (("toy-face", world.face), ("toy-image", world.image)):
        if _stage(f"encoder {kind}", path.is_file(), t0):
            save_encoder(train_encoder(kind, cfg.encoder_steps, cfg.seed, pool=pool_from_dataset(base_photos())), path)


def _unet_and_checkpoint_stages(world: World, cfg: WorldConfig, base_photos, t0: float) -> None:
    from .train_base import ProgressPrinter, encode_captions, encode_latents, train_unet

    base = world.base
    if _stage("unet", (base / "unet" / "trained").is_file(), t0):
        pipe = toy_sdxl.load_pipeline(base)
        mean, std = encode_latents(pipe.vae, base_photos().images, cfg.device)
        captions = pretraining_captions(base_photos(), cfg.seed)
        embeds = encode_captions(pipe, captions + [""])
        ema = train_unet(pipe.unet, mean, std, captions, embeds, steps=cfg.unet_steps,
                         batch_size=cfg.unet_batch, lr=cfg.unet_lr, seed=cfg.seed, device=cfg.device,
                         progress=ProgressPrinter("unet"))

        def save_unet(tmp):
            ema.save_pretrained(tmp)
            (tmp / "trained").write_text("1")
        toy_sdxl.write_dir_atomic(save_unet, base / "unet")
        world.checkpoint.unlink(missing_ok=True)
    if _stage("checkpoint", world.checkpoint.is_file(), t0):
        toy_sdxl.export_checkpoint(base, world.checkpoint, {"difflora_toyworld": json.dumps(cfg.to_dict())})


def _data_stage(world: World, cfg: WorldConfig, t0: float) -> None:
    from .render import write_identity_folders, write_people_folders

    data_done = world.data / "complete"
    if _stage("data", data_done.is_file(), t0):
        for split, n, first in (("train", cfg.train_identities, TRAIN_FIRST),
                                ("heldout", cfg.heldout_identities, HELDOUT_FIRST)):
            write_identity_folders(world.data / split, n, cfg.lora_photos, cfg.seed, subject=TRIGGER,
                                   first_identity=first)
        if cfg.heldout_pairs:
            write_people_folders(world.data / "compositional", compositional_people(cfg), cfg.lora_photos, cfg.seed,
                                 subject=TRIGGER)
            toy_sdxl.atomic_write_text(world.split, json.dumps(split_record(cfg), indent=1))
        data_done.write_text("1")


def training_people(cfg: WorldConfig) -> dict[int, Identity]:
    from .render import sample_identities

    return dict(enumerate(sample_identities(cfg.train_identities, cfg.seed, TRAIN_FIRST), start=TRAIN_FIRST))


def compositional_people(cfg: WorldConfig, n: int | None = None) -> dict[int, Identity]:
    """The compositional set ({index: identity}, the first n of it): people with a held-out pair, from
    COMPOSITIONAL_FIRST on, as many as the held-out set (none without pairs)."""
    from .split import select_with_pairs

    if not cfg.heldout_pairs:
        return {}
    n = cfg.heldout_identities if n is None else min(n, cfg.heldout_identities)
    return select_with_pairs(n, cfg.seed, cfg.heldout_pairs, COMPOSITIONAL_FIRST)


def measured_people(cfg: WorldConfig, split: str, n: int | None = None) -> list[tuple[str, Identity]]:
    """(folder name, identity) of the people the measurement scores: split "heldout" or "compositional"."""
    from .render import sample_identities
    from .split import identity_name

    n = cfg.heldout_identities if n is None else min(n, cfg.heldout_identities)
    if split == "heldout":
        people = enumerate(sample_identities(n, cfg.seed, HELDOUT_FIRST), start=HELDOUT_FIRST)
    else:
        people = compositional_people(cfg, n).items()
    return [(identity_name(i), person) for i, person in people]


def split_record(cfg: WorldConfig) -> dict:
    """What split.json records: the pairs, the training identities left out of the LAE and DiT, and
    the compositional people with their pairs."""
    import numpy as np

    from .split import closest_shared, exclusion, identity_name, pairs_of

    people = training_people(cfg)
    kept, excluded = exclusion(people, cfg.heldout_pairs)
    compositional = compositional_people(cfg)
    if set(compositional.values()) & set(people.values()) or set(compositional) & set(people):
        raise DiffLoRAError(f"the compositional people (from {COMPOSITIONAL_FIRST}) overlap the {cfg.train_identities} "
                            f"training identities (from {TRAIN_FIRST}): use fewer training identities.")
    closest = {split: closest_shared([p for _, p in measured_people(cfg, split)], [people[i] for i in kept])
               for split in ("heldout", "compositional")}
    return {"heldout_pairs": cfg.to_dict()["heldout_pairs"], "train_identities": len(people),
            "composable_training_identities": len(kept), "excluded_training_identities": len(excluded),
            "excluded": [identity_name(i) for i in excluded],
            # The most attributes any identity the hypernet learned from shares with each measured person.
            "closest_composable_shared_attributes": {split: {"mean": float(np.mean(v)), "min": min(v), "max": max(v)}
                                                     for split, v in closest.items()},
            "compositional": [{"name": identity_name(i), "pairs": [list(map(list, p)) for p in
                                                                   pairs_of(person, cfg.heldout_pairs)]}
                              for i, person in compositional.items()]}


def hypernet_loras(world: World, cfg: WorldConfig) -> Path:
    """The LoRA folder the LAE and DiT learn from: the training LoRAs without a held-out pair
    (loras/train-composable), or all of them in a world without pairs."""
    return world.loras / "train-composable" if cfg.heldout_pairs else world.loras / "train"


def link_composable_loras(world: World, cfg: WorldConfig) -> Path:
    """loras/train-composable: relative links to the trained LoRAs (and their embeddings) of the
    training identities without a held-out pair; its split.json records the counts. The trainers read
    it as any LoRA folder, so the core needs no notion of the split."""
    from difflora.train.data import EMB_SUFFIX
    from .split import exclusion, identity_name

    kept, excluded = exclusion(training_people(cfg), cfg.heldout_pairs)
    linked = []

    def write(tmp: Path) -> None:
        for name in map(identity_name, kept):
            if (world.loras / "train" / f"{name}.safetensors").is_file():  # not one identity-loras skipped
                for suffix in (".safetensors", EMB_SUFFIX):
                    (tmp / (name + suffix)).symlink_to(Path("..") / "train" / (name + suffix))
                linked.append(name)
        record = {"heldout_pairs": cfg.to_dict()["heldout_pairs"], "train_identities": cfg.train_identities,
                  "excluded_training_identities": len(excluded), "linked": len(linked),
                  "excluded": [identity_name(i) for i in excluded]}
        (tmp / "split.json").write_text(json.dumps(record, indent=1))
    toy_sdxl.write_dir_atomic(write, world.loras / "train-composable")
    print(f"  composable: {len(linked)} training LoRAs linked, {len(excluded)} identities with a held-out pair "
          "left out of the LAE and DiT", flush=True)
    return world.loras / "train-composable"


# The fields that decide the base stages (vae, classifier, encoders, unet): two configs that agree
# on these build the same base model, classifier and encoders.
BASE_FIELDS = ("seed", "base_identities", "photos_per_identity", "classifier_steps", "encoder_steps", "vae_steps",
               "vae_batch", "vae_crop", "vae_decoder_steps", "unet_size", "unet_steps", "unet_batch", "unet_lr")


def seed_base_from_assets(root: str | os.PathLike, cfg: WorldConfig, tokenizer: str | os.PathLike,
                          assets: str | os.PathLike) -> World:
    """Fill a new world's base stages (vae, classifier, encoders, unet, checkpoint) from the shipped
    files instead of training them (about 40 minutes here): the checkpoint back as a diffusers folder,
    the classifier, and the two encoders the hypernet carries. Refused unless the checkpoint was built
    with this config's base settings. The shipped weights are fp16, so this base is the trained one
    rounded to fp16 (every later stage and the measurement then use that same base)."""
    from safetensors import safe_open

    from difflora.hypernet_file import load_hypernet
    from .attributes import load_classifier, save_classifier
    from .identity_encoder import save_encoder

    world, assets = World(root), Path(assets)
    files = {name: assets / rel for name, rel in ARTIFACTS.items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DiffLoRAError(f"cannot seed the base from the shipped files: {', '.join(missing)} missing.")
    with safe_open(str(files["checkpoint"]), framework="pt") as f:  # the header only
        built = json.loads((f.metadata() or {}).get("difflora_toyworld", "{}"))
    if built:
        built = settings_as_built(built)
    differ = [k for k in BASE_FIELDS if built.get(k) != cfg.to_dict()[k]]
    if differ:
        raise DiffLoRAError(f"{files['checkpoint']} was built with other base settings ({', '.join(differ)} differ); "
                            "build the base stages instead (without --base-from-assets).")
    _check_config(world, cfg)
    if not (world.base / "unet" / "trained").is_file():
        toy_sdxl.pipeline_folder_from_checkpoint(files["checkpoint"], world.base, tokenizer, cfg.seed)
        for part in ("vae", "unet"):
            (world.base / part / "trained").write_text("1")
    if not world.checkpoint.is_file():
        tmp = world.checkpoint.with_name(f".{world.checkpoint.name}.tmp")
        shutil.copyfile(files["checkpoint"], tmp)
        os.replace(tmp, world.checkpoint)
    if not world.classifier.is_file():
        save_classifier(load_classifier(files["classifier"]).float(), world.classifier)
    hn = load_hypernet(files["hypernet"])
    for encoder, path in ((hn.face_encoder, world.face), (hn.image_encoder, world.image)):
        if not path.is_file():
            save_encoder(encoder, path)
    return world


def pretraining_captions(photos, seed: int) -> list[str]:
    """The base model's captions: each photo's scene caption with a seeded random part of the
    person's looks said (render.describe), as web captions describe the people SDXL learned from."""
    import numpy as np

    from .render import caption, describe

    rng = np.random.default_rng([seed, 2])
    # A quarter say nothing of the person: the form DreamBooth prompts ("a photo of a sks person, ...") take.
    return [describe(person, scene, rng) if rng.random() >= 0.25 else caption(scene)
            for person, scene in zip(photos.identities, photos.scenes)]


def _loras_complete(report: Path) -> bool:
    if not report.is_file():
        return False
    rows = json.loads(report.read_text())["identities"]
    return all(r["status"] in ("trained", "done", "skipped") for r in rows)


def identity_lora_config(world: World, split: str, cfg: WorldConfig, **overrides):
    """The identity-loras settings of one split (`overrides`: other IdentityLoraConfig fields, as the
    study's weight-space comparison uses)."""
    from difflora.train.config import IdentityLoraConfig

    settings = dict(
        data=str(world.data / split), out=str(world.loras / split), base=str(world.base),
        face_encoder="toy-face", insightface_root=str(world.face), image_encoder=str(world.image),
        rank=cfg.lora_rank, steps=cfg.lora_steps, batch_size=cfg.lora_batch, lr=cfg.lora_lr, resolution=toy_sdxl.IMAGE_SIZE,
        min_images=3, min_face_similarity=0.8, mixed_precision="no", seed=cfg.seed, progress=True)
    return IdentityLoraConfig(**{**settings, **overrides})


def run_identity_loras(world: World, split: str, cfg: WorldConfig, face, image, processes: int = 1, **overrides):
    """In this process, or as the user's command under `accelerate launch` with CPU processes."""
    from difflora.train.identity_loras import train_identity_loras

    lora_cfg = identity_lora_config(world, split, cfg, **overrides)
    if processes <= 1 or cfg.device != "cpu":
        return train_identity_loras(lora_cfg, face_encoder=face, image_encoder=image)
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a free port for the processes' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # --multi_gpu is accelerate's torchrun launcher; without CUDA it starts N CPU (gloo) processes.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "difflora.train", "identity-loras", *cli_args(lora_cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    print("  " + " ".join(cmd[2:]), flush=True)
    if subprocess.run(cmd, env=env).returncode != 0:
        raise DiffLoRAError(f"identity-loras ({split}) failed; see the output above. Run the build again to continue.")


def cli_args(cfg) -> list[str]:
    """A config dataclass as the command-line options that reproduce it (non-defaults only)."""
    args = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args


def run_lae(world: World, cfg: WorldConfig, run: Path | None = None, **overrides):
    """The lae stage (into world.lae, or `run` with LAETrainConfig `overrides`: the study's ablations)."""
    from difflora.train.config import LAETrainConfig
    from difflora.train.lae_trainer import train_lae

    run = run or world.lae
    settings = dict(
        loras=str(hypernet_loras(world, cfg)), run=str(run), size=cfg.lae_size, rank=cfg.hypernet_rank,
        steps=cfg.lae_steps, batch_size=32,
        lr=1e-3, warmup_steps=min(100, cfg.lae_steps // 10), ema_decay=0.999, eval_every=max(cfg.lae_steps // 3, 1),
        ckpt_every=max(cfg.lae_steps // 3, 1), log_every=20, mixed_precision="no", seed=cfg.seed,
        resume=(run / "checkpoints").is_dir())
    result = train_lae(LAETrainConfig(**{**settings, **overrides}))
    if result.status != "finished":
        raise DiffLoRAError("the lae stage was interrupted; run the build again to continue it")


def run_dit(world: World, cfg: WorldConfig, face, image, run: Path | None = None, lae: Path | None = None,
            hypernet: Path | None = None, **overrides):
    """The dit stage, then the hypernet file with both encoders inside (world.hypernet, or the
    study's ablations: their own `run` folder, `lae` file, `hypernet` path and DiTTrainConfig `overrides`)."""
    from difflora.train.config import DiTTrainConfig
    from difflora.train.dit_trainer import train_dit

    run = run or world.dit
    out = run / "hypernet_plain.safetensors"
    settings = dict(
        loras=str(hypernet_loras(world, cfg)), run=str(run), lae=str(lae or world.lae / "lae_final.safetensors"),
        size="toy", cond_dim=128, steps=cfg.dit_steps, batch_size=32, lr=5e-4,
        warmup_steps=min(200, cfg.dit_steps // 10), ema_decay=0.999, eval_every=max(cfg.dit_steps // 3, 1),
        ckpt_every=max(cfg.dit_steps // 3, 1), log_every=20, eval_identities=4, eval_sample_steps=10,
        mixed_precision="no", seed=cfg.seed, out=str(out), resume=(run / "checkpoints").is_dir())
    result = train_dit(DiTTrainConfig(**{**settings, **overrides}))
    if result.status != "finished":
        raise DiffLoRAError("the dit stage was interrupted; run the build again to continue it")
    embed_encoders(out, hypernet or world.hypernet, face, image)


def embed_encoders(src: Path, dst: Path, face, image) -> Path:
    """The final hypernet carries its encoders, so the nodes need no extra model."""
    from difflora.hypernet_file import load_hypernet, save_hypernet

    return save_hypernet(load_hypernet(src), dst, face_encoder=face, image_encoder=image)


# What ships: the three files the demo and the tests need (30 MB at most in all).
# Laid out as ComfyUI model folders, which the pack registers (nodes/folders.py): the base under
# checkpoints/ (read by Load Toy World Base), the hypernet under difflora/ (listed by Load DiffLoRA Hypernet).
ARTIFACTS = {"checkpoint": "checkpoints/toy_sdxl.safetensors", "hypernet": "difflora/difflora_toy.safetensors",
             "classifier": "toy_classifier.safetensors"}


PHOTOS = 4  # held-out people whose first photo ships with the pack (assets/toyworld/photos)


def export_photos(dest: str | os.PathLike, seed: int = 0, n: int = PHOTOS) -> list[Path]:
    """The first photo of each of the first `n` held-out identities (no model saw them), as the
    world's identity-loras data has them: the references of the pack's toy-world template."""
    from PIL import Image

    from .render import iter_dataset

    folder = Path(dest) / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, sample in enumerate(iter_dataset(n, 1, seed, first_identity=HELDOUT_FIRST)):
        path = folder / f"heldout_{i:02d}.png"
        Image.fromarray(sample.image).save(path)
        out.append(path)
    return out


def export_artifacts(world_root: str | os.PathLike, dest: str | os.PathLike,
                     hypernet: str | os.PathLike | None = None) -> dict[str, Path]:
    """The built world's shipped files: the base checkpoint as is; the hypernet (the world's, or
    `hypernet`, another trained on its LoRAs), which carries its two encoders, and the classifier in
    float16 (they load back as float32)."""
    from difflora.hypernet_file import load_hypernet, save_hypernet
    from .attributes import load_classifier, save_classifier

    world, dest = World(world_root), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = {name: dest / file for name, file in ARTIFACTS.items()}
    for path in out.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out["checkpoint"].with_name(f".{out['checkpoint'].name}.tmp")
    shutil.copyfile(world.checkpoint, tmp)
    os.replace(tmp, out["checkpoint"])
    save_hypernet(load_hypernet(hypernet or world.hypernet), out["hypernet"], dtype=torch.float16)
    save_classifier(load_classifier(world.classifier).half(), out["classifier"])
    return out
