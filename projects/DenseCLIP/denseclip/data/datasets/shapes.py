"""A generated toy dataset of coloured shapes for detection, instance and semantic segmentation.

Each image is ``image_size`` x ``image_size`` (PNG) and shows 1-4 filled shapes of the classes in
``SHAPE_CLASSES`` on a solid or linear-gradient background, sometimes with light noise. Objects
may overlap partially (later ones are drawn on top, and each keeps at least ``MIN_VISIBLE`` of its
area visible); an annotation describes the visible part of its object: ``bbox`` (XYWH, pixels)
and ``area`` come from the visible mask, and ``segmentation`` is a list of polygons that
rasterizes back to that mask. A ring's hole is joined to its outline by a zero-width slit, so
every segmentation is a polygon and Detectron2's default ``INPUT.MASK_FORMAT="polygon"`` works.
Each image also has a semantic label map (PNG, one uint8 class index per pixel): the visible part
of each object holds its class's index in ``SHAPE_CLASSES``, every other pixel ``BACKGROUND``, the
index of the class "background" in ``SEM_SEG_CLASSES``. The same parameters and seed always give
byte-identical files.

Layout written by :func:`generate_shapes_dataset`::

    root/train/00000.png ...
    root/val/00000.png ...
    root/annotations/instances_train.json
    root/annotations/instances_val.json
    root/sem_seg/train/00000.png ...   # label maps, same file names as the images
    root/sem_seg/val/00000.png ...
    root/done.json      # the generation parameters, written last

Importing this module registers "shapes_train" and "shapes_val" (COCO format) and
"shapes_sem_seg_train" and "shapes_sem_seg_val" (semantic segmentation, evaluated by
``SemSegEvaluator``) under ``$DETECTRON2_DATASETS/shapes`` (default ``datasets/shapes``);
:func:`register_shapes` and :func:`register_shapes_sem_seg` register other roots, sizes or names.
Both views share the files. Registering generates nothing: the first ``DatasetCatalog.get``
calls :func:`prepare_shapes`, which returns at once when ``done.json`` records the requested
parameters and otherwise (re)generates the files under a file lock, so concurrent processes are
safe. ``COCOEvaluator`` reads ``MetadataCatalog.get(name).json_file`` itself, so call
:func:`ensure_shapes_dataset` before building an evaluator for a dataset not loaded yet.

Command line: ``denseclip-shapes --output DIR`` (see ``--help``).
"""
import argparse
import collections
import functools
import json
import math
import os
import shutil
import time

import cv2
import numpy as np
from iopath.common.file_io import file_lock

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_sem_seg

# Single CLIP BPE tokens, so each name fits a prompt of 5 positions.
SHAPE_CLASSES = ("circle", "square", "triangle", "star", "ring")
# The semantic-segmentation classes: the shapes (label = detection category index) and "background".
# Background is a real class rather than ignored (unlike ADE20K's unannotated "other", which the
# release ignores): here every background pixel is known, and telling shapes from the background is
# half of the task. Ignoring it would leave the model free to paint the whole image with shape
# classes, so its predicted label maps and "background"-free score maps would say little, and the
# mIoU would only measure which shape a shape pixel is. "background" is one CLIP BPE token too.
SEM_SEG_CLASSES = SHAPE_CLASSES + ("background",)
BACKGROUND = len(SHAPE_CLASSES)
SEM_SEG_COLORS = ((220, 20, 60), (0, 160, 60), (30, 90, 255), (250, 200, 0), (190, 60, 220), (90, 90, 90))  # RGB
IGNORE_LABEL = 255  # in no generated label map; the value padding and Detectron2's sem-seg heads ignore
SPLITS = ("train", "val")
# Bump when the files change, so that old datasets are regenerated (2: also the label maps).
GENERATOR_VERSION = 2

