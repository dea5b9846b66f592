"""Model folders, registered through folder_paths so extra_model_paths.yaml entries work.

The toy world's models ship inside the pack (assets/toyworld, laid out as model folders), so they
are registered as extra paths: the toy hypernet is listed by Load DiffLoRA Hypernet, the toy base
by Load Toy World Base, with nothing to download or copy.
"""

import os
from pathlib import Path

import folder_paths

from .model_files import MissingFile, missing_files_message

HYPERNET_FOLDER = "difflora"
INSIGHTFACE_FOLDER = "insightface"
TOY_BASE_FOLDER = "difflora_toyworld"  # models/difflora_toyworld, and the pack's own toy base
TOY_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "toyworld"
TOY_PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Toy photos are 64 px: their previews are drawn 4x, every pixel a sharp square, as the toy templates
# enlarge their images (the IMAGE output stays the photo itself).
TOY_PHOTO_PREVIEW_SCALE = 4


def register_model_folders() -> None:
    for name in (HYPERNET_FOLDER, INSIGHTFACE_FOLDER, TOY_BASE_FOLDER):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
    # After the user's own folders: a file of the same name there wins.
    folder_paths.add_model_folder_path(HYPERNET_FOLDER, str(TOY_ASSETS / "difflora"))
    folder_paths.add_model_folder_path(TOY_BASE_FOLDER, str(TOY_ASSETS / "checkpoints"))
    # Only .safetensors hypernets are listed: pickles are never loaded from users' folders.
    for name in (HYPERNET_FOLDER, TOY_BASE_FOLDER):
        paths, _ = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, {".safetensors"})


def toy_photos() -> dict[str, Path]:
    """{file name: path} of the held-out toy-world photos the pack ships."""
    folder = TOY_ASSETS / "photos"
    return {p.name: p for p in sorted(folder.glob("*")) if p.suffix.lower() in TOY_PHOTO_SUFFIXES}


def toy_photo_preview(photo):
    """A toy photo (PIL image) as its preview shows it: enlarged TOY_PHOTO_PREVIEW_SCALE times, nearest."""
    from PIL import Image

    k = TOY_PHOTO_PREVIEW_SCALE
    return photo.resize((photo.width * k, photo.height * k), Image.NEAREST)


def model_file_installed(folder: str, name: str) -> bool:
    try:
        return folder_paths.get_full_path(folder, name) is not None
    except KeyError:  # a folder this ComfyUI does not know
        return False


def missing_model_message(folder: str, name: str, node: str) -> str | bool:
    """True when the file is installed, else the sentence saying where it goes and what it is."""
    if model_file_installed(folder, name):
        return True
    return missing_files_message([MissingFile(folder, name, node)])


def insightface_pack_installed(name: str) -> bool:
    folder = os.path.join(insightface_root(), "models", name)
    return os.path.isdir(folder) and any(f.endswith(".onnx") for f in os.listdir(folder))


def insightface_root() -> str:
    """The first registered models/insightface folder; packs live in `<it>/models/<name>/`,
    the layout other identity packs (InstantID, IPAdapter FaceID) use too."""
    return folder_paths.get_folder_paths(INSIGHTFACE_FOLDER)[0]
