"""Read character vectors out of an R lazy-load database (``Rdata.rdb``) without R.

An ``.rdb`` file is a sequence of records, each a 4-byte big-endian length field followed by one
zlib stream. The length field holds the *uncompressed* size, so a record's end is found from the
zlib decompressor's unused data, not from that field. Each record is an R XDR serialization
(format "X", version 2 or 3); we decode the one shape the janeaustenr data uses: a character
vector (STRSXP) of text lines, optionally with attributes we skip.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from secateurs.errors import SecateursError

_STRSXP = 16
_CHARSXP = 9
_NA_STRING_LENGTH = -1
_LATIN1_FLAG = 1 << (12 + 2)  # LATIN1_MASK among a CHARSXP's encoding bits (UTF8 is 1 << 15, ASCII 1 << 18)


class RDataError(SecateursError):
    """The file is not an R lazy-load database of character vectors."""


def iter_records(blob: bytes):
    """Yield the decompressed payload of each record in an ``.rdb`` blob."""
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


class _XdrReader:
    def __init__(self, payload: bytes):
        self.payload = payload
        self.offset = 0

    def int(self) -> int:
        if self.offset + 4 > len(self.payload):
            raise RDataError("serialized vector ends early")
        (value,) = struct.unpack(">i", self.payload[self.offset : self.offset + 4])
        self.offset += 4
        return value

    def raw(self, length: int) -> bytes:
        if length < 0 or self.offset + length > len(self.payload):
            raise RDataError("serialized string ends early" if length >= 0 else f"negative string length {length}")
        chunk = self.payload[self.offset : self.offset + length]
        self.offset += length
        return chunk


def decode_character_vector(payload: bytes) -> list[str | None]:
    """Decode one XDR-serialized R character vector; NA elements become None."""
    if payload[:2] != b"X\n":
        raise RDataError("not an XDR serialization (expected 'X\\n' header)")
    reader = _XdrReader(payload[2:])
    version = reader.int()
    reader.int()  # R version that wrote it
    reader.int()  # oldest R version that reads it
    if version == 3:
        reader.raw(reader.int())  # native encoding name
    elif version != 2:
        raise RDataError(f"unsupported serialization version {version}")
    flags = reader.int()
    if flags & 0xFF != _STRSXP:
        raise RDataError(f"record holds R type {flags & 0xFF}, not a character vector")
    count = reader.int()
    if count < 0:
        raise RDataError("long vectors are not supported")
    lines: list[str | None] = []
    for _ in range(count):
        element_flags = reader.int()
        if element_flags & 0xFF != _CHARSXP:
            raise RDataError(f"vector element has R type {element_flags & 0xFF}, not a string")
        length = reader.int()
        if length == _NA_STRING_LENGTH:
            lines.append(None)
            continue
        encoding = "latin-1" if element_flags & _LATIN1_FLAG else "utf-8"
        lines.append(reader.raw(length).decode(encoding, "replace"))
    return lines


def read_character_vectors(path: str | Path) -> list[list[str | None]]:
    """All character vectors stored in an ``.rdb`` file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise RDataError(f"R data file not found: {path}")
    return [decode_character_vector(payload) for payload in iter_records(path.read_bytes())]
