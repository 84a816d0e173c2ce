"""The content-addressed store (CAS) behind the fake Hub's Xet endpoints: xorbs, shards and file reconstructions
as the Xet protocol specification describes them (huggingface.co/docs/xet), read from the bytes hf_xet sends.

- A **xorb** is a run of chunks, each an 8-byte header (version 0; compressed length, 3 bytes little-endian;
  compression scheme: 0 none, 1 LZ4 frame, 2 byte-grouping-4 then LZ4 frame; uncompressed length, 3 bytes),
  then the chunk's bytes, followed by a footer. The store keeps each xorb as uploaded and serves byte ranges
  of it, as the CAS's presigned URLs do.
- A **shard** (`HFRepoMetaData` magic) holds, per file, its Xet hash and reconstruction terms (xorb hash,
  chunk range, unpacked bytes), optionally a verification entry per term and the file's sha256; then, per
  xorb, where each chunk starts in the xorb's unpacked bytes. Every section ends with a bookend entry (hash
  of all ones); an uploaded shard has no footer or lookup tables (footer size 0). Entries are 48 bytes: a
  32-byte hash and four little-endian u32 (or two u64).
- A file's **reconstruction** is its terms, cut to the chunks a byte range needs, with, per xorb, the merged
  chunk ranges to fetch, their URL and byte range (inclusive end, as an HTTP Range).

Hashes (the sha256 included) travel as Xet writes them: the 32 bytes as four little-endian u64, each printed
as 16 hex digits. What the store checks: a shard's xorbs were uploaded and their chunks decompress to the
sizes and offsets it states, its files only name known xorbs and chunk ranges inside them, and each file
rebuilt from its terms has the sha256 the shard states. It does not recompute Xet's own hashes
(chunk, xorb and file Merkle hashes use keyed BLAKE3), so a xorb is trusted to be what its hash says.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lz4.frame

SHARD_MAGIC = b"HFRepoMetaData\x00" + bytes(
    [85, 105, 103, 69, 106, 123, 129, 87, 131, 165, 189, 217, 92, 205, 209, 74, 169]
)
ENTRY_BYTES = 48  # every shard entry: 32-byte hash + 16 bytes of integers
BOOKEND = b"\xff" * 32
FILE_FLAG_WITH_VERIFICATION = 1 << 31
FILE_FLAG_WITH_METADATA_EXT = 1 << 30
CHUNK_HEADER_BYTES = 8
COMPRESSION_NONE, COMPRESSION_LZ4, COMPRESSION_BG4_LZ4 = 0, 1, 2


class XetFormatError(ValueError):
    """Bytes that are not what the Xet format says (the fake answers 400 with this message)."""


def hash_hex(raw: bytes) -> str:
    """A Xet hash's hex form: four little-endian u64, each as 16 hex digits."""
    return "".join(raw[i : i + 8][::-1].hex() for i in range(0, 32, 8))


@dataclass(frozen=True)
class Term:
    """Chunks [start, end) of a xorb, `length` bytes once decompressed: one piece of a file."""

    xorb: str
    start: int
    end: int
    length: int


@dataclass(frozen=True)
class XetFile:
    xet_hash: str
    terms: tuple[Term, ...]
    sha256: str | None

    @property
    def size(self) -> int:
        return sum(term.length for term in self.terms)


@dataclass(frozen=True)
class Shard:
    files: tuple[XetFile, ...]
    xorb_chunk_starts: dict[str, tuple[int, ...]]  # xorb -> where each chunk starts in its unpacked bytes


def _entry(data: bytes, pos: int) -> tuple[bytes, tuple[int, int, int, int]]:
    if pos + ENTRY_BYTES > len(data):
        raise XetFormatError(f"shard ends inside an entry at byte {pos}")
    return data[pos : pos + 32], struct.unpack_from("<4I", data, pos + 32)


