"""Generic file I/O, below every other module: atomic writes, safetensors headers, shards, checksums.

Every file secateurs writes is whole or absent: it is written under a temporary name unique to the
process, flushed to disk, then renamed into place. A model directory is filled in a temporary
sibling and renamed as a whole. Each directory we write lists the sha256 of its safetensors files
in `checksums.sha256` (the format `sha256sum -c` reads), verified when the directory is loaded.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch

from secateurs.errors import FormatError, SecateursError

INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKSUMS_FILE = "checksums.sha256"
COMPRESSION_KEY = "secateurs_compression"  # config.json's record of compressed layers (secateurs.formats)
VERIFY_ENV = "SECATEURS_VERIFY"  # "0" skips checksum verification on load

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


def shard_name(number: int, total: int) -> str:
    """transformers' shard naming: model-00001-of-00003.safetensors."""
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def temporary_sibling(path: Path) -> Path:
    """A name next to `path` that no other process (or earlier attempt) uses."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_directory(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def apply_umask(path: Path, directory: bool = False) -> None:
    """Give a file made by mkstemp-like calls the mode the user's umask asks for, as open() would."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


def replace_atomically(path: Path, write) -> None:
    """`write(staging_path)` fills a temporary sibling; it is flushed and renamed onto `path`."""
    path = Path(path)
    staging = temporary_sibling(path)
    try:
        write(staging)
        apply_umask(staging)  # safetensors creates its files 0600
        fsync_file(staging)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_text(path: Path, text: str) -> None:
    replace_atomically(path, lambda staging: staging.write_text(text, encoding="utf-8"))


