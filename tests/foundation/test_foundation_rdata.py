"""The R lazy-load database reader, on synthetic .rdb bytes from a small XDR serializer."""

import struct
import zlib
from pathlib import Path

import pytest

from secateurs.data.corpus import austen_novels
from secateurs.data.rdata import RDataError, decode_character_vector, iter_records, read_character_vectors
from secateurs.errors import SecateursError

STRSXP, INTSXP = 16, 13
ASCII, UTF8, LATIN1 = 0x00040009, 0x00008009, 0x00004009  # CHARSXP flags: encoding bits << 12 | 9
DEBIAN_RDB = Path("/tmp/probe/deb/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")


def xdr_int(value: int) -> bytes:
    return struct.pack(">i", value)


def serialize(lines, version: int = 3, sexptype: int = STRSXP, charsxp_flags=None) -> bytes:
    """An R XDR serialization of a character vector; None is NA_character_."""
    out = b"X\n" + xdr_int(version) + xdr_int(0x040201) + xdr_int(0x030500)
    if version == 3:
        out += xdr_int(5) + b"UTF-8"
    out += xdr_int(sexptype) + xdr_int(len(lines))
    for line in lines:
        if line is None:
            out += xdr_int(0x00000009) + xdr_int(-1)
            continue
        latin1 = charsxp_flags == LATIN1
        raw = line.encode("latin-1" if latin1 else "utf-8")
        flags = charsxp_flags or (ASCII if line.isascii() else UTF8)
        out += xdr_int(flags) + xdr_int(len(raw)) + raw
    return out


def record(payload: bytes, declared: int | None = None) -> bytes:
    return struct.pack(">I", len(payload) if declared is None else declared) + zlib.compress(payload)


VECTORS = [
    ["It was a truth", "", "Ça va — naïve “quotes” 日本語", None, "  spaces kept  "],
    [],
    [f"line {i}" for i in range(500)],
    [None, None],
]


def test_round_trip_several_records(tmp_path):
    path = tmp_path / "Rdata.rdb"
    path.write_bytes(b"".join(record(serialize(v)) for v in VECTORS))
    assert read_character_vectors(path) == VECTORS
    assert read_character_vectors(str(path)) == VECTORS


def test_record_boundaries_come_from_the_zlib_stream():
    # Highly compressible payloads: the compressed record is far shorter than the declared length.
    payloads = [serialize(["a" * 5000]), serialize(["b" * 7000, "c"])]
    blob = b"".join(record(p) for p in payloads)
    assert len(blob) < 1000
    assert list(iter_records(blob)) == payloads


def test_version_2_serialization_has_no_encoding_field():
    assert decode_character_vector(serialize(["abc", None], version=2)) == ["abc", None]


def test_latin1_flagged_strings_are_decoded_as_latin1():
    assert decode_character_vector(serialize(["café", "naïve"], charsxp_flags=LATIN1)) == ["café", "naïve"]


def test_trailing_attributes_are_ignored():
    # names/class attributes follow the elements in the stream; the reader stops after the elements.
    payload = serialize(["x", "y"], sexptype=STRSXP | 0x200) + xdr_int(0x402) + xdr_int(1) + b"\x00" * 32
    assert decode_character_vector(payload) == ["x", "y"]


def good_blob() -> bytes:
    return record(serialize(["first", "second"])) + record(serialize(["third"]))


@pytest.mark.parametrize(
    "blob, match",
    [
        (good_blob()[:-3], "truncated"),  # last zlib stream cut short
        (good_blob()[:40], "truncated"),
        (record(serialize(["abc"]), declared=len(serialize(["abc"])) + 1), "header says"),
        (record(serialize(["abc"]), declared=3), "header says"),
        (struct.pack(">I", 20) + b"this is not zlib data at all", "not a zlib stream"),
        (good_blob() + b"\x00\x00", "truncated record header"),
        (good_blob() + struct.pack(">I", 9) + b"garbage!!", "not a zlib stream"),
    ],
    ids=["cut-zlib", "cut-early", "length-plus-one", "length-short", "not-zlib", "stub-header", "trailing-garbage"],
)
def test_damaged_records(blob, match):
    with pytest.raises(RDataError, match=match):
        list(iter_records(blob))


@pytest.mark.parametrize(
    "payload, match",
    [
        (serialize(["a"], sexptype=INTSXP), "not a character vector"),
        (b"A\n" + serialize(["a"])[2:], "expected 'X"),  # ASCII serialization
        (b"X\n" + xdr_int(4) + serialize(["a"])[6:], "unsupported serialization version 4"),
        (serialize(["abc", "def"])[:-2], "ends early"),  # string cut short
        (serialize(["abc", "def"])[:-7], "ends early"),  # element header cut short
        (serialize(["a"])[:-5] + xdr_int(-5) + b"a", "negative string length"),
        (serialize(["a"])[:-13] + xdr_int(-1), "long vectors"),
        (serialize(["a"])[:-9] + xdr_int(13) + xdr_int(1) + b"a", "not a string"),
    ],
    ids=["intsxp", "ascii-format", "version-4", "cut-string", "cut-element", "negative-length", "long-vector",
         "element-not-charsxp"],
)
def test_malformed_payloads(payload, match, tmp_path):
    with pytest.raises(RDataError, match=match):
        decode_character_vector(payload)
    path = tmp_path / "bad.rdb"
    path.write_bytes(record(payload))
    with pytest.raises(SecateursError):  # what the CLI turns into one line
        read_character_vectors(path)


def test_missing_file(tmp_path):
    with pytest.raises(RDataError, match="not found"):
        read_character_vectors(tmp_path / "absent.rdb")


@pytest.mark.skipif(not DEBIAN_RDB.is_file(), reason="Debian r-cran-janeaustenr not unpacked at /tmp/probe")
def test_debian_janeaustenr_matches_bundled_novels():
    vectors = read_character_vectors(DEBIAN_RDB)
    novels = austen_novels()
    assert sorted(novels) == ["Emma", "Mansfield Park", "Northanger Abbey", "Persuasion",
                              "Pride and Prejudice", "Sense and Sensibility"]
    assert len(vectors) == 6
    assert sorted(map(tuple, vectors)) == sorted(map(tuple, novels.values()))
