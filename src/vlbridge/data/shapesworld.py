"""ShapesWorld: deterministic procedural scenes of coloured shapes with captions, VQA and scoring.

Pure numpy + PIL. Every scene is a function of (config seed, split, index), so splits can be
regenerated anywhere instead of being shipped.

Scene
    A plain dark background split into a 3x3 grid; 1..4 objects, at most one per cell, each jittered
    a little inside its cell. An object is (shape, color, size, row, col):
        shape in SHAPES = circle square triangle diamond cross star
        color in COLORS = red green blue yellow purple cyan
        size  in SIZES  = small large
    Geometry used everywhere (captions, VQA, scorer), on grid cells:
        A "left of" B  <=> col(A) < col(B)      A "above" B <=> row(A) < row(B)
        A "right of" B <=> col(A) > col(B)      A "below" B <=> row(A) > row(B)

Caption grammar (canonical; one caption per scene)
    caption  := object (relation object)* "."
    object   := "a" SIZE COLOR SHAPE
    relation := "left of" | "above" | "below"
    Objects are listed left to right (by column), top to bottom inside a column. Each relation
    links an object to the NEXT one in the list:
        same column -> "above";  same row -> "left of";
        different row and column -> "above"/"below" (the list order already implies "left of").
    e.g. "a large red circle left of a small blue square above a small green star."
    The longest caption (4 objects) is 22 words + ".".

VQA (Scene.qa; one question per applicable template, answers are one lowercase word,
numbers are digits "0".."4"). A question is only asked when its answer is unique:
    color     "what color is the {shape}?"              (that shape occurs once)
    shape     "what shape is the {color} object?"       (that color occurs once)
    size      "what size is the {color} {shape}?"       (that pair occurs once)
    count     "how many objects are there?"  "how many {shapes} are there?"
    exist     "is there a {color} {shape}?"             one "yes" and one "no" per scene
    relation  "is the {c} {s} {left of|right of|above|below} the {c} {s}?" one yes + one no, about
              a pair adjacent in the caption (so the caption alone decides it);
              "what shape is {left of|right of} the {c} {s}?" (exactly one such object)

Splits: train / val / test draw scenes from disjoint seed streams AND are disjoint by caption
(crc32(caption) % 100 buckets: train 0-89, val 90-94, test 95-99), so no test caption is ever
trained on. No (color, shape) pair in HELD_OUT appears in their images or texts; the
"compositional" split has at least one HELD_OUT object in every scene.

Contrast groups (contrast_group) are k minimal edits of one base scene (shape, color, size,
position or object count of one object), so an in-batch contrastive loss cannot ignore any
attribute. hard_negative_captions gives captions wrong in exactly one attribute.

Speed: `python -m vlbridge.data.shapesworld` prints scenes generated and images rendered per second
(tests/test_shapesworld.py holds a lower bound).
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLORS = ("red", "green", "blue", "yellow", "purple", "cyan")
SIZES = ("small", "large")
PLURAL = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}  # "crosses"
RGB = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "cyan": (40, 220, 230),
}
# A Latin square: every color and every shape is held out exactly once.
HELD_OUT = frozenset(
    {
        ("red", "triangle"),
        ("green", "star"),
        ("blue", "circle"),
        ("yellow", "cross"),
        ("purple", "square"),
        ("cyan", "diamond"),
    }
)
SPLITS = {"train": 0, "val": 1, "test": 2, "compositional": 3}
_BUCKETS = {"train": range(0, 90), "val": range(90, 95), "test": range(95, 100)}
EDIT_KINDS = ("shape", "color", "size", "position", "count")
QA_KINDS = ("color", "shape", "size", "count", "exist", "relation")
RELATIONS = ("left of", "right of", "above", "below")  # what holds() decides
CONVERSE = {"left of": "right of", "above": "below", "below": "above"}  # of each caption relation
GRID = 3


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    row: int  # grid cell, 0 = top
    col: int  # grid cell, 0 = left
    dx: float = 0.0  # jitter in [-1, 1], scaled by the free space left in the cell
    dy: float = 0.0

    @property
    def name(self) -> str:  # "red circle"
        return f"{self.color} {self.shape}"


class QA(NamedTuple):
    question: str
    answer: str

    @property
    def kind(self) -> str:
        return question_kind(self.question)

    @property
    def yes_no_relation(self) -> bool:
        """ "is the red circle above the blue star?": an XOR of the order and the relation word."""
        return self.kind == "relation" and self.answer in ("yes", "no")


@dataclass
class Scene:
    objects: tuple[Obj, ...]  # canonical (caption) order: by column, then row
    caption: str
    qa: list[QA] = field(default_factory=list)
    edit: str = ""  # for contrast-group members: which EDIT_KINDS made it from the base ("" = base)


@dataclass
class ShapesWorldConfig:
    width: int = 64
    height: int = 64
    min_objects: int = 1
    max_objects: int = 4
    seed: int = 0
    background: tuple[int, int, int] = (32, 32, 32)
    supersample: int = 2  # draw at 2x and box-downsample: anti-aliased edges keep small stars stars
    radius: tuple[float, float] = (0.27, 0.45)  # (small, large) radius as a fraction of a cell side


# ---------------------------------------------------------------------------------------------
# captions and questions


def relation(a: Obj, b: Obj) -> str:
    """The caption relation from a to the next object b (b comes after a in caption order)."""
    if a.col == b.col:
        return "above"
    if a.row == b.row:
        return "left of"
    return "above" if a.row < b.row else "below"


def holds(rel: str, a: Obj, b: Obj) -> bool:
    """Is 'a {rel} b' geometrically true?"""
    return {"left of": a.col < b.col, "right of": a.col > b.col, "above": a.row < b.row, "below": a.row > b.row}[rel]


def _phrase(o: Obj) -> str:
    return f"a {o.size} {o.color} {o.shape}"


def _caption(objs: tuple[Obj, ...], rels: list[str] | None = None) -> str:
    rels = rels if rels is not None else [relation(a, b) for a, b in zip(objs, objs[1:])]
    words = [_phrase(objs[0])]
    for r, o in zip(rels, objs[1:]):
        words += [r, _phrase(o)]
    return " ".join(words) + "."


def object_pieces(scene: Scene) -> list[str]:
    """The caption cut into one piece per object, each with the word(s) that follow it:
    ["a small red star above", ..., "a large blue circle ."]; " ".join gives the caption back."""
    objs = scene.objects
    rels = [relation(a, b) for a, b in zip(objs, objs[1:])] + ["."]
    return [f"{_phrase(o)} {r}" for o, r in zip(objs, rels)]


def question_kind(question: str) -> str:
    q = question.lower()
    if q.startswith("what color"):
        return "color"
    if q.startswith("what size"):
        return "size"
    if q.startswith("how many"):
        return "count"
    if q.startswith("is there"):
        return "exist"
    if q.startswith("what shape is the"):
        return "shape"
    return "relation"  # "is the ... of/above/below the ...?" and "what shape is left of ...?"


def _make_qa(objs: tuple[Obj, ...], rng: np.random.Generator, allow_held_out: bool) -> list[QA]:
    qa: list[QA] = []
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]
    names = [o.name for o in objs]
    pick = lambda xs: xs[int(rng.integers(len(xs)))]

    if uniq := [o for o in objs if shapes.count(o.shape) == 1]:
        o = pick(uniq)
        qa.append(QA(f"what color is the {o.shape}?", o.color))
    if uniq := [o for o in objs if colors.count(o.color) == 1]:
        o = pick(uniq)
        qa.append(QA(f"what shape is the {o.color} object?", o.shape))
    named = [o for o in objs if names.count(o.name) == 1]  # objects "the {color} {shape}" picks out
    if named:
        o = pick(named)
        qa.append(QA(f"what size is the {o.name}?", o.size))

    qa.append(QA("how many objects are there?", str(len(objs))))
    s = pick(shapes) if rng.random() < 0.5 else pick(SHAPES)  # half present, half any (maybe 0)
    qa.append(QA(f"how many {PLURAL[s]} are there?", str(shapes.count(s))))

    o = pick(objs)
    qa.append(QA(f"is there a {o.name}?", "yes"))
    absent = [
        (c, s) for c in COLORS for s in SHAPES if f"{c} {s}" not in names and (allow_held_out or (c, s) not in HELD_OUT)
    ]
    c, s = pick(absent)
    qa.append(QA(f"is there a {c} {s}?", "no"))

    # yes/no relation about a caption-adjacent pair, stated forwards or as its converse
    pairs = [(a, b) for a, b in zip(objs, objs[1:]) if a in named and b in named]
    if pairs:
        a, b = pick(pairs)
        r = relation(a, b)
        conv = CONVERSE[r]
        yes = [(a, r, b), (b, conv, a)]
        no = [(b, r, a), (a, conv, b)]
        for (x, rel, y), ans in ((pick(yes), "yes"), (pick(no), "no")):
            qa.append(QA(f"is the {x.name} {rel} the {y.name}?", ans))
    # open relation question: the unique object left/right of a named object
    cands = []
    for t in named:
        for rel in ("left of", "right of"):
            hits = [o for o in objs if holds(rel, o, t)]
            if len(hits) == 1:
                cands.append((rel, t, hits[0]))
    if cands:
        rel, t, h = pick(cands)
        qa.append(QA(f"what shape is {rel} the {t.name}?", h.shape))
    return qa


def make_scene(objects, rng: np.random.Generator, allow_held_out: bool = False, edit: str = "") -> Scene:
    """Sort objects into caption order and derive the caption and questions."""
    objs = tuple(sorted(objects, key=lambda o: (o.col, o.row)))
    return Scene(objs, _caption(objs), _make_qa(objs, rng, allow_held_out), edit)


# ---------------------------------------------------------------------------------------------
# sampling scenes, splits and contrast groups


def _has_held_out(objs) -> bool:
    return any((o.color, o.shape) in HELD_OUT for o in objs)


def in_split(objs, caption: str, split: str) -> bool:
    if split == "compositional":
        return _has_held_out(objs)
    return not _has_held_out(objs) and zlib.crc32(caption.encode()) % 100 in _BUCKETS[split]


def _random_obj(rng, row: int, col: int, allow_held_out: bool) -> Obj:
    while True:
        c, s = COLORS[rng.integers(6)], SHAPES[rng.integers(6)]
        if allow_held_out or (c, s) not in HELD_OUT:
            break
    dx, dy = rng.uniform(-1, 1, size=2)
    return Obj(s, c, SIZES[rng.integers(2)], row, col, float(dx), float(dy))


def generate_scene(rng: np.random.Generator, cfg: ShapesWorldConfig, held_out: str = "exclude") -> Scene:
    """One random scene. held_out: "exclude" (no HELD_OUT pair), "require" (>= 1), "allow"."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    objs = [_random_obj(rng, int(c) // GRID, int(c) % GRID, held_out != "exclude") for c in cells]
    if held_out == "require" and not _has_held_out(objs):
        i = int(rng.integers(n))
        c, s = sorted(HELD_OUT)[rng.integers(len(HELD_OUT))]
        objs[i] = dataclasses.replace(objs[i], color=c, shape=s)
    return make_scene(objs, rng, allow_held_out=held_out != "exclude")


