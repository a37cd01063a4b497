"""Weight files are what was written: Meta's checklist.chk (MD5 per file), torch's zip CRCs (naming the damaged
tensor), the safetensors header against the file's size, and every tensor finite. formats.py runs these checks
before it builds a model; errors (`CheckpointError`) name the file and the tensor.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

import files
from errors import UserError

# ----------------------------------------------------------------------------------------------------------------
# Errors


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, corrupt or does not match the model it should build: the message names the file
    (and the tensor or keys)."""


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (offset {e.start}): not a JSON file") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


# ----------------------------------------------------------------------------------------------------------------
# Integrity: every file is what was written, every tensor finite (errors name the file and the tensor)


CHECKLIST = "checklist.chk"  # Meta ships one beside its weights: `<md5>  <file name>` per line


def write_checklist(path: str | os.PathLike) -> Path:
    """Write Meta's checklist.chk (MD5 of every other file in the directory)."""
    path = Path(path)
    names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != CHECKLIST)
    return files.atomic_write_text(path / CHECKLIST, "".join(f"{files.md5(path / n)}  {n}\n" for n in names))


def verify_checklist(path: str | os.PathLike) -> bool:
    """Check every file listed in `path/checklist.chk` against its MD5; False when there is no checklist."""
    path = Path(path)
    chk = path / CHECKLIST
    if not chk.is_file():
        return False
    for lineno, line in enumerate(chk.read_text().splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{32})\s+\*?(.+?)\s*", line)
        if m is None:
            raise CheckpointError(f"{chk}:{lineno}: expected '<md5>  <file name>', got {line!r}")
        want, f = m.group(1).lower(), path / m.group(2)
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in {chk} but missing: copy or download it again")
        if files.md5(f) != want:
            if zipfile.is_zipfile(f):
                check_torch_zip(f)  # names the damaged tensor when it can
            raise CheckpointError(
                f"{f}: MD5 {files.md5(f)} does not match {want} in {chk}: the file is corrupted or incomplete; "
                "copy or download it again (if you changed it on purpose, update or delete the checklist)"
            )
    return True


def _storage_owners(zf: zipfile.ZipFile, pkl: str) -> dict[str, list[str]]:
    """Storage record key -> names of the tensors stored in it, read from data.pkl without loading any tensor."""

    class Names(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            return lambda storage=None, *a, **k: storage  # _rebuild_tensor_v2(storage, ...) -> its record key

        def persistent_load(self, pid: Any) -> Any:
            return str(pid[2])  # ('storage', storage type, key, location, numel)

    try:
        sd = Names(io.BytesIO(zf.read(pkl))).load()
    except Exception:  # an unusual pickle: the error then names the record only
        return {}
    owners: dict[str, list[str]] = {}
    for name, key in sd.items() if isinstance(sd, dict) else ():
        owners.setdefault(str(key), []).append(str(name))
    return owners


def check_torch_zip(wfile: Path) -> None:
    """torch.save writes a zip archive with a CRC-32 per record: check the archive and every record's CRC (torch
    itself checks neither, so a damaged file would otherwise load garbage)."""
    try:
        zf = zipfile.ZipFile(wfile)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{wfile}: not a readable torch checkpoint ({e}): the file is truncated or corrupted (torch.save's zip "
            "format was expected); copy or download it again"
        ) from None
    with zf:
        for info in zf.infolist():
            try:
                with zf.open(info) as f:
                    while f.read(1 << 24):
                        pass
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                prefix, _, rel = info.filename.partition("/data/")
                names = _storage_owners(zf, f"{prefix}/data.pkl").get(rel, []) if rel else []
                what = f" (tensor {', '.join(names)})" if names else ""
                raise CheckpointError(
                    f"{wfile}: record {info.filename}{what} is corrupted ({e}); copy or download the file again"
                ) from None


def torch_load(wfile: Path) -> dict[str, Tensor]:
    try:
        sd = torch.load(wfile, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch's zip/mmap/unpickling errors: name the file
        raise CheckpointError(f"{wfile}: cannot be read by torch.load ({str(e).splitlines()[0]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{wfile}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    return sd


def _check_safetensors(f: Path) -> None:
    """The safetensors header is sane and describes exactly the bytes in the file (truncation, garbage)."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, 100 << 20):
            raise CheckpointError(f"{f}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            raise CheckpointError(f"{f}: corrupted safetensors header ({e})") from None
    end = 0
    for name, t in header.items() if isinstance(header, dict) else [("?", None)]:
        if name == "__metadata__":
            continue
        try:
            begin, stop = t["data_offsets"]
            numel = math.prod(t["shape"])
            item = _ST_BYTES[t["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{f}: corrupted safetensors header entry for tensor {name!r}: {t!r}"
            ) from None
        if not 0 <= begin <= stop or stop - begin != numel * item:
            raise CheckpointError(
                f"{f}: tensor {name!r}: offsets {begin}..{stop} do not fit shape {t['shape']}"
            )
        end = max(end, stop)
    if 8 + n + end != size:
        raise CheckpointError(
            f"{f}: the header describes {8 + n + end} bytes but the file has {size}: truncated or corrupted; "
            "copy or download it again"
        )


_ST_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_ST_BYTES |= {"U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def load_safetensors(f: Path) -> dict[str, Tensor]:
    if not f.is_file():
        raise CheckpointError(f"missing {f}")
    _check_safetensors(f)
    try:
        sd = load_file(str(f))
    except Exception as e:
        raise CheckpointError(f"{f}: cannot be read by safetensors ({e})") from None
    check_finite(sd, str(f))
    return sd


def check_finite(sd: dict[str, Tensor], source: str) -> None:
    for name, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"{source}: tensor {name!r} has {bad} non-finite value(s) (NaN/Inf) of {t.numel()}: the checkpoint "
                "is corrupted or was saved from a diverged run"
            )
