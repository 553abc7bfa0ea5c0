"""Read R data out of an R lazy-load database (``Rdata.rdb`` + ``Rdata.rdx``) without R.

An ``.rdb`` file is a sequence of records, each a 4-byte big-endian field holding the *uncompressed*
size followed by the compressed serialization: a zlib stream (R's default), or, for databases built
with xz or bzip2 compression (``compressed`` 3 or 2 in the index), a type byte ('Z' raw LZMA2, '2'
bzip2, '0' stored) and then the data. The ``.rdx`` index is a gzip-compressed serialization of a
list whose ``variables`` map each object's name to (offset, length) in the ``.rdb``.

Each record is an R XDR serialization (format "X", version 2 or 3). `unserialize` decodes the
shapes R data sets are made of: NULL, logical / integer / double / character vectors, lists
(generic vectors), pairlists with tags, symbols and references to them, and the ALTREP compact
sequences and wrappers R 3.5+ writes; attributes are kept. `data_frame` turns a data.frame (tibbles
included) into {column: list}, factors into their level strings.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from secateurs.errors import SecateursError

# SEXP types
_NILSXP, _SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
# pseudo-types of the serialization
_ALTREP, _EMPTYENV, _BASEENV, _GLOBALENV, _UNBOUNDVALUE, _MISSINGARG, _BASENAMESPACE = 238, 242, 241, 253, 252, 251, 247
_NILVALUE, _REFSXP = 254, 255
_NA_STRING_LENGTH = -1
_NA_INTEGER = -(2**31)
_LATIN1_FLAG = 1 << (12 + 2)  # LATIN1_MASK among a CHARSXP's encoding bits (UTF8 is 1 << 15, ASCII 1 << 18)
_HAS_ATTRIBUTES, _HAS_TAG = 1 << 9, 1 << 10


class RDataError(SecateursError):
    """The file is not an R lazy-load database of the shapes we read."""


@dataclass
class RObject:
    """A vector or list with its attributes (names, class, levels, row.names ...)."""

    value: list
    attributes: dict = field(default_factory=dict)


def iter_records(blob: bytes):
    """Yield the decompressed payload of each zlib record of an ``.rdb`` blob, in file order."""
    position = 0
    while position < len(blob):
        if len(blob) - position < 5:
            raise RDataError(f"truncated record header at byte {position}")
        declared = struct.unpack(">I", blob[position : position + 4])[0]
        decompressor = zlib.decompressobj()
        try:
            payload = decompressor.decompress(blob[position + 4 :])
        except zlib.error as exc:
            raise RDataError(f"record at byte {position} is not a zlib stream: {exc}") from None
        if not decompressor.eof:
            raise RDataError(f"record at byte {position} is truncated")
        if len(payload) != declared:
            raise RDataError(f"record at byte {position}: {len(payload)} bytes, header says {declared}")
        yield payload
        position = len(blob) - len(decompressor.unused_data)


def decompress_record(record: bytes, compressed: int) -> bytes:
    """One record (length field included) of a database whose index says `compressed` (1 zlib, 2
    bzip2, 3 xz: the last two with a type byte)."""
    if len(record) < 5:
        raise RDataError("truncated record")
    declared = struct.unpack(">I", record[:4])[0]
    body = record[4:]
    try:
        if compressed in (2, 3):
            kind, body = body[:1], body[1:]
            if kind == b"Z":
                payload = lzma.decompress(body, format=lzma.FORMAT_RAW,
                                          filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
            elif kind == b"2":
                payload = bz2.decompress(body)
            elif kind == b"0":
                payload = body
            else:
                raise RDataError(f"unknown record compression type {kind!r}")
        else:
            payload = zlib.decompress(body)
    except (lzma.LZMAError, OSError, zlib.error) as exc:
        raise RDataError(f"record does not decompress: {exc}") from None
    if len(payload) != declared:
        raise RDataError(f"record has {len(payload)} bytes, its header says {declared}")
    return payload


class _XdrReader:
    def __init__(self, payload: bytes):
        self.payload = payload
        self.offset = 0

    def take(self, length: int) -> bytes:
        if length < 0 or self.offset + length > len(self.payload):
            raise RDataError("serialization ends early" if length >= 0 else f"negative length {length}")
        chunk = self.payload[self.offset : self.offset + length]
        self.offset += length
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def ints(self, count: int) -> list[int]:
        return list(struct.unpack(f">{count}i", self.take(4 * count)))

    def doubles(self, count: int) -> list[float]:
        return list(struct.unpack(f">{count}d", self.take(8 * count)))


class _Unserializer:
    def __init__(self, payload: bytes):
        if payload[:2] != b"X\n":
            raise RDataError("not an XDR serialization (expected 'X\\n' header)")
        self.reader = _XdrReader(payload[2:])
        version = self.reader.int()
        self.reader.int()  # R version that wrote it
        self.reader.int()  # oldest R version that reads it
        if version == 3:
            self.reader.take(self.reader.int())  # native encoding name
        elif version != 2:
            raise RDataError(f"unsupported serialization version {version}")
        self.references: list = []

    def length(self) -> int:
        count = self.reader.int()
        if count == -1:  # its length as two more ints: over 2**31 elements, no data set this reads
            raise RDataError("long vectors are not supported")
        if count < 0:
            raise RDataError(f"negative vector length {count}")
        return count

    def string(self, flags: int) -> str | None:
        length = self.reader.int()
        if length == _NA_STRING_LENGTH:
            return None
        if length < 0:
            raise RDataError(f"negative string length {length}")
        return self.reader.take(length).decode("latin-1" if flags & _LATIN1_FLAG else "utf-8", "replace")

    def item(self, with_attributes: bool = True):
        flags = self.reader.int()
        kind = flags & 0xFF
        if kind in (_NILVALUE, _EMPTYENV, _BASEENV, _GLOBALENV, _UNBOUNDVALUE, _MISSINGARG, _BASENAMESPACE):
            return None
        if kind == _REFSXP:
            index = flags >> 8 or self.reader.int()
            if not 0 < index <= len(self.references):
                raise RDataError(f"reference {index} to an object not read yet")
            return self.references[index - 1]
        if kind == _SYMSXP:
            name = self.item()
            self.references.append(name)
            return name
        if kind == _CHARSXP:
            return self.string(flags)
        if kind in (_LISTSXP, 6):  # pairlist, or a LANGSXP read the same way
            return self.pairlist(flags)
        if kind == _ALTREP:
            return self.altrep()
        if kind == _LGLSXP or kind == _INTSXP:
            count = self.length()
            value = [None if v == _NA_INTEGER else (bool(v) if kind == _LGLSXP else v) for v in self.reader.ints(count)]
        elif kind == _REALSXP:
            value = self.reader.doubles(self.length())
        elif kind == _STRSXP:
            value = []
            for _ in range(self.length()):
                element = self.reader.int()
                if element & 0xFF != _CHARSXP:
                    raise RDataError(f"character vector element has R type {element & 0xFF}, not a string")
                value.append(self.string(element))
        elif kind == _VECSXP or kind == 20:  # list, or an expression vector
            value = [self.item() for _ in range(self.length())]
        elif kind == _NILSXP:
            return None
        else:
            raise RDataError(f"R type {kind} is not supported")
        if not (flags & _HAS_ATTRIBUTES):
            return value
        if not with_attributes:  # the caller wants the elements only: leave the rest unread
            return value
        attributes = self.item()
        return RObject(value, attributes if isinstance(attributes, dict) else {})

    def pairlist(self, flags: int) -> dict:
        """A pairlist as {tag: value} (untagged elements keyed by position)."""
        result = {}
        while True:
            if flags & _HAS_ATTRIBUTES:
                self.item()
            tag = self.item() if flags & _HAS_TAG else len(result)
            result[tag] = self.item()
            flags = self.reader.int()
            if flags & 0xFF == _NILVALUE:
                return result
            if flags & 0xFF not in (_LISTSXP, 6):
                raise RDataError(f"pairlist continues with R type {flags & 0xFF}")

    def altrep(self):
        info = self.item()  # pairlist: class symbol, package symbol, type
        state = self.item()
        attributes = self.item()
        names = list(info.values()) if isinstance(info, dict) else []
        class_name = names[0] if names else None
        if class_name in ("compact_intseq", "compact_realseq"):
            count, start, step = (state.value if isinstance(state, RObject) else state)[:3]
            value = [start + step * i for i in range(int(count))]
            if class_name == "compact_intseq":
                value = [int(v) for v in value]
        elif isinstance(class_name, str) and (class_name.startswith("wrap_") or class_name == "deferred_string"):
            inner = list(state.values())[0] if isinstance(state, dict) else state
            value = inner.value if isinstance(inner, RObject) else inner
            if class_name == "deferred_string":
                value = [None if v is None else (str(int(v)) if float(v).is_integer() else repr(v)) for v in value]
        else:
            raise RDataError(f"ALTREP class {class_name!r} is not supported")
        return RObject(value, attributes) if isinstance(attributes, dict) and attributes else value


def unserialize(payload: bytes):
    """One XDR-serialized R object as Python: vectors as lists (NA as None), lists and pairlists,
    RObject where there are attributes."""
    return _Unserializer(payload).item()


def decode_character_vector(payload: bytes) -> list[str | None]:
    """Decode one XDR-serialized R character vector; NA elements become None; attributes are not read."""
    unserializer = _Unserializer(payload)
    flags = struct.unpack(">i", payload[unserializer.reader.offset + 2 : unserializer.reader.offset + 6])[0]
    if flags & 0xFF != _STRSXP:
        raise RDataError(f"record holds R type {flags & 0xFF}, not a character vector")
    return unserializer.item(with_attributes=False)


def read_character_vectors(path: str | Path) -> list[list[str | None]]:
    """All character vectors stored in a zlib ``.rdb`` file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise RDataError(f"R data file not found: {path}")
    return [decode_character_vector(payload) for payload in iter_records(path.read_bytes())]


