"""`flux2-lora data validate`: every problem in a dataset folder or a cache folder, one line each, in a `Report`.

Nothing here raises for a bad file: each check is caught per file and becomes a `Problem`. Errors are what would
stop or corrupt training (the exit code is 1 when there is one); warnings are worth a look but train fine.
Symbolic links are refused and never followed: their targets are not opened, stat-ed or resolved. A cache folder
(index.json + shards, from `flux2-lora data cache` or a run's OUTPUT/cache/<digest>) is checked as a cache:
index.json against every tar header and every sample's tensors (cache.audit_cache), one line per mismatch naming
the shard and the sample. The cleaned copy of `--fix` is written by `fix.py`, from the report made here.
An editing dataset's reference images are found by `validate_refs.py` (training's rules, every mistake listed):
they need no caption, are not duplicates, and are held to FLUX.2's limits for a reference, not the target's;
`Report.references` holds each item's. Raw shards are checked by `validate_shards.py`, with the same checks.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .folder import IMAGE_EXTENSIONS, DataError, load_image
from .tokens import count_tokens
from .validate_refs import References, find_references, reference_geometry

Severity = Literal["error", "warning"]

CAPTION_SUFFIX = ".txt"
METADATA_FILE = "metadata.jsonl"
FIXES_FILE = "FIXES.txt"
DEFAULT_MAX_TOKENS = 512  # model.max_sequence_length: the text encoder's prompt length, template included
BOM = b"\xef\xbb\xbf"
# Picture formats training does not read: a dataset file with one of these is silently skipped, so it is an error.
OTHER_IMAGE_EXTENSIONS = {
    ".gif", ".bmp", ".dib", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".jfif", ".jpe",
    ".pjpeg", ".ico", ".psd", ".tga", ".ppm", ".pgm", ".pbm", ".pnm", ".exr", ".hdr", ".svg", ".dng", ".cr2",
    ".cr3", ".nef", ".arw", ".orf", ".raf", ".rw2", ".apng", ".qoi", ".dds",
}  # fmt: skip
# Leading bytes of picture files, to catch images whose name hides them (`photo`, `photo.dat`).
MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
IGNORED_SUFFIXES = {".json", ".jsonl"}


@dataclass(frozen=True)
class Problem:
    path: Path
    severity: Severity
    code: str
    reason: str


@dataclass
class Report:
    root: Path
    problems: list[Problem] = field(default_factory=list)
    n_images: int = 0
    n_ok: int = 0
    unit: str = "image"  # what n_images counts ("sample" for a cache)
    absolute: bool = False  # problems shown with their full path (a cache's lines name its folder)
    advice: str | None = None  # what to do about the errors, appended to the summary line
    references: dict[Path, tuple[Path, ...]] = field(default_factory=dict)  # each item's reference images, in order
    reference_files: set[Path] = field(default_factory=set)  # every file taken as a reference (validate_refs)
    masks: dict[Path, Path] = field(default_factory=dict)  # each masked image's loss mask (data/masks.py)
    mask_files: set[Path] = field(default_factory=set)  # every file taken as a mask (never a training image)

    @property
    def has_errors(self) -> bool:
        return any(p.severity == "error" for p in self.problems)

    @property
    def n_errors(self) -> int:
        return sum(p.severity == "error" for p in self.problems)

    @property
    def n_warnings(self) -> int:
        return sum(p.severity == "warning" for p in self.problems)

    def rel(self, path: Path) -> str:
        """A problem's path as shown: relative to the dataset root ("." for the root itself)."""
        if self.absolute:
            return str(path)
        try:
            return path.relative_to(self.root).as_posix() if path != self.root else "."
        except ValueError:
            return str(path)

    def codes(self, path: Path) -> list[str]:
        return [p.code for p in self.problems if p.path == path]


@dataclass(frozen=True)
class Caption:
    """The caption an image trains with: text (normalised; None when missing or unusable) and where it came from."""

    text: str | None
    source: Path | None  # the .txt file, metadata.jsonl, or None when there is none
    bom: bool = False
    raw_text: str | None = None  # decoded text before whitespace normalisation


# ---------------------------------------------------------------------------------------------- walking the folder