SIZE_RANGE = (0.12, 0.45)  # diameter of an object's circumscribed circle / image side
STAR_INNER_RATIO = 0.45
RING_INNER_RATIO = 0.55
MIN_VISIBLE = 0.6  # fraction of each object's area that objects drawn later must leave visible
PLACEMENT_TRIES = 30
MIN_CONTRAST = 90.0  # Euclidean RGB distance to (nearly) every pixel an object covers
COLOUR_TRIES = 20
POLYGON_UPSCALE = 4
_FIXED_POINT = 4  # cv2 drawing "shift": coordinates in 1/16 pixel


def default_root() -> str:
    """``$DETECTRON2_DATASETS/shapes``, or ``datasets/shapes``."""
    return os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "shapes")


# ----------------------------------------------------------------------------- drawing


def _fixed(values) -> np.ndarray:
    return np.round(np.asarray(values) * (1 << _FIXED_POINT)).astype(np.int32)


def _polygon_vertices(name: str, center: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """(N, 2) float vertices of a square, triangle or five-pointed star inscribed in the circle."""
    corners, inner = {"square": (4, 1.0), "triangle": (3, 1.0), "star": (10, STAR_INNER_RATIO)}[name]
    k = np.arange(corners)
    radii = np.where(k % 2 == 1, radius * inner, radius)
    theta = angle + 2 * np.pi * k / corners
    return center + radii[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)


def shape_mask(name: str, center: np.ndarray, radius: float, angle: float, size: int) -> np.ndarray:
    """(size, size) bool mask of one filled shape in the circle of ``radius`` around ``center`` (x, y)."""
    mask = np.zeros((size, size), np.uint8)
    if name in ("circle", "ring"):
        cv2.circle(mask, tuple(_fixed(center).tolist()), int(_fixed(radius)), 1, -1, cv2.LINE_8, _FIXED_POINT)
        if name == "ring":
            inner = int(_fixed(radius * RING_INNER_RATIO))
            cv2.circle(mask, tuple(_fixed(center).tolist()), inner, 0, -1, cv2.LINE_8, _FIXED_POINT)
    else:
        cv2.fillPoly(mask, [_fixed(_polygon_vertices(name, center, radius, angle))], 1, cv2.LINE_8, _FIXED_POINT)
    return mask.astype(bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) uint8: a solid colour or a linear gradient, half the time with light noise."""
    start, end = rng.uniform(0, 255, (2, 3))
    if rng.random() < 0.5:
        end = start
    direction = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[:size, :size]
    t = xs * math.cos(direction) + ys * math.sin(direction)
    t = (t - t.min()) / (t.max() - t.min())
    image = start + t[..., None] * (end - start)
    if rng.random() < 0.5:
        image = image + rng.normal(0, rng.uniform(2, 8), image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _pick_colour(rng: np.random.Generator, covered: np.ndarray) -> np.ndarray:
    """A random colour far from 95% of the ``covered`` (N, 3) pixels, or the best of a few tries."""
    best, best_contrast = None, -1.0
    for _ in range(COLOUR_TRIES):
        colour = rng.integers(0, 256, 3)
        contrast = np.percentile(np.linalg.norm(covered - colour.astype(float), axis=1), 5)
        if contrast >= MIN_CONTRAST:
            return colour
        if contrast > best_contrast:
            best, best_contrast = colour, contrast
    return best


def _sample_mask(rng: np.random.Generator, category: int, size: int) -> np.ndarray:
    """(size, size) bool mask of a shape of random size, position and angle, fully inside the image."""
    radius = rng.uniform(*SIZE_RANGE) * size / 2
    center = rng.uniform(radius, size - 1 - radius, 2)
    angle = rng.uniform(0, 2 * np.pi)
    return shape_mask(SHAPE_CLASSES[category], center, radius, angle, size)


def _place_object(rng, size, objects, full_areas) -> tuple[int, np.ndarray] | None:
    """Rejection-samples an object that leaves ``MIN_VISIBLE`` of each earlier one visible."""
    # The class is drawn once, outside the retries, so that classes stay balanced.
    category = int(rng.integers(len(SHAPE_CLASSES)))
    for _ in range(PLACEMENT_TRIES):
        mask = _sample_mask(rng, category, size)
        if all((visible & ~mask).sum() >= MIN_VISIBLE * area for (_, visible), area in zip(objects, full_areas)):
            return category, mask
    return None


def render_image(
    rng: np.random.Generator, size: int, min_objects: int = 1, max_objects: int = 4
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image: ((size, size, 3) uint8 BGR, [(category index, (size, size) bool visible mask)])."""
    image = _background(rng, size)
    objects, full_areas = [], []
    for _ in range(rng.integers(min_objects, max_objects + 1)):
        placed = _place_object(rng, size, objects, full_areas)
        if placed is None:
            continue
        category, mask = placed
        image[mask] = _pick_colour(rng, image[mask].astype(float))
        for _, visible in objects:
            visible &= ~mask
        objects.append((category, mask.copy()))
        full_areas.append(int(mask.sum()))
    if len(objects) < min_objects:
        raise RuntimeError(f"could not place {min_objects} objects in a {size}x{size} image; lower min_objects")
    return image, objects


# ----------------------------------------------------------------------------- annotations


def _signed_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _join_hole(outline: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """One (N, 2) polygon: ``outline``, a slit to the closest hole vertex, the hole reversed, back."""
    if (_signed_area(hole) > 0) == (_signed_area(outline) > 0):
        hole = hole[::-1]
    distances = ((outline[:, None] - hole[None]) ** 2).sum(-1)
    i, j = np.unravel_index(distances.argmin(), distances.shape)
    hole = np.roll(hole, -j, axis=0)
    return np.concatenate([outline[: i + 1], hole, hole[:1], outline[i:]])


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` that pycocotools rasterizes back to ``mask``.

    Contours are traced on a nearest-upscaled copy so that vertices lie (within 1/8 px) on pixel
    edges rather than on the centres of boundary pixels, which would shrink each object.
    """
    upscaled = cv2.resize(mask.astype(np.uint8), None, fx=POLYGON_UPSCALE, fy=POLYGON_UPSCALE,
                          interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(upscaled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    contours = [(c.reshape(-1, 2) + 0.5) / POLYGON_UPSCALE for c in contours]
    polygons = []
    for index, (_, _, child, parent) in enumerate(hierarchy[0]):
        if parent != -1:
            continue
        outline = contours[index]
        while child != -1:
            outline = _join_hole(outline, contours[child])
            child = hierarchy[0][child][0]
        polygons.append(outline.ravel().tolist())
    return polygons


def _annotation(mask: np.ndarray) -> dict:
    """bbox [x, y, w, h], area and polygon segmentation of a non-empty bool mask."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    bbox = [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
    return {"bbox": bbox, "area": int(mask.sum()), "segmentation": mask_to_polygons(mask), "iscrowd": 0}


# ----------------------------------------------------------------------------- files


def label_map(objects: list[tuple[int, np.ndarray]], size: int) -> np.ndarray:
    """(size, size) uint8 semantic labels of :func:`render_image`'s objects (their visible masks)."""
    labels = np.full((size, size), BACKGROUND, np.uint8)
    for category, visible in objects:
        labels[visible] = category
    return labels


def _generate_split(output_dir: str, split: str, num_images: int, image_size: int, seed: int,
                    min_objects: int, max_objects: int) -> dict:
    """Writes ``output_dir/split/*.png`` and ``output_dir/sem_seg/split/*.png``; returns the split's COCO dict."""
    image_dir, label_dir = os.path.join(output_dir, split), _label_dir(output_dir, split)
    os.makedirs(image_dir)
    os.makedirs(label_dir)
    images, annotations = [], []
    for index in range(num_images):
        # One generator per image, so that each image depends only on (seed, split, index).
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        image, objects = render_image(rng, image_size, min_objects, max_objects)
        file_name = f"{index:05d}.png"
        cv2.imwrite(os.path.join(image_dir, file_name), image)
        cv2.imwrite(os.path.join(label_dir, file_name), label_map(objects, image_size))
        images.append({"id": index + 1, "file_name": file_name, "height": image_size, "width": image_size})
        for category, mask in objects:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": index + 1, "category_id": category + 1, **_annotation(mask)}
            )
    return {
        "info": {"description": "DenseCLIP toy shapes", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES)],
    }


def _parameters(num_train, num_val, image_size, seed, min_objects, max_objects) -> dict:
    return {"version": GENERATOR_VERSION, "num_train": num_train, "num_val": num_val, "image_size": image_size,
            "seed": seed, "min_objects": min_objects, "max_objects": max_objects}


def _marker(root: str) -> str:
    return os.path.join(root, "done.json")


def _json_file(root: str, split: str) -> str:
    return os.path.join(root, "annotations", f"instances_{split}.json")


def _label_dir(root: str, split: str) -> str:
    return os.path.join(root, "sem_seg", split)


def generate_shapes_dataset(output_dir: str, num_train: int = 600, num_val: int = 100, image_size: int = 128,
                            seed: int = 0, min_objects: int = 1, max_objects: int = 4) -> dict[str, str]:
    """Writes the dataset under ``output_dir`` (replacing an earlier one); returns {split: json path}."""
    parameters = _parameters(num_train, num_val, image_size, seed, min_objects, max_objects)
    if os.path.exists(_marker(output_dir)):
        os.remove(_marker(output_dir))
    for folder in (*SPLITS, "annotations", "sem_seg"):
        shutil.rmtree(os.path.join(output_dir, folder), ignore_errors=True)
    os.makedirs(os.path.join(output_dir, "annotations"))
    json_files = {}
    for split, num_images in zip(SPLITS, (num_train, num_val)):
        coco = _generate_split(output_dir, split, num_images, image_size, seed, min_objects, max_objects)
        json_files[split] = _json_file(output_dir, split)
        with open(json_files[split], "w") as f:
            json.dump(coco, f)
    with open(_marker(output_dir), "w") as f:
        json.dump(parameters, f)
    return json_files


def _is_done(root: str, parameters: dict) -> bool:
    try:
        with open(_marker(root)) as f:
            return json.load(f) == parameters
    except (OSError, ValueError):
        return False


def prepare_shapes(root: str, num_train: int = 600, num_val: int = 100, image_size: int = 128, seed: int = 0,
                   min_objects: int = 1, max_objects: int = 4) -> None:
    """Generates the dataset under ``root`` unless ``root/done.json`` already records these parameters."""
    parameters = _parameters(num_train, num_val, image_size, seed, min_objects, max_objects)
    if _is_done(root, parameters):
        return
    with file_lock(os.path.join(root, "generate")):  # another process may be generating the same files
        if not _is_done(root, parameters):
            generate_shapes_dataset(root, num_train, num_val, image_size, seed, min_objects, max_objects)


# ----------------------------------------------------------------------------- Detectron2


def _load_shapes(root: str, split: str, name: str, options: dict) -> list[dict]:
    """Detectron2 dicts of one split, generating the files first if needed."""
    prepare_shapes(root, **options)
    return load_coco_json(_json_file(root, split), os.path.join(root, split), name)


def _load_shapes_sem_seg(root: str, split: str, options: dict) -> list[dict]:
    """Detectron2 sem-seg dicts (file_name, sem_seg_file_name) of one split, generating the files first if needed."""
    prepare_shapes(root, **options)
    return load_sem_seg(_label_dir(root, split), os.path.join(root, split), gt_ext="png", image_ext="png")


def register_shapes(root: str | None = None, num_train: int = 600, num_val: int = 100, image_size: int = 128,
                    seed: int = 0, prefix: str = "shapes") -> tuple[str, str]:
    """Registers ``{prefix}_train`` and ``{prefix}_val`` without generating anything; returns their names."""
    root = root or default_root()
    options = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}
    names = []
    for split in SPLITS:
        name, json_file, image_root = f"{prefix}_{split}", _json_file(root, split), os.path.join(root, split)
        DatasetCatalog.register(name, functools.partial(_load_shapes, root, split, name, options))
        MetadataCatalog.get(name).set(
            thing_classes=list(SHAPE_CLASSES),
            # what load_coco_json would set; known before loading, for evaluators built first
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SHAPE_CLASSES))},
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            shapes_root=root,
            shapes_options=options,
        )
        names.append(name)
    return tuple(names)


def register_shapes_sem_seg(root: str | None = None, num_train: int = 600, num_val: int = 100,
                            image_size: int = 128, seed: int = 0, prefix: str = "shapes_sem_seg") -> tuple[str, str]:
    """Registers the label maps as ``{prefix}_train`` and ``{prefix}_val`` (Detectron2 sem-seg datasets
    with stuff_classes = ``SEM_SEG_CLASSES``) without generating anything; returns their names. The
    same arguments as :func:`register_shapes` share its files."""
    root = root or default_root()
    options = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}
    names = []
    for split in SPLITS:
        name = f"{prefix}_{split}"
        DatasetCatalog.register(name, functools.partial(_load_shapes_sem_seg, root, split, options))
        MetadataCatalog.get(name).set(
            stuff_classes=list(SEM_SEG_CLASSES),
            stuff_colors=[list(c) for c in SEM_SEG_COLORS],
            ignore_label=IGNORE_LABEL,
            evaluator_type="sem_seg",
            image_root=os.path.join(root, split),
            sem_seg_root=_label_dir(root, split),
            shapes_root=root,
            shapes_options=options,
        )
        names.append(name)
    return tuple(names)


def ensure_shapes_dataset(dataset_name: str) -> None:
    """Generates the files behind a dataset registered by :func:`register_shapes`, if missing.

    Call it before building a ``COCOEvaluator`` for a dataset that has not been loaded yet (also
    works for the datasets of :func:`register_shapes_sem_seg`).
    """
    metadata = MetadataCatalog.get(dataset_name)
    prepare_shapes(metadata.shapes_root, **metadata.shapes_options)


if "shapes_train" not in DatasetCatalog.list():
    register_shapes()
    register_shapes_sem_seg()


# ----------------------------------------------------------------------------- command line


def _instance_counts(json_file: str) -> dict[str, int]:
    with open(json_file) as f:
        coco = json.load(f)
    counts = collections.Counter(a["category_id"] for a in coco["annotations"])
    return {name: counts[i + 1] for i, name in enumerate(SHAPE_CLASSES)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="denseclip-shapes",
        description="Generate the toy shapes dataset (COCO-format annotations and semantic label maps).")
    parser.add_argument("--output", default=default_root(), help="dataset root (default: %(default)s)")
    parser.add_argument("--num-train", type=int, default=600, help="training images (default: %(default)s)")
    parser.add_argument("--num-val", type=int, default=100, help="validation images (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    json_files = generate_shapes_dataset(args.output, args.num_train, args.num_val, args.image_size, args.seed)
    print(f"Generated in {time.perf_counter() - start:.1f} s under {os.path.abspath(args.output)}")
    for split, json_file in json_files.items():
        counts = _instance_counts(json_file)
        print(f"{split}: images in {os.path.join(args.output, split)}, annotations in {json_file}, "
              f"label maps in {_label_dir(args.output, split)}")
        print(f"  {sum(counts.values())} instances: " + ", ".join(f"{name} {n}" for name, n in counts.items()))

