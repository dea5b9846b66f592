"""Headless training of a DiffLoRA hypernet: identity photos -> identity LoRAs -> LAE -> DiT -> file.

`python -m difflora.train --help` lists the stages; docs/TRAINING.md describes the data set
and the multi-GPU commands. The Python API mirrors the CLI, one function a stage taking its
dataclass config:

    from difflora.train.identity_loras import train_identity_loras   # IdentityLoraConfig
    from difflora.train.lae_trainer import train_lae                 # LAETrainConfig
    from difflora.train.dit_trainer import train_dit                 # DiTTrainConfig
    from difflora.train.export import export_hypernet

Nothing heavy is imported here, so `--help` stays quick.
"""
