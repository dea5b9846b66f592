"""A small, fully generated world where the whole DiffLoRA method can run for real.

It depends on the core (``difflora``) one way: the core, and the ComfyUI nodes over it, never
import this package. What a shipped toy hypernet needs at run time (the encoders its file
carries) is the core's, in ``difflora/encoders/carried.py``.

- ``vocabulary``: the identity and scene attributes.
- ``render``: a procedural face renderer (identities, scenes, captions, data sets).
- ``attributes``: the classifier that reads images back (identity accuracy, prompt accuracy),
  and the one supervised training loop it shares with the encoders.
- ``identity_encoder``: training of the toy "face-recognition" and general image embeddings.
- ``toy_sdxl``, ``train_base``: the SDXL-architecture toy base model and its training.
- ``world``: the resumable world build; ``results``: the measurement.

docs/TOYWORLD.md describes the world, the commands and the measured figures. Nothing is
imported here, so ``python -m difflora_toyworld.<module>`` stays light.
"""