def _split_rng(cfg: ShapesWorldConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, SPLITS[split], index])


def split_scene(split: str, index: int, cfg: ShapesWorldConfig) -> Scene:
    """Scene `index` of a split: rejection-sampled from the split's own seed stream."""
    rng = _split_rng(cfg, split, index)
    held_out = "require" if split == "compositional" else "exclude"
    while True:
        scene = generate_scene(rng, cfg, held_out)
        if in_split(scene.objects, scene.caption, split):
            return scene


def make_split(name: str, n: int, cfg: ShapesWorldConfig | None = None, start: int = 0) -> list[Scene]:
    """Scenes start..start+n of split `name` (train/val/test/compositional); deterministic."""
    cfg = cfg or ShapesWorldConfig()
    return [split_scene(name, i, cfg) for i in range(start, start + n)]


def object_scenes(split: str, n: int, cfg: ShapesWorldConfig | None = None) -> list[Scene]:
    """n one-object scenes from split's own seed stream (train/val/test; never a HELD_OUT pair). One-object
    captions are too few (72) to be divided among the splits by caption as make_split does, so these
    scenes share their colours and shapes with the other splits, not their renderings."""
    cfg = dataclasses.replace(cfg or ShapesWorldConfig(), min_objects=1, max_objects=1)
    if split not in _BUCKETS:
        raise ValueError(f"split {split!r}: one-object scenes come from {list(_BUCKETS)}")
    return [generate_scene(_split_rng(cfg, split, i), cfg) for i in range(n)]


