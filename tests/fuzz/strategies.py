"""Hypothesis strategies for the fuzzer: recipes, overrides and small image folders.

Values are drawn around what users write (the schema's own keys and types) and past it:
out-of-range numbers, NaN/inf, huge integers, wrong types, typos in keys, strings with
NUL, `${...}`, `..` and slashes, YAML aliases; image files in odd modes (16-bit, CMYK,
palette, 1x1, zero bytes, truncated, another format under a .jpg name).
"""

from __future__ import annotations

import io
import string
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hypothesis import strategies as st
from PIL import Image

from ffdist import recipe_load

KEYS = sorted(recipe_load.leaf_types())
SECTIONS = sorted({k.split(".")[0] for k in KEYS if "." in k})

# ------------------------------------------------------------------ values

weird_text = st.sampled_from([
    "", " ", "..", ".", "/", "a/b", "../../etc", "/tmp/x", "\x00", "a\x00b", "${oc.env:HOME}",
    "${name}", "${nope}", "${oc.decode:'1'}", "\\${x}", "~", "-", "null", "true", "[", "{",
    "é", "💥", "x" * 300, "1e-3", "0x10", "inf", "nan", "*a", "&a", "!!str", "!!python/name:os",
    "\t", "\n", "a:b", "a=b", "%", "\\",
])
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-10, max_value=10),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-2.0, max_value=2.0),
    st.text(alphabet=string.printable, max_size=12),
    weird_text,
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


def keys() -> st.SearchStrategy[str]:
    """Real dotted keys mostly; sometimes a typo, a section alone, or nonsense."""
    def typo(k: str) -> st.SearchStrategy[str]:
        return st.sampled_from([k + "s", k[:-1], k.replace(".", "_"), k.upper(), "." + k,
                                k + ".x", k.replace(".", "..")])
    real = st.sampled_from(KEYS)
    return st.one_of(real, real, real, real.flatmap(typo), st.sampled_from(SECTIONS),
                     st.text(alphabet=string.ascii_letters + "._[]0", max_size=12))


def render(value: Any) -> str:
    """A value as a user types it after `key=`."""
    if isinstance(value, str):
        return value
    try:
        return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    except Exception:
        return str(value)


@st.composite
def overrides(draw: st.DrawFn, max_size: int = 5) -> list[str]:
    items = []
    rnd = draw(st.randoms(use_true_random=True))
    for _ in range(draw(st.integers(0, max_size))):
        if rnd.random() < 0.1:
            items.append(draw(st.sampled_from(["lr", "=1", "optim.lr", "a==b", " = "])))
        else:
            items.append(f"{draw(keys())}={render(draw(values))}")
    return items


@st.composite
def recipe_dicts(draw: st.DrawFn) -> dict:
    """A nested mapping shaped like a recipe: sections of keys, some of them wrong."""
    raw: dict = {}
    for key in draw(st.lists(keys(), max_size=8)):
        value = draw(values)
        node = raw
        *path, last = key.split(".")
        for part in path:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = node[part] = {}
            node = nxt
        node[last] = value
    return raw


@st.composite
def recipe_texts(draw: st.DrawFn) -> str:
    """YAML text: a dumped recipe dict, then maybe mutated (characters dropped, duplicated,
    replaced), with anchors and aliases, or duplicated sections."""
    text = yaml.safe_dump(draw(recipe_dicts()), sort_keys=False, allow_unicode=True)
    mutation = draw(st.integers(0, 5))
    if mutation == 1 and text:
        i = draw(st.integers(0, len(text) - 1))
        text = text[:i] + draw(st.sampled_from(["", ":", "[", "&a ", "*a", "\n  ", "!!", "\t",
                                                "{", "'", "\x00"])) + text[i + 1:]
    elif mutation == 2:
        text += text  # every key twice
    elif mutation == 3:
        n = draw(st.integers(1, 12))
        text = "a0: &a0 [1, 2]\n" + "".join(
            f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}]\n" for i in range(1, n)) + text
    elif mutation == 4:
        text = "name: " + "[" * draw(st.integers(1, 60)) + "\n" + text
    return text


# ------------------------------------------------------------------ images

