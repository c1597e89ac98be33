"""Model folders of this pack, registered the way extra_model_paths.yaml expects.

Paths already registered (by extra_model_paths.yaml or another pack) are kept;
only the default folder is added, and the extension set is fixed to
.safetensors so the combo lists never offer files we would refuse to load.

ComfyUI API this file relies on (the model-folder registry every custom node uses):
`folder_paths.folder_names_and_paths` ({name: ([paths], {extensions})}), `models_dir`,
`get_output_directory()`, `get_folder_paths()`, `get_filename_list()`, `get_full_path()`.
"""
from __future__ import annotations

import os
import re

import folder_paths

from hdb_core.errors import HDBError

LIDB_FOLDER = "lidb"
HYPERNET_FOLDER = "hyperdreambooth"
LORA_SUBFOLDER = "hyperdreambooth"
EXTENSIONS = {".safetensors"}


def lidb_output_dir() -> str:
    return os.path.join(folder_paths.get_output_directory(), LIDB_FOLDER)


def _register(name: str, extra: list[str] = ()) -> None:
    default = os.path.join(folder_paths.models_dir, name)
    paths, _ = folder_paths.folder_names_and_paths.get(name, ([], set()))
    paths = list(paths)
    if default not in paths:
        paths.insert(0, default)
    for p in extra:
        if p not in paths:
            paths.append(p)
    folder_paths.folder_names_and_paths[name] = (paths, set(EXTENSIONS))


def register_folders() -> None:
    # Saved LiDBs (output/lidb) are listed by HDB_LoadLiDB without moving them.
    _register(LIDB_FOLDER, [lidb_output_dir()])
    _register(HYPERNET_FOLDER)


def folder_hint(name: str) -> str:
    paths = folder_paths.get_folder_paths(name)
    return " or ".join(paths) if paths else f"ComfyUI/models/{name}"


def resolve_model_file(folder: str, filename: str, what: str) -> str:
    """Full path of a file picked from a combo; V3 does not validate combo values, so we do."""
    available = folder_paths.get_filename_list(folder)
    if not filename or filename not in available:
        if not available:
            raise HDBError(f"No {what} files found: put a .safetensors {what} file in {folder_hint(folder)} "
                           f"and refresh the page (press R).")
        raise HDBError(f"{what} '{filename}' was not found in {folder_hint(folder)}; pick one of the listed files "
                       f"or copy it there and refresh (press R).")
    path = folder_paths.get_full_path(folder, filename)
    if path is None:
        raise HDBError(f"{what} '{filename}' is listed but could not be opened in {folder_hint(folder)}; "
                       f"check the file's permissions.")
    return path


_COUNTER = re.compile(r"_(\d{5})_\.safetensors$")


def numbered_save_path(base_dir: str, filename_prefix: str) -> tuple[str, str]:
    """(full path, path relative to base_dir) for the next `<prefix>_00001_.safetensors`.

    The prefix may name subfolders but can never leave base_dir: absolute paths,
    drive letters and '..' are refused with an explanation.
    """
    prefix = (filename_prefix or "").strip().replace("\\", "/")
    if not prefix or prefix.endswith("/"):
        raise HDBError("filename_prefix is empty or ends with '/'; give a name such as 'my_face' or 'faces/my_face'.")
    if prefix.startswith("/") or re.match(r"^[A-Za-z]:", prefix) or "\x00" in prefix:
        raise HDBError(f"filename_prefix '{filename_prefix}' is an absolute path; use a name relative to "
                       f"{base_dir}, such as 'my_face' or 'faces/my_face'.")
    parts = prefix.split("/")
    if any(p in ("..", ".", "") for p in parts):
        raise HDBError(f"filename_prefix '{filename_prefix}' contains '..' or an empty folder name; files can only "
                       f"be saved inside {base_dir}.")
    base = os.path.realpath(base_dir)
    folder = os.path.realpath(os.path.join(base, *parts[:-1]))
    if os.path.commonpath([base, folder]) != base:
        raise HDBError(f"filename_prefix '{filename_prefix}' leads outside {base_dir} (through a link); "
                       f"pick another name.")
    stem = parts[-1]
    counter = 1
    if os.path.isdir(folder):
        for f in os.listdir(folder):
            m = _COUNTER.search(f)
            if m and f[: m.start()] == stem:
                counter = max(counter, int(m.group(1)) + 1)
    filename = f"{stem}_{counter:05d}_.safetensors"
    os.makedirs(folder, exist_ok=True)
    full = os.path.join(folder, filename)
    return full, os.path.relpath(full, base)
