"""`python -m difflora.train COMMAND ...`: the training stages from the command line.

    augment         identities with few photos -> generated photos of each person (the user's ComfyUI)
    identity-loras  identity photo folders -> one SDXL LoRA (+ embeddings) per identity
    lae             identity LoRAs -> LoRA autoencoder (<run>/lae_final.safetensors)
    dit             identity LoRAs + LAE -> DiT + MIF -> hypernet .safetensors
    all             the three in one --work folder, then the hypernet
    export          a dit run's checkpoint -> hypernet .safetensors
    check           report which identity LoRAs are usable, and why others are not
    textual-inversion  identity photo folders -> one trigger embedding per identity (--zeroth-order:
                    forward passes only, on an int8 base)

The same commands run on several GPUs or nodes under `accelerate launch -m difflora.train ...`.
Exit status: 0 done, 1 error (a sentence says what to do), 130 stopped by SIGTERM / Ctrl-C
after writing a checkpoint (continue with --resume).
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

from ..errors import DiffLoRAError
from ..plugins import load_plugins
from .config import (AllStagesConfig, AugmentConfig, DiTTrainConfig, ExportConfig, IdentityLoraConfig, LAETrainConfig,
                     LoopConfig, TextualInversionConfig, add_options, command_line_values, read_config_file,
                     resolve_config)

# `all` takes these identity-loras options without a prefix (they are unique to that stage) ...
PROMOTED = ("base", "base_config", "vae", "face_encoder", "insightface_root", "image_encoder")
# ... and these once for every stage.
SHARED = ("mixed_precision", "seed", "progress")
PATHS = ("data", "out", "loras", "run", "lae")
EXIT_INTERRUPTED = 130

STAGES = {"identity": IdentityLoraConfig, "lae": LAETrainConfig, "dit": DiTTrainConfig}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m difflora.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_, cls=None):
        sp = sub.add_parser(name, help=help_, description=(cls.__doc__ if cls else help_),
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter
                            if cls is None else argparse.HelpFormatter)
        sp.add_argument("--config", metavar="FILE", help="JSON or YAML file of options (names as below, with _ or "
                        "-); options given on the command line win.")
        return sp

    add_options(command("augment", "Generate more photos of identities that have few.", AugmentConfig), AugmentConfig)
    add_options(command("identity-loras", "Train one SDXL LoRA per identity folder.", IdentityLoraConfig),
                IdentityLoraConfig)
    add_options(command("lae", "Train the LoRA autoencoder.", LAETrainConfig), LAETrainConfig)
    add_options(command("dit", "Train the DiT + Mixed Image Features; writes the hypernet.", DiTTrainConfig),
                DiTTrainConfig)
    add_options(command("export", "Write a hypernet file from a dit run.", ExportConfig), ExportConfig)
    add_options(command("textual-inversion", "Learn one trigger embedding per identity folder.",
                        TextualInversionConfig), TextualInversionConfig)
    check = command("check", "Report usable and skipped identity LoRAs (nothing is trained).")
    check.add_argument("--loras", required=True, help="Folder of identity LoRAs.")

    a = command("all", "identity-loras -> lae -> dit -> hypernet in one --work folder.", AllStagesConfig)
    add_options(a, AllStagesConfig)
    add_options(a, IdentityLoraConfig, only=PROMOTED, title="base model and encoders")
    add_options(a, LoopConfig, only=SHARED, title="for every stage")
    for prefix, cls in STAGES.items():
        add_options(a, cls, prefix=prefix, skip=PATHS + PROMOTED + SHARED + ("resume",),
                    title=f"{prefix} stage (in a config file: section '{prefix}')")
    return p


def _setup_logging(verbose: bool) -> None:
    import os

    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")


def run_all(cfg: AllStagesConfig, stage_cfgs: dict, accelerator=None) -> int:
    from .dit_trainer import train_dit
    from .identity_loras import train_identity_loras
    from .lae_trainer import LAE_FINAL, train_lae
    from .loop import make_accelerator

    log = logging.getLogger("difflora.train")
    if not cfg.work:
        raise DiffLoRAError("all needs --work (the folder every stage writes to).")
    work = Path(cfg.work)
    out = Path(cfg.out) if cfg.out else work / "hypernet.safetensors"
    id_cfg, lae_cfg, dit_cfg = stage_cfgs["identity"], stage_cfgs["lae"], stage_cfgs["dit"]
    id_cfg.data, id_cfg.out = cfg.data, str(work / "loras")
    lae_cfg.loras, lae_cfg.run, lae_cfg.resume = str(work / "loras"), str(work / "lae"), cfg.resume
    dit_cfg.loras, dit_cfg.run, dit_cfg.resume = str(work / "loras"), str(work / "dit"), cfg.resume
    dit_cfg.lae, dit_cfg.out = str(work / "lae" / LAE_FINAL), str(out)
    accelerator = accelerator or make_accelerator(id_cfg.mixed_precision)
    results = train_identity_loras(id_cfg, accelerator=accelerator)
    if any(r.status == "interrupted" for r in results):
        return EXIT_INTERRUPTED
    if cfg.resume and (work / "lae" / LAE_FINAL).is_file():
        log.info("lae stage already finished (%s): skipped.", work / "lae" / LAE_FINAL)
    elif train_lae(lae_cfg, accelerator=accelerator).status != "finished":
        return EXIT_INTERRUPTED
    if cfg.resume and out.is_file():
        log.info("dit stage already finished (%s): skipped.", out)
    elif train_dit(dit_cfg, accelerator=accelerator).status != "finished":
        return EXIT_INTERRUPTED
    log.info("Done: %s (copy it to ComfyUI/models/difflora/).", out)
    return 0


def stage_configs_for_all(ns, file_values: dict) -> tuple[AllStagesConfig, dict]:
    top = {k: v for k, v in file_values.items() if k not in STAGES}
    cli = command_line_values(ns)
    all_keys = {f for f in AllStagesConfig.__dataclass_fields__}
    cfg = resolve_config(AllStagesConfig, {k: v for k, v in top.items() if k in all_keys},
                         {k: v for k, v in cli.items() if k in all_keys}, "all")
    common_file = {k: v for k, v in top.items() if k in PROMOTED + SHARED}
    common_cli = {k: v for k, v in cli.items() if k in PROMOTED + SHARED}
    unknown = set(top) - all_keys - set(PROMOTED) - set(SHARED)
    if unknown:
        raise DiffLoRAError(f"Unknown top-level option(s) {sorted(unknown)} in the config file; stage options go "
                            f"in sections {list(STAGES)}.")
    stages = {}
    for prefix, cls in STAGES.items():
        fields = cls.__dataclass_fields__
        common = {k: v for k, v in {**common_file, **common_cli}.items() if k in fields}
        section = file_values.get(prefix) or {}
        section_values = {k.replace("-", "_"): v for k, v in section.items()}
        stages[prefix] = resolve_config(cls, {**common, **section_values},
                                        {**common, **command_line_values(ns, prefix)}, f"{prefix} stage")
    return cfg, stages


def main(argv: list[str] | None = None) -> int:
    load_plugins()  # installed plugins add face analysis kinds and model sizes that options accept
    ns = build_parser().parse_args(argv)
    _setup_logging(ns.verbose)
    try:
        return _run(ns)
    except DiffLoRAError as e:
        logging.getLogger("difflora.train").error("%s", e)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: what was written stays whole, the next run continues
        logging.getLogger("difflora.train").error("Stopped at once (second Ctrl-C); run the same command again to "
                                                  "continue (with --resume for the training stages).")
        return EXIT_INTERRUPTED
    except OSError as e:  # a full disk, a lost network drive, permissions: the files written so far stay good
        what = "free space on that disk" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check that path"
        logging.getLogger("difflora.train").error(
            "Could not read or write %s: %s. The files written before it are whole; %s, then run the same command "
            "again (with --resume to continue from the last checkpoint).", e.filename or "a file", e.strerror or e,
            what)
        return 1


def _run(ns) -> int:
    file_values = read_config_file(getattr(ns, "config", None))
    if ns.command == "all":
        cfg, stages = stage_configs_for_all(ns, file_values)
        return run_all(cfg, stages)
    if ns.command == "check":
        from .data import load_lora_dataset

        data = load_lora_dataset(ns.loras, embeddings=True)
        print(data.report.summary(len(data.names)))
        print(f"spec: {data.spec.describe()}; encoders: {data.encoders}")
        return 0
    cls = {"augment": AugmentConfig, "identity-loras": IdentityLoraConfig, "lae": LAETrainConfig, "dit": DiTTrainConfig,
           "export": ExportConfig, "textual-inversion": TextualInversionConfig}[ns.command]
    cfg = resolve_config(cls, file_values, command_line_values(ns), ns.command)
    if ns.command == "augment":
        from ..photos.augment import augment_identities

        reports = augment_identities(cfg)
        return EXIT_INTERRUPTED if any(r.status == "interrupted" for r in reports) else 0
    if ns.command == "identity-loras":
        from .identity_loras import train_identity_loras

        results = train_identity_loras(cfg)
        return EXIT_INTERRUPTED if any(r.status == "interrupted" for r in results) else 0
    if ns.command == "textual-inversion":
        from .textual_inversion import train_textual_inversion

        results = train_textual_inversion(cfg)
        for r in results:
            if r.status == "skipped":
                logging.getLogger("difflora.train").warning("  skipped %s: %s", r.name, r.reason)
        return EXIT_INTERRUPTED if any(r.status == "interrupted" for r in results) else 0
    if ns.command == "export":
        from .export import export_hypernet

        if not cfg.run:
            raise DiffLoRAError("export needs --run (a dit run folder).")
        print(export_hypernet(cfg.run, cfg.out or None, cfg.checkpoint, cfg.ema))
        return 0
    from .dit_trainer import train_dit
    from .lae_trainer import train_lae

    result = (train_lae if ns.command == "lae" else train_dit)(cfg)
    return 0 if result.status == "finished" else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
