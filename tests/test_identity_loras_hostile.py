"""identity-loras on a careless data folder (issue 27): one identity folder that cannot be read is
skipped and reported, as unreadable photos are, and every other identity trains."""

from __future__ import annotations

import errno
import json
import pathlib

from difflora.train.config import IdentityLoraConfig
from difflora.train.identity_loras import train_identity_loras
from tests.support.train_data import SAME_PERSON, make_identities, tiny_base, tiny_clip


def test_an_unreadable_identity_folder_is_skipped_and_the_others_train(tmp_path, tmp_path_factory, monkeypatch):
    data = make_identities(tmp_path / "ids", {"ann": 0, "ben": 1}, per_person=2)
    # What listing a `chmod 000` folder raises for a user other than root (the tests may run as root).
    listing = pathlib.Path.iterdir

    def iterdir(self):
        if self == data / "ben":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return listing(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", iterdir)
    cfg = IdentityLoraConfig(data=str(data), out=str(tmp_path / "loras"), base=str(tiny_base(tmp_path_factory)),
                             face_encoder="dlib", image_encoder=str(tiny_clip(tmp_path_factory)), steps=1,
                             resolution=64, min_images=2, min_face_similarity=SAME_PERSON, progress=False)
    results = {r.name: r for r in train_identity_loras(cfg)}
    assert {n: r.status for n, r in results.items()} == {"ann": "trained", "ben": "skipped"}
    assert "could not be read (Permission denied" in results["ben"].reason
    assert "fix its permissions or move it out of --data" in results["ben"].reason
    assert (tmp_path / "loras" / "ann.safetensors").is_file()
    report = json.loads((tmp_path / "loras" / "report.json").read_text())
    assert [(r["name"], r["status"]) for r in report["identities"]] == [("ann", "trained"), ("ben", "skipped")]