def read_index(rdx: str | Path) -> tuple[dict[str, tuple[int, int]], int]:
    """({object name: (offset, length)}, compression) from an ``.rdx`` file."""
    try:
        index = unserialize(gzip.decompress(Path(rdx).read_bytes()))
    except (OSError, EOFError) as exc:
        raise RDataError(f"{rdx}: not a gzip-compressed R index ({exc})") from None
    if not isinstance(index, RObject) or "names" not in index.attributes:
        raise RDataError(f"{rdx}: not a lazy-load index")
    fields = dict(zip(index.attributes["names"], index.value))
    variables = fields.get("variables")
    if not isinstance(variables, RObject):
        raise RDataError(f"{rdx}: the index has no variables")
    compressed = fields.get("compressed", [1])
    compressed = compressed.value if isinstance(compressed, RObject) else compressed
    return ({name: (int(entry[0]), int(entry[1])) for name, entry in zip(variables.attributes["names"], variables.value)},
            int(compressed[0]) if not isinstance(compressed[0], bool) else int(compressed[0]))


def read_object(folder: str | Path, name: str):
    """The object `name` of the lazy-load database Rdata.rdb / Rdata.rdx in `folder`."""
    folder = Path(folder)
    variables, compressed = read_index(folder / "Rdata.rdx")
    if name not in variables:
        raise RDataError(f"{folder}: no object {name!r} (it has {', '.join(sorted(variables))})")
    offset, length = variables[name]
    with open(folder / "Rdata.rdb", "rb") as handle:
        handle.seek(offset)
        record = handle.read(length)
    return unserialize(decompress_record(record, compressed))


def data_frame(value) -> dict[str, list]:
    """A data.frame (or tibble) as {column: values}; factor columns as their level strings."""
    if not isinstance(value, RObject) or "names" not in value.attributes:
        raise RDataError("not a data frame")
    columns = {}
    for name, column in zip(value.attributes["names"], value.value):
        if isinstance(column, RObject) and "levels" in column.attributes:
            levels = column.attributes["levels"]
            levels = levels.value if isinstance(levels, RObject) else levels
            column = [None if code is None else levels[code - 1] for code in column.value]
        elif isinstance(column, RObject):
            column = column.value
        columns[name] = column
    return columns