def _edit(base: Scene, kind: str, rng, cfg: ShapesWorldConfig, allow_held_out: bool) -> list[Obj] | None:
    """Objects of `base` with exactly one attribute of one object changed (None if impossible)."""
    objs = list(base.objects)
    i = int(rng.integers(len(objs)))
    o = objs[i]
    free = sorted(set(range(GRID * GRID)) - {x.row * GRID + x.col for x in objs})
    if kind in ("shape", "color", "size"):
        values = {"shape": SHAPES, "color": COLORS, "size": SIZES}[kind]
        new = [v for v in values if v != getattr(o, kind)]
        objs[i] = dataclasses.replace(o, **{kind: new[int(rng.integers(len(new)))]})
    elif kind == "position":
        if len(objs) < 2 or not free:  # a lone object's caption does not say where it is
            return None
        cell = free[int(rng.integers(len(free)))]
        objs[i] = dataclasses.replace(o, row=cell // GRID, col=cell % GRID)
    elif kind == "count":
        if len(objs) < cfg.max_objects and (len(objs) == cfg.min_objects or rng.random() < 0.5):
            cell = free[int(rng.integers(len(free)))]
            objs.append(_random_obj(rng, cell // GRID, cell % GRID, allow_held_out))
        elif len(objs) > cfg.min_objects:
            objs.pop(i)
        else:
            return None
    return objs


def contrast_group(rng: np.random.Generator, cfg: ShapesWorldConfig, k: int = 4, split: str = "train") -> list[Scene]:
    """[base, k-1 edits]: each edit differs from the base in exactly one attribute of one object
    (Scene.edit says which) and all k captions differ. The base lies in `split`; so do the edits
    for "train" (no val/test caption is ever trained on) and "compositional". For val/test
    groups an edit only has to avoid HELD_OUT pairs: requiring its caption to hash into a 5%
    bucket as well would reject almost every group."""
    allow = split == "compositional"
    while True:
        base = generate_scene(rng, cfg, "require" if allow else "exclude")
        if not in_split(base.objects, base.caption, split):
            continue
        group, captions = [base], {base.caption}
        kinds = [EDIT_KINDS[j] for j in rng.permutation(len(EDIT_KINDS))]
        kinds = (kinds * k)[: 4 * k]  # each kind once before any repeats; several tries each
        for kind in kinds:
            if len(group) == k:
                break
            objs = _edit(base, kind, rng, cfg, allow)
            if objs is None:
                continue
            scene = make_scene(objs, rng, allow, edit=kind)
            strict = split in ("train", "compositional")
            ok = in_split(scene.objects, scene.caption, split) if strict else not _has_held_out(scene.objects)
            if scene.caption not in captions and ok:
                group.append(scene)
                captions.add(scene.caption)
        if len(group) == k:
            return group


def hard_negative_captions(scene: Scene, n: int, rng: np.random.Generator | None = None) -> list[str]:
    """Up to n captions that are wrong about exactly one attribute (color, shape, size, or one
    relation word) of the scene; attribute kinds are cycled so each is represented."""
    rng = rng or np.random.default_rng(zlib.crc32(scene.caption.encode()))
    objs = scene.objects
    rels = [relation(a, b) for a, b in zip(objs, objs[1:])]
    by_kind: dict[str, list[str]] = {"color": [], "shape": [], "size": [], "relation": []}
    for i, o in enumerate(objs):
        for kind, values in (("color", COLORS), ("shape", SHAPES), ("size", SIZES)):
            for v in values:
                if v != getattr(o, kind):
                    changed = objs[:i] + (dataclasses.replace(o, **{kind: v}),) + objs[i + 1 :]
                    by_kind[kind].append(_caption(changed, rels))
    for j, (a, b) in enumerate(zip(objs, objs[1:])):
        for r in ("left of", "above", "below"):
            if not holds(r, a, b):  # e.g. never swap "above" for a "left of" that is also true
                by_kind["relation"].append(_caption(objs, rels[:j] + [r] + rels[j + 1 :]))
    pools = [[by_kind[k][i] for i in rng.permutation(len(by_kind[k]))] for k in by_kind]
    out: list[str] = []
    while len(out) < n and any(pools):
        for pool in pools:
            if pool and len(out) < n:
                out.append(pool.pop())
    return out


# ---------------------------------------------------------------------------------------------
# rendering


def _polygon(shape: str) -> np.ndarray:
    """Unit outline (radius 1, y down) of a non-circle shape: (P, 2)."""
    if shape == "square":
        return np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    if shape == "triangle":
        return np.array([[0.0, -1.0], [0.95, 0.75], [-0.95, 0.75]])
    if shape == "diamond":
        return np.array([[0.0, -1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    if shape == "cross":
        a = 0.33
        return np.array(
            [
                [-a, -1],
                [a, -1],
                [a, -a],
                [1, -a],
                [1, a],
                [a, a],
                [a, 1],
                [-a, 1],
                [-a, a],
                [-1, a],
                [-1, -a],
                [-a, -a],
            ],
            dtype=float,
        )
    if shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t) + 0.1], axis=1)  # +0.1: centre the mass
    raise ValueError(shape)


_POLYGONS = {s: _polygon(s) for s in SHAPES if s != "circle"}


def render(scene: Scene, cfg: ShapesWorldConfig | None = None) -> Image.Image:
    """Draw a scene at cfg.width x cfg.height (any aspect ratio: cells are width/3 x height/3)."""
    cfg = cfg or ShapesWorldConfig()
    s = cfg.supersample
    W, H = cfg.width * s, cfg.height * s
    img = Image.new("RGB", (W, H), cfg.background)
    draw = ImageDraw.Draw(img)
    cw, ch = W / GRID, H / GRID
    for o in scene.objects:
        r = cfg.radius[SIZES.index(o.size)] * min(cw, ch)
        slack_x, slack_y = max(cw / 2 - r, 0) * 0.8, max(ch / 2 - r, 0) * 0.8
        cx = (o.col + 0.5) * cw + o.dx * slack_x
        cy = (o.row + 0.5) * ch + o.dy * slack_y
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=RGB[o.color])
        else:
            pts = _POLYGONS[o.shape] * r + (cx, cy)
            draw.polygon([tuple(p) for p in pts], fill=RGB[o.color])
    return img.reduce(s) if s > 1 else img


def render_batch(scenes: list[Scene], cfg: ShapesWorldConfig | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8."""
    return np.stack([np.asarray(render(sc, cfg)) for sc in scenes])


# ---------------------------------------------------------------------------------------------
# parsing and scoring generated captions


@dataclass
class ParsedObj:
    shape: str
    color: str | None = None
    size: str | None = None
    relation: str | None = None  # relation word(s) linking this object to the next parsed one


_RELWORDS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}


def parse_caption(text: str) -> list[ParsedObj]:
    """Objects in the order mentioned. Tolerant: unknown words are skipped; an object is a shape
    word, taking the last size/color word seen since the previous object."""
    out: list[ParsedObj] = []
    size = color = None
    for w in re.findall(r"[a-z]+", text.lower()):
        if w in SIZES:
            size = w
        elif w in COLORS:
            color = w
        elif w in SHAPES:
            out.append(ParsedObj(w, color, size))
            size = color = None
        elif w in _RELWORDS and out and out[-1].relation is None:
            out[-1].relation = _RELWORDS[w]
    return out


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z]+", text.lower()))


def attribute_accuracy(predicted: list[str], scenes: list[Scene]) -> dict[str, float]:
    """Per-attribute accuracy of generated captions against scene truth.

    Objects are matched by position: the i-th parsed object against the i-th true object in
    caption order (a missing object counts as wrong on all its attributes).
      color / shape / size : fraction of true objects whose attribute is right (micro average)
      count                : fraction of captions that mention exactly the true number of objects
      relation             : fraction of true adjacent pairs (i, i+1) for which the caption states
                             a relation between parsed objects i and i+1 that holds geometrically
      object               : fraction of true objects with color, shape and size all right
      exact                : fraction of captions equal to the canonical one (case/punct. ignored)
    """
    assert len(predicted) == len(scenes)
    hits = {k: 0 for k in ("color", "shape", "size", "object", "relation", "count", "exact")}
    n_obj = n_rel = 0
    for text, scene in zip(predicted, scenes):
        parsed, truth = parse_caption(text), scene.objects
        hits["count"] += len(parsed) == len(truth)
        hits["exact"] += _norm(text) == _norm(scene.caption)
        for i, t in enumerate(truth):
            n_obj += 1
            if i < len(parsed):
                ok = [getattr(parsed[i], a) == getattr(t, a) for a in ("color", "shape", "size")]
                hits["color"] += ok[0]
                hits["shape"] += ok[1]
                hits["size"] += ok[2]
                hits["object"] += all(ok)
        for i in range(len(truth) - 1):
            n_rel += 1
            if i + 1 < len(parsed) and parsed[i].relation:
                hits["relation"] += holds(parsed[i].relation, truth[i], truth[i + 1])
    denom = {"count": len(scenes), "exact": len(scenes), "relation": n_rel}
    return {k: v / max(denom.get(k, n_obj), 1) for k, v in hits.items()}


if __name__ == "__main__":  # speed check
    import time

    cfg = ShapesWorldConfig()
    t0 = time.perf_counter()
    scenes = make_split("train", 2000, cfg)
    t1 = time.perf_counter()
    render_batch(scenes, cfg)
    t2 = time.perf_counter()
    rng = np.random.default_rng(0)
    groups = [contrast_group(rng, cfg, 4) for _ in range(500)]
    t3 = time.perf_counter()
    print(
        f"generate {2000 / (t1 - t0):.0f} scenes/s, render {2000 / (t2 - t1):.0f} images/s, "
        f"contrast groups {2000 / (t3 - t2):.0f} scenes/s"
    )
    print(scenes[0].caption, scenes[0].qa)
