"""Evaluate a version's out-of-distribution gate: test-split acceptance, rejection per OOD kind.

    python -m bench.ood --version-dir MODEL_DIR/N --dataset DATA_ROOT [--limit 60] [--out F.json]

In-distribution: the dataset's test split (never used to choose the threshold). Out of
distribution, nothing downloaded:

- ``photo``: the sample photographs shipped inside scikit-image (``skimage/data/*.png|jpg``,
  read as files when the package is installed; scikit-image is not a dependency: without it the
  kind is skipped and said so),
- ``noise``, ``gradient``, ``flat``, ``text``, ``document``, ``screenshot``: generated (numpy,
  Pillow),
- ``xray_rot90``, ``xray_rot180``, ``xray_crop`` (a random 1/4-side crop), ``xray_tile2x2``: the
  test split's chest X-rays made into what a frontal chest X-ray is not.

Every image goes through the service's own intake (``ml.imaging.decode_image`` for files,
``to_model_input``) and one batched ``Classifier.predict_scored`` call per 32 images, as in the
worker. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ml.imaging import decode_image, to_model_input

Gray = np.ndarray  # 2-D uint8
SIDE = 256
PHOTO_SUFFIXES = (".png", ".jpg")
# skimage/data files that are not photographs of a scene (tiny test patterns, masks).
PHOTO_SKIP = {"chessboard_GRAY.png", "chessboard_RGB.png", "microaneurysms.png", "phantom.png"}


def photo_folder() -> Path | None:
    """scikit-image's bundled ``data`` folder, found without importing the package."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def photos(folder: Path | None = None) -> tuple[list[Gray], str | None]:
    """The sample photographs of ``folder`` (default: scikit-image's), or ``([], why)``."""
    folder = folder or photo_folder()
    if folder is None or not folder.is_dir():
        return [], "no scikit-image sample photos (install scikit-image, or --photos DIR)"
    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix in PHOTO_SUFFIXES and path.name not in PHOTO_SKIP:
            try:
                out.append(decode_image(path.read_bytes()))
            except Exception:  # a file the intake refuses is not an evaluation case
                continue
    return out, None


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _words(rng: np.random.Generator, n: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join(
        "".join(rng.choice(list(letters), rng.integers(2, 9))) for _ in range(n)
    ).capitalize()


def generated(kind: str, n: int, seed: int = 0) -> list[Gray]:
    """``n`` generated images of one kind (seeded)."""
    rng = np.random.default_rng(seed)
    out: list[Gray] = []
    for i in range(n):
        if kind == "noise":
            if i % 2:
                img = rng.integers(0, 256, (SIDE, SIDE))
            else:
                img = np.clip(rng.normal(128, rng.uniform(10, 60), (SIDE, SIDE)), 0, 255)
            out.append(img.astype(np.uint8))
        elif kind == "flat":
            out.append(np.full((SIDE, SIDE), int(rng.integers(0, 256)), np.uint8))
        elif kind == "gradient":
            yy, xx = np.mgrid[0:SIDE, 0:SIDE] / (SIDE - 1)
            if i % 2:
                angle = rng.uniform(0, 2 * np.pi)
                g = np.cos(angle) * xx + np.sin(angle) * yy
            else:
                cx, cy = rng.uniform(0, 1, 2)
                g = np.hypot(xx - cx, yy - cy)
            g = (g - g.min()) / (np.ptp(g) or 1)
            out.append((g * 255).astype(np.uint8))
        elif kind in ("text", "document", "screenshot"):
            out.append(_drawn(kind, rng))
        else:
            raise ValueError(kind)
    return out


def _drawn(kind: str, rng: np.random.Generator) -> Gray:
    """Text on a plain background, a document page, or a UI-like screenshot (Pillow)."""
    if kind == "text":
        bg = int(rng.choice([0, 255]))
        img = Image.new("L", (SIDE, SIDE), bg)
        draw = ImageDraw.Draw(img)
        for row in range(int(rng.integers(1, 5))):
            draw.text((10, 20 + row * 55), _words(rng, 2), fill=255 - bg, font=_font(28))
    elif kind == "document":
        img = Image.new("L", (SIDE * 3 // 4, SIDE), 250)  # portrait, like a page
        draw = ImageDraw.Draw(img)
        draw.text((12, 8), _words(rng, 3), fill=0, font=_font(16))
        y = 34
        while y < SIDE - 12:
            draw.text((12, y), _words(rng, 5), fill=30, font=_font(9))
            y += 12
    else:
        img = Image.new("L", (SIDE * 4 // 3, SIDE), int(rng.integers(200, 250)))
        draw = ImageDraw.Draw(img)
        draw.rectangle((0, 0, img.width, 22), fill=int(rng.integers(40, 90)))
        draw.text((6, 5), _words(rng, 3), fill=255, font=_font(12))
        draw.rectangle((0, 22, 60, img.height), fill=int(rng.integers(150, 200)))
        for j in range(6):
            draw.text((6, 30 + j * 20), _words(rng, 1), fill=20, font=_font(10))
        for j in range(int(rng.integers(2, 5))):
            x0, y0 = 70 + j * 45, int(rng.integers(40, 200))
            draw.rounded_rectangle((x0, y0, x0 + 40, y0 + 18), 4, fill=int(rng.integers(60, 140)))
        for j in range(8):
            draw.text((70, 40 + j * 14), _words(rng, 4), fill=40, font=_font(10))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return decode_image(buffer.getvalue())


def transformed(xrays: list[Gray], kind: str, seed: int = 0) -> list[Gray]:
    """The chest X-rays turned into what a frontal chest X-ray is not."""
    rng = np.random.default_rng(seed)
    out = []
    for img in xrays:
        if kind == "xray_rot90":
            out.append(np.ascontiguousarray(np.rot90(img, 1 if rng.random() < 0.5 else -1)))
        elif kind == "xray_rot180":
            out.append(np.ascontiguousarray(np.rot90(img, 2)))
        elif kind == "xray_crop":
            h, w = img.shape
            ch, cw = max(8, h // 4), max(8, w // 4)
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            out.append(np.ascontiguousarray(img[y : y + ch, x : x + cw]))
        elif kind == "xray_tile2x2":
            half = np.asarray(
                Image.fromarray(img).resize(
                    (img.shape[1] // 2, img.shape[0] // 2), Image.Resampling.BILINEAR
                )
            )
            out.append(np.ascontiguousarray(np.block([[half, half], [half, half]])))
        else:
            raise ValueError(kind)
    return out


GENERATED_KINDS = ("noise", "flat", "gradient", "text", "document", "screenshot")
XRAY_KINDS = ("xray_rot90", "xray_rot180", "xray_crop", "xray_tile2x2")


def test_xrays(dataset_root: Path, limit: int | None, seed: int = 0) -> list[Gray]:
    """Images of the dataset's test split (a seeded sample of ``limit`` when given)."""
    files = sorted(p for p in (dataset_root / "test").glob("*/*") if p.is_file())
    if limit is not None and len(files) > limit:
        rng = np.random.default_rng(seed)
        files = [files[i] for i in sorted(rng.choice(len(files), limit, replace=False))]
    return [decode_image(p.read_bytes()) for p in files]


def _batches(images: list[Gray], size: int, n: int = 32) -> Iterator[np.ndarray]:
    for i in range(0, len(images), n):
        yield np.stack([to_model_input(img, size) for img in images[i : i + n]])


def evaluate(
    classifier: Any,
    dataset_root: Path,
    limit: int | None = 60,
    per_generated: int = 20,
    progress: Callable[[str], None] | None = None,
    photo_dir: Path | None = None,
) -> dict[str, Any]:
    """Acceptance on the test split and rejection per OOD kind, for a gated classifier."""
    gate = classifier.gate
    if gate is None:
        raise ValueError("this version has no out-of-distribution gate (gate: none)")

    def refused(images: list[Gray]) -> list[bool]:
        flags: list[bool] = []
        for x in _batches(images, classifier.input_size):
            _, scores = classifier.predict_scored(x)
            flags += [bool(f) for f in gate.refuses(scores)]
        return flags

    xrays = test_xrays(dataset_root, limit)
    kinds: dict[str, list[Gray]] = {}
    photo_images, photo_note = photos(photo_dir)
    if photo_images:
        kinds["photo"] = photo_images
    for kind in GENERATED_KINDS:
        kinds[kind] = generated(kind, per_generated)
    for kind in XRAY_KINDS:
        kinds[kind] = transformed(xrays, kind)
    started = time.perf_counter()
    in_dist = refused(xrays)
    rows = {}
    for kind, images in kinds.items():
        flags = refused(images)
        rows[kind] = {"n": len(flags), "rejected": sum(flags), "rate": sum(flags) / len(flags)}
        if progress:
            progress(f"{kind}: {rows[kind]['rejected']}/{rows[kind]['n']}")
    total = sum(r["n"] for r in rows.values())
    rejected = sum(r["rejected"] for r in rows.values())
    return {
        "version": classifier.version,
        "input_size": classifier.input_size,
        "method": gate.method,
        "threshold": gate.threshold,
        "target_acceptance": gate.acceptance,
        "test_split": {
            "n": len(in_dist),
            "accepted": len(in_dist) - sum(in_dist),
            "acceptance": 1 - sum(in_dist) / len(in_dist),
        },
        "ood": rows,
        "ood_overall": {"n": total, "rejected": rejected, "rate": rejected / total},
        "photo_note": photo_note,
        "seconds": round(time.perf_counter() - started, 1),
    }


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    t = report["test_split"]
    lines = [
        f"version {report['version']} ({report['input_size']} px), {report['method']} gate, "
        f"threshold {report['threshold']:.1f} (val acceptance target "
        f"{report['target_acceptance']:.0%})",
        "",
        "| images | n | refused | rate |",
        "|---|---|---|---|",
        f"| test split (in-distribution; accepted) | {t['n']} | {t['n'] - t['accepted']} | "
        f"accepted {t['acceptance']:.1%} |",
    ]
    for kind, r in report["ood"].items():
        lines.append(f"| {kind} | {r['n']} | {r['rejected']} | {r['rate']:.1%} |")
    o = report["ood_overall"]
    lines.append(f"| **all out-of-distribution** | {o['n']} | {o['rejected']} | {o['rate']:.1%} |")
    if report.get("photo_note"):
        lines.append(f"\n(photos skipped: {report['photo_note']})")
    return "\n".join(lines)


def gate_cost(input_size: int, batch_sizes: list[int], rounds: int) -> dict[str, Any]:
    """ms per model call without and with the gate (features output + numpy scoring).

    Same compiled-call path as the worker (``Classifier``); the two are timed in alternation,
    round after round, so a neighbour's load on the machine hits both alike. The weights and
    the gate's numbers do not change the cost, so a random-init VGG16 and a random gate are used.
    """
    import keras

    from ml.model import Classifier, build_classifier
    from ml.ood import MahalanobisGate

    keras.utils.set_random_seed(0)
    model = build_classifier(["NORMAL", "PNEUMONIA"], input_size, None)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(512, 512)).astype(np.float32)
    gate = MahalanobisGate(rng.normal(size=(2, 512)).astype(np.float32), a @ a.T, 1e9, 0.99)
    plain, gated = (
        Classifier(model, ["NORMAL", "PNEUMONIA"]),
        Classifier(model, ["NORMAL", "PNEUMONIA"], gate=gate),
    )
    rows = []
    for n in batch_sizes:
        x = rng.uniform(0, 255, (n, input_size, input_size, 1)).astype(np.float32)
        plain.predict_scored(x), gated.predict_scored(x)  # build the kernels of this shape
        times: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(rounds):
            for name, clf in (("off", plain), ("on", gated)):
                t0 = time.perf_counter()
                clf.predict_scored(x)
                times[name].append(time.perf_counter() - t0)
        off, on = (float(np.median(times[k])) * 1000 for k in ("off", "on"))
        t0 = time.perf_counter()
        for _ in range(20):
            gate.score(rng.normal(size=(n, 512)))
        score_ms = (time.perf_counter() - t0) / 20 * 1000
        rows.append({
            "batch_size": n, "ms_off": round(off, 2), "ms_on": round(on, 2),
            "overhead": round(on / off - 1, 4), "numpy_score_ms": round(score_ms, 3),
        })  # fmt: skip
    return {"input_size": input_size, "rounds": rounds, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """Command line: evaluate one version folder's gate."""
    parser = argparse.ArgumentParser(prog="python -m bench.ood", description=__doc__.split("\n")[0])
    parser.add_argument("--version-dir", type=Path, help="MODEL_DIR/<N>")
    parser.add_argument("--dataset", type=Path, help="<root>/{train,val,test}/")
    parser.add_argument(
        "--cost", type=int, metavar="SIZE", help="instead: time the gate's cost at SIZE px"
    )
    parser.add_argument("--rounds", type=int, default=15, help="--cost: timed calls per side")
    parser.add_argument("--limit", type=int, default=None, help="test images used (default all)")
    parser.add_argument("--per-generated", type=int, default=20, help="images per generated kind")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument(
        "--photos", type=Path, help="folder of sample photos (default: scikit-image's data/)"
    )
    args = parser.parse_args(argv)
    if args.cost:
        cost = gate_cost(args.cost, [1, 8, 16], args.rounds)
        for row in cost["rows"]:
            print(json.dumps(row))
        if args.out:
            args.out.write_text(json.dumps(cost, indent=2) + "\n")
        return 0
    if args.version_dir is None or args.dataset is None:
        parser.error("--version-dir and --dataset are required (or --cost SIZE)")

    from ml.versions import load_classifier

    folder = args.version_dir.resolve()
    classifier = load_classifier(folder.parent, int(folder.name))
    report = evaluate(classifier, args.dataset, args.limit, args.per_generated, print, args.photos)
    print(table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
