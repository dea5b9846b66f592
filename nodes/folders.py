"""Model folders, registered through folder_paths so extra_model_paths.yaml entries work."""

import os

import folder_paths

HYPERNET_FOLDER = "difflora"
INSIGHTFACE_FOLDER = "insightface"


def register_model_folders() -> None:
    for name in (HYPERNET_FOLDER, INSIGHTFACE_FOLDER):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
    # Only .safetensors hypernets are listed: pickles are never loaded from users' folders.
    paths, _ = folder_paths.folder_names_and_paths[HYPERNET_FOLDER]
    folder_paths.folder_names_and_paths[HYPERNET_FOLDER] = (paths, {".safetensors"})


def insightface_root() -> str:
    """The first registered models/insightface folder; packs live in `<it>/models/<name>/`,
    the layout other identity packs (InstantID, IPAdapter FaceID) use too."""
    return folder_paths.get_folder_paths(INSIGHTFACE_FOLDER)[0]