def parse_shard(data: bytes) -> Shard:
    """The files and xorbs a serialized shard describes."""
    if data[: len(SHARD_MAGIC)] != SHARD_MAGIC:
        raise XetFormatError("not a Xet shard (wrong magic number)")
    _version, footer_size = struct.unpack_from("<QQ", data, len(SHARD_MAGIC))
    if footer_size > len(data):
        raise XetFormatError(f"shard footer of {footer_size} bytes in a {len(data)}-byte shard")
    # The file section follows the header; the xorb section follows the file section's bookend. An uploaded
    # shard has no footer (footer size 0): its lookup tables are the server's to build.
    files, pos = [], len(SHARD_MAGIC) + 16
    while True:
        file_hash, (flags, entries, _, _) = _entry(data, pos)
        pos += ENTRY_BYTES
        if file_hash == BOOKEND:
            break
        terms = []
        for _ in range(entries):
            xorb, (_xorb_flags, length, start, end) = _entry(data, pos)
            pos += ENTRY_BYTES
            if end <= start:
                raise XetFormatError(f"file {hash_hex(file_hash)}: empty chunk range [{start}, {end})")
            terms.append(Term(hash_hex(xorb), start, end, length))
        if flags & FILE_FLAG_WITH_VERIFICATION:
            pos += entries * ENTRY_BYTES  # one range hash per term: Xet's keyed BLAKE3, not checked here
        sha256 = None
        if flags & FILE_FLAG_WITH_METADATA_EXT:
            sha256 = hash_hex(_entry(data, pos)[0])  # stored like the Xet hashes, as four u64
            pos += ENTRY_BYTES
        files.append(XetFile(hash_hex(file_hash), tuple(terms), sha256))

    xorbs = {}
    while True:
        xorb, (_flags, entries, _bytes, _on_disk) = _entry(data, pos)
        pos += ENTRY_BYTES
        if xorb == BOOKEND:
            break
        starts = []
        for _ in range(entries):
            _chunk_hash, (byte_start, _length, _chunk_flags, _) = _entry(data, pos)
            pos += ENTRY_BYTES
            starts.append(byte_start)
        xorbs[hash_hex(xorb)] = tuple(starts)
    return Shard(tuple(files), xorbs)


def _regroup_bg4(grouped: bytes) -> bytes:
    """Undo byte grouping: group g holds bytes g, g+4, g+8, ... of the chunk (the first n % 4 groups one more)."""
    n, out, pos = len(grouped), bytearray(len(grouped)), 0
    for group in range(4):
        size = n // 4 + (1 if group < n % 4 else 0)
        out[group::4] = grouped[pos : pos + size]
        pos += size
    return bytes(out)


def read_chunk(xorb: bytes, offset: int) -> tuple[bytes, int]:
    """The decompressed chunk at byte `offset` of a xorb, and the offset just after it."""
    if offset + CHUNK_HEADER_BYTES > len(xorb):
        raise XetFormatError(f"xorb ends inside a chunk header at byte {offset}")
    version, scheme = xorb[offset], xorb[offset + 4]
    compressed = int.from_bytes(xorb[offset + 1 : offset + 4], "little")
    length = int.from_bytes(xorb[offset + 5 : offset + 8], "little")
    payload = xorb[offset + CHUNK_HEADER_BYTES : offset + CHUNK_HEADER_BYTES + compressed]
    if version != 0 or len(payload) != compressed:
        raise XetFormatError(f"bad chunk at byte {offset} (version {version}, {compressed} bytes)")
    if scheme == COMPRESSION_NONE:
        data = payload
    elif scheme == COMPRESSION_LZ4:
        data = lz4.frame.decompress(payload)
    elif scheme == COMPRESSION_BG4_LZ4:
        data = _regroup_bg4(lz4.frame.decompress(payload))
    else:
        raise XetFormatError(f"unknown compression scheme {scheme} in the chunk at byte {offset}")
    if len(data) != length:
        raise XetFormatError(
            f"chunk at byte {offset} decompresses to {len(data)} bytes, header says {length}"
        )
    return data, offset + CHUNK_HEADER_BYTES + compressed