def _png16(color_type: int, channels: int, size: tuple[int, int],
           claimed: tuple[int, int] | None = None) -> bytes:
    """A 16-bit PNG of `size` pixels whose header says `claimed` (default: `size`)."""
    w, h = size
    rows = b"".join(b"\x00" + np.full(w * channels, 40000).astype(">u2").tobytes()
                    for _ in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", *(claimed or size), 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


KINDS = ("rgb_jpg", "grey_png", "rgb_png", "g16_png", "rgb16_png", "rgba16_png", "cmyk_jpg",
         "palette_png", "la_png", "rgba_png", "bilevel_png", "gif_as_jpg", "webp_as_jpg",
         "tiff_as_png", "zero_bytes", "truncated_jpg", "text_as_png", "animated_gif",
         "huge_header_png")
"""huge_header_png: a header that claims 60000x60000 pixels over a few bytes of data (an
image bomb: refused from the header, data.max_image_pixels, before anything is allocated)."""


def image_bytes(kind: str, size: tuple[int, int], seed: int) -> bytes:
    rgb = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    buf = io.BytesIO()
    if kind == "rgb_jpg":
        img.save(buf, "JPEG")
    elif kind == "grey_png":
        img.convert("L").save(buf, "PNG")
    elif kind == "rgb_png":
        img.save(buf, "PNG")
    elif kind == "g16_png":
        Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(buf, "PNG")
    elif kind == "rgb16_png":
        return _png16(2, 3, size)
    elif kind == "rgba16_png":
        return _png16(6, 4, size)
    elif kind == "cmyk_jpg":
        img.convert("CMYK").save(buf, "JPEG")
    elif kind == "palette_png":
        img.convert("P").save(buf, "PNG", transparency=0)
    elif kind == "la_png":
        img.convert("LA").save(buf, "PNG")
    elif kind == "rgba_png":
        img.convert("RGBA").save(buf, "PNG")
    elif kind == "bilevel_png":
        img.convert("1").save(buf, "PNG")
    elif kind == "gif_as_jpg":
        img.save(buf, "GIF")
    elif kind == "animated_gif":
        img.save(buf, "GIF", save_all=True, append_images=[img.rotate(90)])
    elif kind == "webp_as_jpg":
        img.save(buf, "WEBP")
    elif kind == "tiff_as_png":
        img.save(buf, "TIFF")
    elif kind == "zero_bytes":
        return b""
    elif kind == "truncated_jpg":
        img.save(buf, "JPEG")
        return buf.getvalue()[: max(1, len(buf.getvalue()) // 3)]
    elif kind == "text_as_png":
        return b"this is not an image\n"
    elif kind == "huge_header_png":
        return _png16(2, 3, (1, 1), claimed=(60000, 60000))
    return buf.getvalue()


SUFFIX = {"jpg": ".jpg", "png": ".png", "gif": ".gif", "bytes": ".jpg"}

sizes = st.tuples(st.sampled_from([1, 2, 3, 8, 13]), st.sampled_from([1, 2, 8, 11]))
image_files = st.tuples(st.sampled_from(KINDS), sizes, st.integers(0, 2**16))


def write_image(path_without_suffix: Path, spec: tuple[str, tuple[int, int], int]) -> Path:
    kind, size, seed = spec
    path = path_without_suffix.with_suffix(SUFFIX.get(kind.rsplit("_", 1)[-1], ".png"))
    path.write_bytes(image_bytes(kind, size, seed))
    return path


@st.composite
def image_folders(draw: st.DrawFn) -> dict[str, dict[str, list]]:
    """{split: {class name: [image spec, ...]}} for an imagefolder; sometimes an empty class,
    a class only in one split, or no val/ at all."""
    # Hypothesis favours small values (0 most of all); the mix of layouts is chosen with a
    # plain Random seeded by it instead, so that 1 in 10 really means 1 in 10.
    rnd = draw(st.randoms(use_true_random=True))
    classes = draw(st.lists(st.sampled_from(["0", "1", "cat", "dog", "é", "a b"]),
                            min_size=1 if rnd.random() < 0.1 else 2, max_size=3, unique=True))
    layout: dict[str, dict[str, list]] = {}
    for split in ("train", "val"):
        if split == "val" and rnd.random() < 0.1:
            continue
        names = list(classes)
        if rnd.random() < 0.1:
            names = names[:-1] or names
        layout[split] = {c: draw(st.lists(image_files, min_size=0 if rnd.random() < 0.1 else 1,
                                          max_size=4)) for c in names}
    return layout


def write_folder(root: Path, layout: dict[str, dict[str, list]]) -> Path:
    for split, classes in layout.items():
        for name, specs in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, spec in enumerate(specs):
                write_image(folder / f"img{i}", spec)
    return root