def read_json_object(path: Path, missing: str) -> dict:
    """The JSON object in file `path`: SecateursError(`missing`) when there is no such file,
    FormatError naming the file when it is unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SecateursError(missing) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: not a JSON object")
    return data


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file atomically; returns its sha256 (read back from the page cache, so it
    also covers what reached the file)."""
    from safetensors.torch import save_file

    replace_atomically(path, lambda staging: save_file(tensors, staging, metadata={"format": "pt"} | (metadata or {})))
    return file_sha256(path)


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (no pickle); FormatError naming the file when it is missing or
    unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except FileNotFoundError:
        raise FormatError(f"{file}: missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # truncated or garbled header
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FormatError(f"{file}: not a readable safetensors file ({detail})") from None


@contextmanager
def atomic_directory(target: Path):
    """Yield a temporary sibling of `target` to fill; on success it replaces `target` in one rename
    (an existing `target` is moved aside first and deleted last), on failure it is removed and
    `target` is left as it was."""
    target = Path(target)
    check_writable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_sibling(target)
    staging.mkdir()  # not mkdtemp: its mode 0700 would leave the saved model unreadable to others
    try:
        yield staging
        for path in staging.iterdir():
            if path.is_file():
                apply_umask(path)  # safetensors creates its files 0600
                fsync_file(path)
        replace_directory(staging, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(exc):
            raise SecateursError(f"disk full while writing {target}; nothing was written") from None
        raise


def replace_directory(source: Path, target: Path) -> None:
    """Rename `source` to `target`; a directory already at `target` is moved aside first and deleted
    last, so a crash leaves either the old or the new one in place."""
    aside = None
    if target.is_dir() and not target.is_symlink():
        aside = temporary_sibling(target)
        os.replace(target, aside)
    elif target.exists() or target.is_symlink():
        target.unlink()
    os.replace(source, target)
    fsync_directory(target.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def read_header(path: Path) -> dict:
    """A safetensors file's header {name: {dtype, shape, data_offsets}} without reading any data;
    FormatError naming the file when it is not one."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            raw = handle.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than a header")
            (length,) = struct.unpack("<Q", raw)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {length} exceeds the file")
            header = json.loads(handle.read(length))
    except FileNotFoundError:
        raise FormatError(f"{path}: missing") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: not a readable safetensors file (header is not a mapping)")
    header.pop("__metadata__", None)
    return header


def tensor_layout(path: Path, name: str, entry) -> tuple[torch.Size, torch.dtype]:
    if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
        raise FormatError(f"{path}: tensor {name} has an unsupported or missing dtype")
    return torch.Size(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]]


def index_shards(folder: Path) -> dict[str, Path] | None:
    """Tensor name -> shard file, from the directory's model.safetensors.index.json (None without
    one). FormatError unless the index is readable and names present files of this directory."""
    index = Path(folder) / INDEX_FILE
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{index}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(shard, str) and shard.endswith(".safetensors") and Path(shard).name == shard
            for shard in weight_map.values()):
        raise FormatError(f"{index}: weight_map must map tensor names to shard files of this directory")
    for shard in sorted(set(weight_map.values())):
        if not (Path(folder) / shard).is_file():
            raise FormatError(f"{Path(folder) / shard}: missing (the index names it)")
    return {name: Path(folder) / shard for name, shard in weight_map.items()}


def write_index(folder: Path, weight_map: dict[str, str]) -> None:
    """model.safetensors.index.json for shards already in `folder` (total_size from their headers)."""
    total = 0
    for shard in sorted(set(weight_map.values())):
        header = read_header(Path(folder) / shard)
        total += sum(entry["data_offsets"][1] - entry["data_offsets"][0] for entry in header.values())
    write_json(Path(folder) / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files a model directory's weights are in (its index's shards, or the one file)."""
    files = index_shards(folder)
    if files is not None:
        return sorted(set(files.values()))
    shards = sorted(Path(folder).glob("*.safetensors"))
    if len(shards) != 1:
        raise SecateursError(f"{folder}: {len(shards)} safetensors files and no {INDEX_FILE}")
    return shards


def dominant_float_dtype(layouts: Iterable[tuple[torch.Size, torch.dtype]]) -> torch.dtype | None:
    """The floating dtype holding the most bytes among (shape, dtype) pairs; None without floats."""
    counts: dict[torch.dtype, int] = {}
    for shape, dtype in layouts:
        if dtype.is_floating_point:
            counts[dtype] = counts.get(dtype, 0) + shape.numel() * dtype.itemsize
    return max(counts, key=counts.get) if counts else None


class SafetensorsFolder:
    """The tensors of a model directory (one safetensors file, or shards with an index), read on
    demand; every read opens the shards it needs and closes them again (pread, no memory map)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        files = index_shards(self.folder)
        if files is None:
            (single,) = weight_files(self.folder)
            files = dict.fromkeys(read_header(single), single)
        self.files = files
        self.headers = {path: read_header(path) for path in sorted(set(files.values()))}
        for name, path in files.items():
            if name not in self.headers[path]:
                raise FormatError(f"tensor {name}: the index puts it in {path.name}, which does not hold it")

    def layout(self, name: str) -> tuple[torch.Size, torch.dtype]:
        return tensor_layout(self.files[name], name, self.headers[self.files[name]][name])

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for path, wanted in by_file.items():
            with safe_open(path, "pt", backend="pread") as handle:
                tensors.update({name: handle.get_tensor(name) for name in wanted})
        return tensors

    def float_dtype(self) -> torch.dtype:
        """The floating dtype the weights are stored in (the most common one, by bytes)."""
        dtype = dominant_float_dtype(map(self.layout, self.files))
        if dtype is None:
            raise SecateursError(f"{self.folder}: no floating-point weights")
        return dtype

    def fingerprint(self, sampled_reads: int = 16) -> str:
        """Every header, and evenly spaced 64 KiB samples of every shard's bytes (hashing whole shards
        of a large model would take minutes)."""
        digest = hashlib.sha256()
        for path, header in self.headers.items():
            digest.update(json.dumps(header, sort_keys=True).encode())
            size = path.stat().st_size
            with open(path, "rb") as handle:
                for step in range(sampled_reads):
                    handle.seek(size * step // sampled_reads)
                    digest.update(handle.read(1 << 16))
        return digest.hexdigest()[:16]


# --- writing where the user asked ---------------------------------------------------------------

def existing_parent(output: Path) -> Path:
    """The nearest existing folder above `output` (where it will be created)."""
    where = Path(output).absolute().parent
    while not where.exists():
        where = where.parent
    return where


def check_writable(output: Path, directory: bool = True) -> None:
    """One line, before any work, when `output` cannot be created: its nearest existing parent is not
    a writable directory (read-only filesystem, permissions), or `output` exists as the other kind
    (a file where a directory is written, or a directory where a file is; an existing file of a
    file output is replaced)."""
    output = Path(output)
    if directory and output.exists() and not output.is_dir():
        raise SecateursError(f"output {output} is a file, not a directory")
    if not directory and output.is_dir():
        raise SecateursError(f"output {output} is a directory, not a file")
    where = existing_parent(output)
    if not where.is_dir():
        raise SecateursError(f"cannot write {output}: {where} is not a directory")
    probe = temporary_sibling(where / "probe")
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise SecateursError(f"cannot write {output}: {where} is not writable ({exc.strerror})") from None


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error (OSError, or safetensors' error carrying the OS code) means no space left."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return "No space left" in text or "StorageFull" in text or "code: 28," in text


class OutputLock:
    """An exclusive lock on `<output>.lock` beside the output, held for a whole run, so two runs can
    never write one output; the file holds the holder's pid and is removed on release."""

    def __init__(self, output: Path):
        output = Path(output)
        self.path = output.with_name(output.name + ".lock")
        self.handle: int | None = None

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(handle, 32).decode(errors="replace").strip() or "unknown"
                os.close(handle)
                raise SecateursError(f"{self.path.with_suffix('')} is being written by another run (pid {holder}, "
                                     f"lock {self.path})") from None
            # The holder before us may have removed the file after we opened it: lock the live one.
            try:
                same = os.fstat(handle).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(handle)
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.handle)
        self.handle = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --- checksums ---------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path, known: dict[str, str] | None = None) -> None:
    """checksums.sha256 for every safetensors file of `folder` (`known`: digests already computed
    when the files were written, by file name)."""
    folder = Path(folder)
    known = dict(known or {})
    lines = []
    for path in sorted(folder.glob("*.safetensors")):
        digest = known.get(path.name) or file_sha256(path)
        lines.append(f"{digest}  {path.name}\n")
    write_text(folder / CHECKSUMS_FILE, "".join(lines))