class XetStore:
    """Xorbs and the files reconstructed from them, as a CAS server holds them."""

    def __init__(self) -> None:
        self.xorbs: dict[str, bytes] = {}
        self.chunk_ranges: dict[str, tuple[tuple[int, int], ...]] = {}  # xorb -> [start, end) of each chunk
        self.chunk_lengths: dict[str, tuple[int, ...]] = {}  # xorb -> unpacked bytes of each chunk
        self.files: dict[str, XetFile] = {}  # by Xet hash
        self.xorb_bytes_received = 0  # every xorb upload's body, new or not

    def add_xorb(self, xorb_hash: str, body: bytes) -> bool:
        """Store a xorb; False when it was there already."""
        self.xorb_bytes_received += len(body)
        if xorb_hash in self.xorbs:
            return False
        self.xorbs[xorb_hash] = body
        return True

    def add_shard(self, body: bytes) -> list[tuple[XetFile, bytes]]:
        """Register a shard's xorbs and files; returns each new file with its bytes, rebuilt and checked."""
        shard = parse_shard(body)
        for xorb_hash, starts in shard.xorb_chunk_starts.items():
            xorb = self.xorbs.get(xorb_hash)
            if xorb is None:
                raise XetFormatError(f"shard names xorb {xorb_hash}, which was never uploaded")
            ranges, lengths, offset, unpacked = [], [], 0, 0
            for index, start in enumerate(starts):  # the xorb's chunks, in order
                if start != unpacked:
                    raise XetFormatError(f"xorb {xorb_hash}: chunk {index} starts at {unpacked}, not {start}")
                data, end = read_chunk(xorb, offset)
                ranges.append((offset, end))
                lengths.append(len(data))
                offset, unpacked = end, unpacked + len(data)
            self.chunk_ranges[xorb_hash] = tuple(ranges)
            self.chunk_lengths[xorb_hash] = tuple(lengths)
        rebuilt = []
        for file in shard.files:
            if file.xet_hash in self.files:  # the same Xet hash is the same content, checked when it came
                continue
            data = b"".join(self.term_bytes(term) for term in file.terms)
            if file.sha256 is not None and hashlib.sha256(data).hexdigest() != file.sha256:
                raise XetFormatError(f"file {file.xet_hash} does not rebuild to its sha256 {file.sha256}")
            rebuilt.append((file, data))
        for file, _ in rebuilt:
            self.files[file.xet_hash] = file
        return rebuilt

    def term_bytes(self, term: Term) -> bytes:
        ranges = self.chunk_ranges.get(term.xorb)
        if ranges is None:
            raise XetFormatError(f"xorb {term.xorb} is unknown to this CAS")
        if term.end > len(ranges):
            raise XetFormatError(
                f"chunks [{term.start}, {term.end}) of xorb {term.xorb}: it has {len(ranges)}"
            )
        xorb = self.xorbs[term.xorb]
        data = b"".join(read_chunk(xorb, ranges[i][0])[0] for i in range(term.start, term.end))
        if len(data) != term.length:
            raise XetFormatError(
                f"chunks [{term.start}, {term.end}) of xorb {term.xorb} hold {len(data)} bytes"
            )
        return data

    def reconstruction(
        self, xet_hash: str, url_of_xorb: Callable[[str], str], first: int = 0, end: int | None = None
    ) -> dict[str, Any]:
        """The V1 reconstruction of bytes [first, end) of a file (all of it by default): the terms that cover
        them, cut to the chunks they need, how far into the first term the bytes start, and per xorb the
        merged chunk ranges to fetch with their URL and byte range (an HTTP range: inclusive end)."""
        file = self.files[xet_hash]
        end = file.size if end is None else min(end, file.size)
        terms, wanted, position, offset = [], {}, 0, 0
        for term in file.terms:
            if position >= end:
                break
            lengths = self.chunk_lengths[term.xorb]
            start_chunk, end_chunk, length = term.start, term.end, term.length
            while position + lengths[start_chunk] <= first:  # chunks wholly before the range
                position += lengths[start_chunk]
                length -= lengths[start_chunk]
                start_chunk += 1
            if start_chunk == end_chunk:
                continue
            if not terms:
                offset = first - position
            while end_chunk - start_chunk > 1 and position + length - lengths[end_chunk - 1] >= end:
                end_chunk -= 1  # chunks wholly after the range
                length -= lengths[end_chunk]
            terms.append(
                {"hash": term.xorb, "unpacked_length": length, "range": _range(start_chunk, end_chunk)}
            )
            wanted.setdefault(term.xorb, []).append((start_chunk, end_chunk))
            position += length
        fetch_info: dict[str, list[dict[str, Any]]] = {}
        for xorb, ranges in wanted.items():
            merged: list[list[int]] = []
            for start_chunk, end_chunk in sorted(ranges):
                if merged and start_chunk <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], end_chunk)
                else:
                    merged.append([start_chunk, end_chunk])
            offsets = self.chunk_ranges[xorb]
            fetch_info[xorb] = [
                {
                    "range": _range(start_chunk, end_chunk),
                    "url": url_of_xorb(xorb),
                    "url_range": {"start": offsets[start_chunk][0], "end": offsets[end_chunk - 1][1] - 1},
                }
                for start_chunk, end_chunk in merged
            ]
        return {"offset_into_first_range": offset, "terms": terms, "fetch_info": fetch_info}


def _range(start: int, end: int) -> dict[str, int]:
    return {"start": start, "end": end}