def dataset_root(root: str | os.PathLike[str]) -> Path:
    """The dataset folder, resolved (`builtin:sample`, `builtin:edit`: generated once); a missing one is a one-line
    DataError."""
    from ..config import BUILTIN_DATASETS
    from .sample import resolve_dataset

    if str(root) in BUILTIN_DATASETS:
        return resolve_dataset(str(root)).resolve()
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"{path}: dataset folder does not exist")
    return path.resolve()


def walk(root: Path) -> tuple[list[Path], list[Problem]]:
    """Every entry below root (files, symlinks, special files), sorted by relative path; symlinks are not followed."""
    found: list[Path] = []
    problems: list[Problem] = []

    def on_error(e: OSError) -> None:
        where = Path(e.filename) if e.filename else root
        problems.append(Problem(where, "error", "unreadable", f"cannot list folder ({e.strerror})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        dirnames.sort()
        base = Path(dirpath)
        found += [base / d for d in dirnames if (base / d).is_symlink()]  # listed, never entered
        found += [base / f for f in filenames]
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return found, problems


def is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def image_files(root: Path) -> list[Path]:
    """The regular (non-symlink) files training reads as images, in training's order."""
    out = []
    for path in walk(root)[0]:
        if path.suffix.lower() in IMAGE_EXTENSIONS and is_regular(path):
            out.append(path)
    return out


def is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------- captions


def decode_caption(raw: bytes) -> tuple[str, bool]:
    """(text, had_bom); raises UnicodeDecodeError for non-UTF-8 bytes."""
    bom = raw.startswith(BOM)
    return raw[len(BOM) :].decode("utf-8") if bom else raw.decode("utf-8"), bom


def normalise(text: str) -> str:
    return " ".join(text.split())


def read_metadata(root: Path) -> tuple[dict[Path, tuple[str, int]], list[Problem]]:
    """Captions from root/metadata.jsonl: {image path: (text, line number)} and a Problem per bad line."""
    meta_path = root / METADATA_FILE
    if not os.path.lexists(meta_path) or meta_path.is_symlink() or not meta_path.is_file():
        return {}, []
    try:
        text, _ = decode_caption(meta_path.read_bytes())
    except (OSError, UnicodeDecodeError) as e:
        why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"cannot read ({e.strerror})"
        return {}, [Problem(meta_path, "error", "bad-metadata", why)]
    captions: dict[Path, tuple[str, int]] = {}
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        image, caption, severity = _metadata_entry(root, line)
        if image is None:
            problems.append(Problem(meta_path, severity, "bad-metadata", f"line {n}: {caption}"))
            continue
        if image in captions:
            why = f"line {n}: {image.relative_to(root).as_posix()} already has a caption on line {captions[image][1]}"
            problems.append(Problem(meta_path, "warning", "bad-metadata", why + " (the later line is used)"))
        elif not os.path.lexists(image):
            why = f"line {n}: file_name {image.relative_to(root).as_posix()} does not exist"
            problems.append(Problem(meta_path, "warning", "bad-metadata", why))
        captions[image] = (caption, n)
    return captions, problems


def _metadata_entry(root: Path, line: str) -> tuple[Path | None, str, Severity]:
    """(image, caption, _) for a good line; (None, reason, severity) for a bad one."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg})", "error"
    if not isinstance(rec, dict):
        return None, 'expected an object {"file_name": ..., "text": ...}', "error"
    name, text = rec.get("file_name"), rec.get("text")
    if not isinstance(name, str) or not name:
        return None, "file_name is missing or not a string", "error"
    if not isinstance(text, str):
        return None, "text is missing or not a string", "error"
    plain = Path(os.path.normpath(name)).as_posix()
    if Path(name).is_absolute() or plain == ".." or plain.startswith("../"):
        return None, f"file_name {name!r} leaves the dataset folder", "error"
    if plain != name:  # training matches file_name as written against the image's relative path
        return None, f"file_name {name!r} should be written {plain!r} (training does not match it)", "warning"
    return root / name, text, "error"


def find_caption(image: Path, metadata: dict[Path, tuple[str, int]], root: Path) -> Caption:
    """The caption training would use for image: metadata.jsonl, then the same-named .txt, then a .json sidecar.

    Raises OSError / UnicodeDecodeError for an unreadable .txt file.
    """
    if image in metadata:
        text = metadata[image][0]
        return Caption(normalise(text), root / METADATA_FILE, raw_text=text)
    txt = image.with_suffix(CAPTION_SUFFIX)
    sidecar = image.with_suffix(".json")
    if not os.path.lexists(txt) and os.path.lexists(sidecar) and not sidecar.is_symlink():
        from .folder import read_json_caption

        try:
            text = read_json_caption(sidecar)
        except DataError:
            return Caption(None, sidecar)
        return Caption(normalise(text), sidecar, raw_text=text)
    if not os.path.lexists(txt):
        return Caption(None, None)
    if txt.is_symlink():
        raise OSError(f"{txt.name} is a symbolic link")
    text, bom = decode_caption(txt.read_bytes())
    return Caption(normalise(text), txt, bom=bom, raw_text=text)


# ------------------------------------------------------------------------------------------------------ checking


def inside(path: Path, root: Path) -> bool:
    p, r = os.path.normpath(path), os.path.normpath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def _head(path: Path, n: int = 16) -> bytes:
    """The first bytes of a file (nothing on a read error): all that validation ever reads of a foreign file."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _foreign_kind(path: Path) -> str | None:
    """What a file that is neither image nor caption is, where its first bytes say so (never opened further)."""
    head = _head(path)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle; it is never opened past its first bytes"
    if head.startswith(b"PK\x03\x04") and path.suffix.lower() in (".pt", ".pth", ".bin", ".ckpt"):
        return "a PyTorch archive, which holds pickles; it is never opened past its first bytes"
    return None


def _sniff(path: Path) -> str | None:
    head = _head(path)
    if not head:
        return None
    for magic, name in MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"avif"):
        return "HEIF/AVIF"
    return None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _bomb_reason(e: Exception) -> str:
    m = re.search(r"\((\d+) pixels\)", str(e))
    size = f"{int(m.group(1)):,} pixels" if m else "too many pixels"
    return f"{size}, over Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} (refused)"


@contextmanager
def quiet_folder_log() -> Iterator[None]:
    """Silence load_image's per-file warnings (animated images): the report already has them."""
    folder_log = logging.getLogger("flux2_lora.data.folder")
    level = folder_log.level
    folder_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        folder_log.setLevel(level)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


@dataclass
class _Options:
    max_file_mb: float
    min_resolution: int
    max_aspect: float
    max_caption_tokens: int
    tokenizer: Any
    instance_prompt: str | None


class _Checker:
    """Runs every check on one folder and collects the problems."""

    def __init__(self, root: Path, opts: _Options) -> None:
        self.root = root
        self.opts = opts
        self.problems: list[Problem] = []
        self.hashes: dict[str, Path] = {}
        self.images: list[Path] = []
        self.refs = References(root)
        self.mask_files: set[Path] = set()

    def is_reference(self, path: Path) -> bool:
        return path in self.refs.files

    def add(self, path: Path, severity: Severity, code: str, reason: str) -> None:
        self.problems.append(Problem(path, severity, code, reason))

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def entry(self, path: Path, metadata: dict[Path, tuple[str, int]]) -> None:
        try:
            st = os.lstat(path)
        except OSError as e:
            self.add(path, "error", "unreadable", f"cannot stat ({e.strerror})")
            return
        suffix = path.suffix.lower()
        mask = path in self.mask_files
        if suffix in IMAGE_EXTENSIONS and not self.is_reference(path) and not mask:
            self.images.append(path)
        if stat.S_ISLNK(st.st_mode):
            self.symlink(path)
            return
        if not inside(Path(os.path.realpath(path)), self.root):
            self.add(path, "error", "outside-root", "its real path is outside the dataset folder (refused)")
            return
        if suffix in IMAGE_EXTENSIONS:
            if not stat.S_ISREG(st.st_mode):
                self.add(path, "error", "unreadable", "not a regular file")
                return
            if not mask:  # a mask is checked with its image (`mask`)
                self.image(path, st.st_size, metadata)
        elif stat.S_ISREG(st.st_mode):
            self.other_file(path, suffix)

    def symlink(self, path: Path) -> None:
        try:
            target = os.readlink(path)  # the link's own text: the target is not touched
        except OSError:
            target = "?"
        self.add(path, "error", "symlink", f"symbolic link to {target} (refused, not followed; copy the file in)")
        lexical = Path(os.path.normpath(os.path.join(os.path.dirname(path), target)))
        if not inside(lexical, self.root):
            self.add(path, "error", "outside-root", f"points outside the dataset folder ({target})")

    def other_file(self, path: Path, suffix: str) -> None:
        name = path.name
        if path.suffix == CAPTION_SUFFIX or path.parent == self.root and name in (METADATA_FILE, FIXES_FILE):
            return
        if suffix == CAPTION_SUFFIX:
            why = f"caption files must end in lowercase {CAPTION_SUFFIX} (training does not read {path.suffix})"
            self.add(path, "warning", "bad-extension", why)
            return
        allowed = "/".join(sorted(IMAGE_EXTENSIONS))
        if suffix in OTHER_IMAGE_EXTENSIONS:
            self.add(path, "error", "bad-extension", f"{suffix} images are not read by training (use {allowed})")
            return
        if is_hidden(path, self.root) or suffix in IGNORED_SUFFIXES:
            return
        kind = _sniff(path)
        if kind is not None:
            why = f"a {kind} image named {name!r} is not read by training (rename or convert it to {allowed})"
            self.add(path, "error", "bad-extension", why)
            return
        note = _foreign_kind(path)
        self.add(path, "warning", "ignored", "ignored: not an image or caption" + (f" ({note})" if note else ""))

    def image(self, path: Path, size: int, metadata: dict[Path, tuple[str, int]]) -> None:
        limit = self.opts.max_file_mb * 2**20
        if size == 0:
            self.add(path, "error", "empty-file", "file is empty (0 bytes)")
        else:
            if size > limit:
                why = f"file is {_mb(size)}, over the {self.opts.max_file_mb:g} MB limit (--max-file-mb)"
                self.add(path, "error", "too-large", why)
            if not self.is_reference(path):
                self.duplicate(path)
            self.pixels(path)
        if not self.is_reference(path):
            self.caption(path, metadata)

    def duplicate(self, path: Path) -> None:
        try:
            digest = "".join(sha256(p) for p in (path, *self.refs.of.get(path, ())))  # an editing pair: all of it
        except OSError as e:
            self.add(path, "error", "unreadable", f"cannot read ({e.strerror})")
            return
        first = self.hashes.setdefault(digest, path)
        if first != path:
            self.add(path, "warning", "duplicate", f"same bytes as {self.rel(first)} (trains that image twice)")

    def pixels(self, path: Path, data: bytes | None = None) -> None:
        """Decode the image at path (or data, a shard member's bytes, whose problems name path)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's other warnings are about pixels training converts anyway
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(path if data is None else io.BytesIO(data)) as im:
                    self.geometry(path, im.size, bool(getattr(im, "is_animated", False)))
                    im.load()
                    mode = im.mode
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                self.add(path, "error", "decompression-bomb", _bomb_reason(e))
                return
            except UnidentifiedImageError:
                self.add(path, "error", "unreadable", "not an image Pillow can read (corrupt or another format)")
                return
            except Exception as e:  # truncated, corrupt, unsupported: Pillow raises many kinds
                self.add(path, "error", "unreadable", f"cannot decode image ({e or type(e).__name__})")
                return
            if mode not in ("RGB", "L"):
                try:
                    with quiet_folder_log():
                        load_image(path if data is None else io.BytesIO(data))
                except DataError:
                    self.add(path, "error", "unreadable", f"cannot convert {mode} pixels to RGB")

    def geometry(self, path: Path, size: tuple[int, int], animated: bool) -> None:
        w, h = size
        cap = Image.MAX_IMAGE_PIXELS
        if cap is not None and w * h > cap:
            raise Image.DecompressionBombError(f"Image size ({w * h} pixels) exceeds limit of {cap} pixels")
        short, long = min(w, h), max(w, h)
        if self.is_reference(path):  # the pipeline's limits for an `image=` input, not the target's
            for code, why in reference_geometry(w, h):
                self.add(path, "error", code, why)
        elif short < self.opts.min_resolution:
            why = f"{w}x{h}: short side {short} px is under --min-resolution {self.opts.min_resolution}"
            self.add(path, "error", "too-small", why)
        if not self.is_reference(path) and short > 0 and long / short > self.opts.max_aspect:
            why = f"{w}x{h}: aspect ratio {long / short:.1f}:1 is over --max-aspect {self.opts.max_aspect:g}"
            self.add(path, "warning", "extreme-aspect", why + " (heavily cropped or squeezed into a bucket)")
        if animated:
            self.add(path, "warning", "animated", "animated image: only the first frame is used")

    def caption(self, image: Path, metadata: dict[Path, tuple[str, int]]) -> None:
        txt = image.with_suffix(CAPTION_SUFFIX)
        if image not in metadata and txt.is_symlink():
            return  # reported as a symlink where the walk meets it
        try:
            cap = find_caption(image, metadata, self.root)
        except UnicodeDecodeError:
            self.add(txt, "error", "caption-not-utf8", "caption is not UTF-8 text (re-save it as UTF-8)")
            return
        except OSError as e:
            self.add(txt, "error", "unreadable", f"cannot read caption ({e.strerror or e})")
            return
        if cap.source is None:
            if self.opts.instance_prompt is None:
                why = f"no caption (add {txt.name}, a metadata.jsonl line, or set an instance prompt)"
                self.add(image, "error", "missing-caption", why)
            return
        where = txt if cap.source == txt else image
        if cap.bom:
            self.add(txt, "warning", "caption-bom", "caption starts with a UTF-8 byte-order mark (training strips it)")
        if not cap.text:
            self.empty_caption(where, image in metadata)
            return
        self.tokens(where, cap.text)

    def empty_caption(self, where: Path, from_metadata: bool) -> None:
        if from_metadata:  # training takes metadata.jsonl text as it is: no instance prompt fallback
            self.add(where, "error", "empty-caption", "its metadata.jsonl caption is empty (training would use it)")
        elif self.opts.instance_prompt is None:
            self.add(where, "error", "empty-caption", "caption is empty (write one or set an instance prompt)")
        else:
            self.add(where, "warning", "empty-caption", "caption is empty: the instance prompt is used instead")

    def tokens(self, where: Path, text: str) -> None:
        if self.opts.tokenizer is None:
            return
        try:
            n = count_tokens(self.opts.tokenizer, text)
        except Exception as e:  # a tokenizer that cannot handle this text is worth a line, not a crash
            self.add(where, "warning", "tokenizer-failed", f"cannot tokenize caption ({type(e).__name__}: {e})")
            return
        limit = self.opts.max_caption_tokens
        if n > limit:
            why = f"caption is {n} tokens; the text encoder keeps {limit}, so the last {n - limit} are cut"
            self.add(where, "warning", "caption-too-long", why)

    def orphans(self, entries: list[Path]) -> None:
        expected = {p.with_suffix(CAPTION_SUFFIX) for p in [*self.images, *self.refs.files]}
        for path in entries:
            if path.suffix != CAPTION_SUFFIX or path in expected or path.is_symlink():
                continue
            if path.parent == self.root and path.name == FIXES_FILE:
                continue
            exts = "/".join(sorted(IMAGE_EXTENSIONS))
            why = f"caption without an image (no {path.stem} with {exts} beside it); training ignores it"
            self.add(path, "warning", "orphan-caption", why)


def validate_dataset(
    root: str | os.PathLike[str],
    *,
    max_file_mb: float = 50.0,
    min_resolution: int = 256,
    max_aspect: float = 4.0,
    max_caption_tokens: int | None = None,
    tokenizer: Any = None,
    instance_prompt: str | None = None,
    mask_dir: str | os.PathLike[str] | None = None,
) -> Report:
    """Check every file under root; one Problem per problem found. Only a missing root (or mask_dir) raises (DataError).

    max_caption_tokens: caption token budget (default 512) checked when a tokenizer is given.
    mask_dir: the source's folder of loss masks (data/masks.py); masks beside the images are found without it.
    """
    from .masks import find_masks, is_mask_file, mask_problems, resolve_mask_dir, split_masks

    root = dataset_root(root)
    masks_in = resolve_mask_dir(mask_dir, root)
    limit = DEFAULT_MAX_TOKENS if max_caption_tokens is None else max_caption_tokens
    opts = _Options(max_file_mb, min_resolution, max_aspect, limit, tokenizer, instance_prompt)
    checker = _Checker(root, opts)
    entries, checker.problems = walk(root)
    metadata, meta_problems = read_metadata(root)
    checker.problems += meta_problems
    images = [p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS and is_regular(p)]
    images, mask_files, links = split_masks(images, masks_in)  # a mask is never a training image
    checker.mask_files = {p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS and is_mask_file(p, masks_in)}
    for link in links if masks_in is not None and not inside(masks_in, root) else []:  # (inside: the walk's)
        checker.add(link, "error", "symlink", "symbolic link in the mask folder (refused, not followed)")
    checker.refs = find_references(root, images, set(metadata))
    checker.problems += [Problem(*found) for found in checker.refs.problems]
    masks = find_masks(root, [p for p in images if p not in checker.refs.files], mask_files, masks_in)
    checker.problems += [Problem(*found) for found in masks.problems]
    for path in tqdm(entries, desc="validate", unit="file", disable=None, leave=False):
        try:
            checker.entry(path, metadata)
        except Exception as e:  # never let one file stop the report
            checker.add(path, "error", "unreadable", f"unexpected {type(e).__name__}: {e}")
    for image, mask in masks.of.items():  # readable, of its image's size, not all black
        for code, why in mask_problems(mask, image, str(mask), checker.rel(image)):
            checker.add(mask, "error", code, why)
    checker.orphans(entries)

    def order(p: Problem) -> tuple[bool, str]:  # by path relative to the root; a mask folder elsewhere after it
        out = not inside(p.path, root)
        return out, str(p.path) if out else p.path.relative_to(root).as_posix() if p.path != root else ""

    problems = sorted(checker.problems, key=order)
    refs = {image: checker.refs.of[image] for image in checker.images if image in checker.refs.of}
    report = Report(root, problems, len(checker.images), references=refs, reference_files=checker.refs.files)
    report.masks = {image: masks.of[image] for image in checker.images if image in masks.of}
    report.mask_files = set(mask_files)
    flagged = {p.path for p in problems}
    report.n_ok = sum(
        image not in flagged
        and (image in metadata or image.with_suffix(CAPTION_SUFFIX) not in flagged)
        and not flagged.intersection(refs.get(image, ()))
        and report.masks.get(image) not in flagged
        for image in checker.images
    )
    return report


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def format_report(report: Report) -> str:
    """One line per problem (`ERROR   path: reason`, paths relative to the root) and a summary line."""
    lines = []
    for p in report.problems:
        lines.append(f"{'ERROR' if p.severity == 'error' else 'WARNING':<7} {report.rel(p.path)}: {p.reason}")
    n_refs = sum(map(len, report.references.values()))
    lines.append(
        f"{plural(report.n_images, report.unit)}: {report.n_ok} ok, "
        + (f"{len(report.references)} with references ({plural(n_refs, 'reference image')}), " if n_refs else "")
        + (f"{len(report.masks)} with a loss mask, " if report.masks else "")
        + f"{plural(report.n_errors, 'error')}, {plural(report.n_warnings, 'warning')}"
        + (f"; {report.advice}" if report.advice and report.has_errors else "")
    )
    return "\n".join(lines)


def is_cache(root: str | os.PathLike[str]) -> bool:
    """True for a cache folder (it has an index.json), which `data validate` checks as a cache."""
    return (Path(root) / "index.json").is_file()


def validate_cache(root: str | os.PathLike[str]) -> Report:
    """Check a cache folder against its index.json in full: one Problem (shard, sample, reason) per mismatch."""
    from .cache import audit_cache, rebuild_hint

    path = dataset_root(root)
    problems, listed, ok = audit_cache(path)
    report = Report(root=path, n_images=listed, n_ok=ok, unit="sample", absolute=True)
    for p in problems:
        reason = p.reason if p.key is None else f"sample {p.key!r}: {p.reason}"
        report.problems.append(Problem(path / p.file, "error", "corrupt-cache", reason))
    report.advice = f"the cache is corrupt: {rebuild_hint(path)}"
    return report
