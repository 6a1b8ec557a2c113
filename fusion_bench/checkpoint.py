"""Lazy, validated access to checkpoint files.

A :class:`LazyStateDict` is a read-only ``Mapping[str, Tensor]`` over one or more checkpoint files.
Nothing is read when it is opened except the headers; each tensor is read when its key is looked
up and forgotten by the mapping afterwards. Merge functions iterate key by key over such mappings,
so a merge of N experts holds O(1) tensors per expert instead of N whole models.

Formats:
- safetensors (preferred): the header parsed once, each tensor read by one positioned read.
- torch pickles (``.pt``/``.bin``): loaded with ``weights_only=True`` and ``mmap=True`` (the zip
  format is mapped, not read). A file that needs full unpickling (e.g. a pickled ``nn.Module`` from
  the task_vectors code) is refused unless the user opts in with ``allow_unsafe_pickle``, because
  unpickling executes code from the file.

Every user-facing failure is a :class:`~fusion_bench.errors.FusionBenchError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import struct
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError

SAFETENSORS_SUFFIXES = (".safetensors",)
# All stored keys of one file -> {stored key: canonical key} for the entries to keep. A function of
# the whole key list because some layouts can only be told apart by looking at all keys.
KeyMap = Callable[[Sequence[str]], Mapping[str, str]]


def identity_keys(keys: Sequence[str]) -> dict[str, str]:
    return {k: k for k in keys}


# safetensors dtype names -> torch dtypes, for the positioned reads below.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _SafetensorsFile:
    """One safetensors file: validated by the safetensors library once, then each tensor read
    with one positioned read (``os.preadv``) into a fresh tensor.

    Why not ``safe_open(...).get_tensor`` per read: a handle kept open maps the file, and every
    page a merge touches stays in the process's RSS, so peak RSS would grow with every expert read
    (measured: +8 MB per 8 MB expert); a fresh handle per read re-parses the JSON header each time
    (0.4 ms per tensor, measured: 0.7 s per pass over 8 ViT-B/32 experts). The file format is a
    little-endian u64 header length, a JSON header with dtype/shape/byte offsets, then raw bytes,
    so a positioned read is all a tensor needs. Dtypes outside the table (e.g. float8) fall back
    to the library's reader.
    """

    def __init__(self, path: Path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                self._keys = list(handle.keys())
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
        except Exception as e:  # SafetensorError and OSError have no common base worth naming
            raise FusionBenchError(
                f"Cannot read checkpoint '{path}': {e}. The file is corrupted or truncated; "
                "re-download or re-save it."
            ) from None
        self.path = path
        self._data_start = 8 + header_len
        self._entries = {k: v for k, v in header.items() if k != "__metadata__"}

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def get(self, key: str) -> Tensor:
        entry = self._entries[key]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None or sys.byteorder != "little":
            return self._get_with_library(key)
        begin, end = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=dtype)
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        if len(buffer) != end - begin:
            raise self._error(key, f"header says {end - begin} bytes for {len(buffer)}")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < len(buffer):
                n = os.preadv(fd, [buffer[done:]], self._data_start + begin + done)
                if n == 0:
                    raise self._error(key, "unexpected end of file")
                done += n
        except OSError as e:
            raise self._error(key, str(e)) from None
        finally:
            os.close(fd)
        return out

    def _get_with_library(self, key: str) -> Tensor:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                return handle.get_tensor(key)
        except Exception as e:
            raise self._error(key, str(e)) from None

    def _error(self, key: str, reason: str) -> FusionBenchError:
        return FusionBenchError(
            f"Cannot read tensor '{key}' from '{self.path}': {reason}. The file is corrupted or "
            "truncated; re-download or re-save it."
        )


class _TorchFile:
    """A torch pickle, opened with weights_only (and memory-mapped when the format allows)."""

    def __init__(self, path: Path, allow_unsafe_pickle: bool):
        self.path = path
        obj = _torch_load(path, allow_unsafe_pickle)
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
        if (
            isinstance(obj, Mapping)
            and "state_dict" in obj
            and isinstance(obj["state_dict"], Mapping)
        ):
            obj = obj["state_dict"]  # training checkpoints wrap the weights
        if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise FusionBenchError(
                f"'{path}' does not contain a state dict (found {type(obj).__name__}). Save the "
                "model's `state_dict()` (ideally with safetensors) and point the pool at that file."
            )
        self._sd = dict(obj)

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def get(self, key: str) -> Tensor:
        return self._sd[key]


def _torch_load(path: Path, allow_unsafe_pickle: bool):
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) format cannot be mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needed = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if needed is None:  # not an object the safe loader refused: bytes that are no pickle
            raise FusionBenchError(
                f"Cannot read checkpoint '{path}': it is not a torch checkpoint "
                f"({_unpickler_reason(str(e))}). The file is corrupted or truncated, or not a model file; "
                "re-download or re-save it."
            ) from None
        if not allow_unsafe_pickle:
            raise FusionBenchError(
                f"'{path}' is not a plain state dict: it pickles a Python object "
                f"({needed.group(1)}), and loading that needs full unpickling, which can execute "
                "code from the file. If you trust the file, set `allow_unsafe_pickle: true` on "
                "the model pool; better, convert it once to a safetensors state dict."
            ) from None
    except Exception as e:
        raise FusionBenchError(
            f"Cannot read checkpoint '{path}': {type(e).__name__}: {_plain(str(e))}. The file is "
            "corrupted, truncated or not a torch checkpoint; re-download or re-save it."
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise FusionBenchError(
            f"Cannot unpickle '{path}': {type(e).__name__}: {e}. Convert it to a safetensors "
            "state dict in the environment that wrote it."
        ) from None


def _plain(message: str) -> str:
    """``message`` without terminal escape codes, on one line, at most ~200 characters: torch's
    loader errors are long, bold-faced and mostly advice that does not apply here."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", message).splitlines()]
    text = " ".join(ln for ln in lines if ln)
    return text if len(text) <= 200 else text[:197] + "..."


