"""A small, fully generated world where the whole DiffLoRA method can run for real (issue 7).

- ``render``: a procedural face renderer (identities, scenes, captions, data sets).
- ``attributes``: the attribute vocabulary and the classifier that reads images back
  (identity accuracy, prompt accuracy).
- ``identity_encoder``: the toy "face-recognition" and general image embeddings behind
  difflora.encoders' FaceEncoder / ImageEncoder interface.

docs/TOYWORLD.md describes the world, the commands and the measured figures. Nothing is
imported here, so ``python -m difflora_toyworld.<module>`` stays light.
"""
