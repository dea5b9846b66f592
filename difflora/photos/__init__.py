"""Photo generation: more photos of people who have few, for training (`python -m difflora.train augment`).

- ``augment``: the resumable loop over identity folders; each kept photo passes the face filter
  (difflora/train/identity_filter.py) against the person's reference photo.
- ``generators``: the photo generators behind one interface: a workflow on the user's running
  ComfyUI (``comfy_client``, its HTTP API, stdlib only), or SDXL + IP-Adapter FaceID in process
  (``faceid_generator``, diffusers).

Nothing heavy is imported here.
"""