def _unpickler_reason(message: str) -> str:
    """The reason in torch's safe-loader error ('Unsupported operand 105'), not its advice."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", message, re.S)
    return _plain(found.group(1) if found else message)


def _open_file(path: Path, allow_unsafe_pickle: bool):
    if path.is_dir():
        raise FusionBenchError(
            f"'{path}' is a directory, but this model pool reads one checkpoint file per model "
            "(e.g. 'model.pt' or 'model.safetensors'): point it at the file inside."
        )
    if not path.is_file():
        raise FusionBenchError(
            f"Checkpoint file '{path}' does not exist. Check the path in the model pool config."
        )
    if path.suffix in SAFETENSORS_SUFFIXES:
        return _SafetensorsFile(path)
    return _TorchFile(path, allow_unsafe_pickle)


class LazyStateDict(Mapping[str, Tensor]):
    """Read-only mapping from canonical keys to tensors, read from disk on each lookup.

    ``key_map`` renames stored keys to the pool's canonical layout (or drops them by returning
    None), so checkpoints written by different libraries or library versions look the same to
    merge code. With ``check_finite`` every floating tensor is checked for NaN/Inf as it is read.
    """

    def __init__(
        self,
        files: list[Path],
        key_map: KeyMap = identity_keys,
        allow_unsafe_pickle: bool = False,
        check_finite: bool = True,
        name: str | None = None,
    ):
        if not files:
            raise FusionBenchError(f"No checkpoint files given for '{name}'.")
        self.name = name or str(files[0])
        self.files = [Path(f) for f in files]
        self.check_finite = check_finite
        self._index: dict[str, tuple[object, str]] = {}
        self._checked: set[str] = set()  # keys already found finite
        for f in self.files:
            handle = _open_file(f, allow_unsafe_pickle)
            for stored, canonical in key_map(handle.keys()).items():
                self._index[canonical] = (handle, stored)
        if not self._index:
            raise FusionBenchError(
                f"Checkpoint '{self.name}' has no tensors with the expected key layout. Is it a "
                "checkpoint of the right model family (Hugging Face CLIP vs open_clip)?"
            )

    def __getitem__(self, key: str) -> Tensor:
        handle, stored = self._index[key]
        tensor = handle.get(stored)
        if self.check_finite and key not in self._checked and tensor.is_floating_point():
            self._check_finite(key, tensor)
        return tensor

    def _check_finite(self, key: str, tensor: Tensor) -> None:
        # A NaN or Inf anywhere makes the float32 sum non-finite, so the cheap sum decides; only
        # a non-finite sum (NaN/Inf, or a float32 overflow of huge values) needs the exact test.
        # Each key is checked once: multi-pass methods (TIES) read the same tensor several times.
        total = tensor.sum(dtype=torch.float32).item()
        if not math.isfinite(total) and not torch.isfinite(tensor).all():
            raise FusionBenchError(
                f"Tensor '{key}' of checkpoint '{self.name}' contains NaN or Inf values. The "
                "checkpoint is corrupted or its fine-tuning diverged; re-export it or remove it "
                "from the model pool."
            )
        self._checked.add(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._index

    def shape(self, key: str) -> tuple[int, ...]:
        handle, stored = self._index[key]
        return handle.shape(stored)

    def num_parameters(self) -> int:
        total = 0
        for key in self:
            n = 1
            for d in self.shape(key):
                n *= d
            total += n
        return total

    def __repr__(self) -> str:
        return f"LazyStateDict({self.name!r}, {len(self)} tensors)"


def find_weight_files(directory: Path) -> list[Path]:
    """The weight files of a ``save_pretrained`` directory, safetensors first, shards resolved."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [directory / s for s in shards]
        if (directory / single).is_file():
            return [directory / single]
    raise FusionBenchError(
        f"'{directory}' holds no model weights (model.safetensors or pytorch_model.bin). Point "
        "the pool at a directory written by `save_pretrained`."
    )


