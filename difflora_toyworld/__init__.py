"""A small, fully generated world where the whole DiffLoRA method can run for real.

It depends on the core (``difflora``) one way: the core never imports this package, and of the
ComfyUI nodes only nodes/toy_world.py does. Importing it fills the core's open registries
(``plugin``): the encoders a toy hypernet file carries, the ``toy-face`` face analysis, the toy
LAE / DiT sizes. Headless, the core imports it by its entry point when a lookup needs it.

- ``encoders``: the toy face / image embedding nets and the toy face detector.
- ``sizes``: the toy LAE / DiT sizes.
- ``vocabulary``: the identity and scene attributes.
- ``render``: a procedural face renderer (identities, scenes, captions, data sets).
- ``attributes``: the classifier that reads images back (identity accuracy, prompt accuracy),
  and the one supervised training loop it shares with the encoders.
- ``identity_encoder``: training of the toy "face-recognition" and general image embeddings.
- ``toy_sdxl``, ``train_base``: the SDXL-architecture toy base model and its training.
- ``world``: the resumable world build; ``results``: the measurement.

docs/TOYWORLD.md describes the world, the commands and the measured figures.
"""

from .plugin import register

register()
