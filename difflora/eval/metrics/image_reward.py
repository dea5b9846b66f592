"""ImageReward (text-image human-preference score), when its package and weights are present.

Not installed here: the `image-reward` package needs `ImageReward.pt`, its `med_config.json` and
the bert-base-uncased tokenizer in the Hugging Face cache; any of them missing -> skipped.
"""

from __future__ import annotations

from pathlib import Path

from . import MetricUnavailable, pick_device

NEEDS = ("the image-reward package (pip install image-reward), ImageReward.pt given with --image-reward "
         "and med_config.json beside it (plus bert-base-uncased in the Hugging Face cache)")


class ImageRewardScorer:
    def __init__(self, model):
        self.model = model
        self.name = "ImageReward-v1.0"

    @classmethod
    def load(cls, path: str | Path | None, device: str | None = None) -> "ImageRewardScorer":
        try:
            import ImageReward as RM
        except ImportError:
            raise MetricUnavailable("ImageReward", f"package not installed; needs {NEEDS}") from None
        if not path or not Path(path).is_file() or not (Path(path).parent / "med_config.json").is_file():
            raise MetricUnavailable("ImageReward", f"weights not found; needs {NEEDS}")
        try:
            model = RM.load(str(path), device=str(pick_device(device)),
                            med_config=str(Path(path).parent / "med_config.json"))
        except Exception as e:  # the package raises assorted errors when offline files are missing
            raise MetricUnavailable("ImageReward", f"cannot load ({str(e)[:200]}); needs {NEEDS}") from None
        return cls(model)

    def scores(self, prompt: str, paths: list[Path]) -> list[float]:
        out = self.model.score(prompt, [str(p) for p in paths])
        return [float(out)] if not isinstance(out, list) else [float(s) for s in out]