def files_fingerprint(files: list[Path]) -> str:
    """Identity of files for cache keys: resolved path, size and modification time of each."""
    parts = []
    for f in files:
        st = os.stat(f)
        parts.append(f"{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def save_safetensors(
    state_dict: Mapping[str, Tensor], path: Path, metadata: dict[str, str], exclusive: bool = False
) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    write_atomically(
        Path(path), lambda tmp: save_file(tensors, str(tmp), metadata), exclusive=exclusive
    )


# -- atomic outputs ---------------------------------------------------------------------------------
def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def ordinary_mode() -> int:
    """0666 less the process umask: the mode of a file created the ordinary way."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: Path, write, exclusive: bool = False) -> None:
    """``write(tmp_path)`` then rename onto ``path``: a reader never sees a half-written file,
    and a failure (full disk, kill) leaves ``path`` as it was and no stray temporary file (one
    left by a killed process is named ``.<name>.partial-<pid>`` and removed by the next write).
    The file gets the ordinary mode (0666 less the umask). ``exclusive``: never replace an
    existing ``path`` (``FileExistsError``), even one created by another process meanwhile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _partial(path)
    try:
        write(tmp)
        os.chmod(tmp, ordinary_mode())
        if exclusive:
            os.link(tmp, path)  # atomic, and fails if the path exists
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: Path) -> None:
    """Remove what killed writers of ``path`` left beside it: ``.<name>.partial-<pid>`` (a file
    or a model directory being written) and ``.<name>.replaced-<pid>`` (the previous output being
    swapped out), for every pid that is no longer running. A live writer's are left alone."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for pattern in (f".{path.name}.partial-*", f".{path.name}.replaced-*"):
        for stale in path.parent.glob(pattern):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and _alive(int(pid)):
                continue
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, left by an earlier failed write in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_writable(directory: Path, what: str, fix: str) -> None:
    """Fail before any work if files cannot be created in ``directory`` (made if missing)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".fusion_bench-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FusionBenchError(
            f"Cannot write {what} in '{directory}' ({e.strerror or e}). {fix}"
        ) from None