def verification_enabled(verify: bool | None = None) -> bool:
    if verify is not None:
        return verify
    return os.environ.get(VERIFY_ENV, "1") not in ("0", "false", "no")


def verify_checksums(folder: Path, verify: bool | None = None) -> None:
    """Check every file listed in the directory's checksums.sha256 (a directory without one, written
    by another tool, is not checked); FormatError naming the first damaged shard."""
    folder = Path(folder)
    listing = folder / CHECKSUMS_FILE
    if not verification_enabled(verify) or not listing.is_file():
        return
    try:
        entries = [line.split(None, 1) for line in listing.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{listing}: unreadable ({exc})") from None
    for entry in entries:
        if len(entry) != 2 or len(entry[0]) != 64 or Path(entry[1].strip()).name != entry[1].strip():
            raise FormatError(f"{listing}: malformed line {' '.join(entry)!r}")
        digest, name = entry[0], entry[1].strip()
        path = folder / name
        if not path.is_file():
            raise FormatError(f"{path}: missing ({CHECKSUMS_FILE} lists it)")
        if file_sha256(path) != digest:
            raise FormatError(f"{path}: damaged (its sha256 differs from {CHECKSUMS_FILE}; "
                              f"{VERIFY_ENV}=0 loads it anyway)")


def cache_dir() -> Path:
    """Where secateurs keeps converted models, task data and benchmark state ($SECATEURS_CACHE)."""
    return Path(os.environ.get("SECATEURS_CACHE", Path.home() / ".cache" / "secateurs"))
