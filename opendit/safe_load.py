"""Reading training checkpoints without running code from them, with errors that name the file.

Run folders are shared and downloaded like model files, so nothing read from one may execute. ``torch.load``
takes ``weights_only=True`` everywhere, but torch.distributed.checkpoint (DCP) reads a folder's ``.metadata``
with plain ``pickle.load``, and its default planner reads the non-tensor entries of a state dict (the optimizer's
``param_groups`` values) with ``torch.load(weights_only=False)``: a crafted ``.metadata`` or ``.distcp`` runs what
its pickle names. Here:

- ``.metadata`` is unpickled by an unpickler that resolves only the classes ``dcp.save`` writes there
  (``_METADATA_GLOBALS``, checked against model and optimizer checkpoints of torch 2.13, 1 and 2 ranks);
- non-tensor entries go through ``torch.load(weights_only=True)``, as tensors already do;
- every file the metadata names must be a plain file of the same folder, as long as the metadata says.

Anything else is a :class:`CheckpointError` naming the file, raised before the collective load starts.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint._traverse import set_element


class CheckpointError(ValueError):
    """A checkpoint file that is corrupt, incomplete or unsafe to read; the message names the file."""


# (module, name) pairs a DCP .metadata may name. Everything here only builds data: dataclasses filled by BUILD,
# an Enum looked up by value, torch.Size, a layout looked up by name, paths (StorageMeta.checkpoint_id).
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # torch.layout pickles as _get_layout("torch.strided"): a dict lookup
    "torch": {"Size"},  # and dtypes / layouts / memory formats, checked by type in find_class
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "builtins": {"set", "frozenset"},
    "collections": {"OrderedDict"},
}
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedReader, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_GLOBALS.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS)):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.path}: refuses to unpickle '{module}.{name}' (not checkpoint metadata)")


def read_dcp_metadata(path: str | os.PathLike) -> Metadata:
    """A DCP ``.metadata`` file, unpickled with only checkpoint-metadata classes allowed; the files it names
    must be plain names in its folder."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint metadata ({e.strerror or e})") from None
    except Exception as e:  # truncated or garbled pickles raise anything from EOFError to TypeError
        raise CheckpointError(f"{path}: corrupt checkpoint metadata ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}: not DCP checkpoint metadata (holds a {type(metadata).__name__})")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not isinstance(name, str) or name != Path(name).name \
                or name in ("", ".", "..") or "\\" in name:
            raise CheckpointError(f"{path}: names a data file outside its folder ({name!r})")
        if not (isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0
                and info.length >= 0):
            raise CheckpointError(f"{path}: bad offset/length for {name}")
    return metadata


def check_dcp_folder(folder: str | os.PathLike) -> Metadata:
    """Cheap check of a DCP folder without reading tensors: its ``.metadata`` is safe to read, and every data
    file it names exists and is at least as long as the metadata says (a truncated copy fails here)."""
    folder = Path(folder)
    metadata = read_dcp_metadata(folder / ".metadata")
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, length in sorted(needed.items()):
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {folder / '.metadata'})")
        size = file.stat().st_size
        if size < length:
            raise CheckpointError(f"{file}: truncated ({size} bytes, its metadata needs {length})")
    return metadata


def _short(error: Exception) -> str:
    """weights_only refusals are a page long; the line naming the global is the one that matters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(error).__name__])[0]


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor entries are read with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"refuses to unpickle entry {fqn!r} ({_short(e)})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader that reads ``.metadata`` through :func:`read_dcp_metadata`, and names the data file in
    any error while reading it."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:  # as the parent does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _slice_file(self, file, sinfo: _StorageInfo):
        self._reading = sinfo.relative_path  # the parent reads file by file: this is the one an error is about
        return super()._slice_file(file, sinfo)

    def read_data(self, plan, planner):
        self._reading = "?"
        try:
            return super().read_data(plan, planner)
        except CheckpointError as e:
            raise CheckpointError(f"{Path(self.path) / self._reading}: {e}") from None
        except Exception as e:
            raise CheckpointError(f"{Path(self.path) / self._reading}: corrupt checkpoint data "
                                  f"({type(e).__name__}: {_short(e)})") from None


def load_dcp(state_dict: dict[str, Any], folder: str | os.PathLike, no_dist: bool = False) -> None:
    """``dcp.load`` of ``folder`` into ``state_dict`` (in place) through the safe reader and planner.

    Collective unless ``no_dist``. The folder is checked first on every rank, so a bad file is the same
    CheckpointError everywhere rather than DCP's multi-rank CheckpointException (a BaseException).
    """
    folder = Path(folder)
    check_dcp_folder(folder)
    try:
        dcp.load(state_dict, storage_reader=SafeFileSystemReader(folder), planner=SafeLoadPlanner(),
                 no_dist=no_dist)
    except CheckpointException as e:
        errors = [exc for exc, _ in e.failures.values()]
        first = next((exc for exc in errors if isinstance(exc, CheckpointError)), errors[0] if errors else e)
        if isinstance(first, CheckpointError):
            raise first from None
        raise CheckpointError(f"{folder}: cannot load checkpoint ({type(first).__name__}: {_short(first)})") from None


def check_torch_file(path: str | os.PathLike) -> None:
    """Cheap check that a ``torch.save`` file is whole: torch.save writes a zip archive (the default since
    torch 1.6), whose directory sits at its end, so a truncated copy fails here without reading the tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: corrupt (not a complete torch.save archive; truncated?)")


def load_torch_file(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` onto the CPU; a corrupt or unsafe file is a CheckpointError naming it."""
    path = Path(path)
    check_torch_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refuses to load ({_short(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt ({_short(e)})") from None
