"""Fast tests of the ShapesWorld generator (whole file runs in a few seconds)."""

import time

import numpy as np

from vlbridge.data.shapesworld import (
    COLORS,
    HELD_OUT,
    SHAPES,
    Obj,
    ShapesWorldConfig,
    attribute_accuracy,
    contrast_group,
    generate_scene,
    hard_negative_captions,
    make_scene,
    make_split,
    parse_caption,
    render,
    render_batch,
)

CFG = ShapesWorldConfig()


def _scene(*objs: Obj):
    return make_scene(objs, np.random.default_rng(0), allow_held_out=True)


def _combos(scene):
    return {(o.color, o.shape) for o in scene.objects}


def test_deterministic_by_seed():
    a, b = make_split("train", 20, CFG), make_split("train", 20, CFG)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert [s.qa for s in a] == [s.qa for s in b]
    assert np.array_equal(render_batch(a, CFG), render_batch(b, CFG))
    # scene i does not depend on how many scenes were asked for
    assert make_split("train", 5, CFG, start=15)[0].caption == a[15].caption
    other = make_split("train", 20, ShapesWorldConfig(seed=1))
    assert [s.caption for s in other] != [s.caption for s in a]


def test_splits_disjoint_and_held_out():
    caps = {name: {s.caption for s in make_split(name, 300, CFG)} for name in ("train", "val", "test")}
    assert not caps["train"] & caps["val"] and not caps["train"] & caps["test"]
    assert not caps["val"] & caps["test"]
    for s in make_split("train", 300, CFG) + make_split("test", 100, CFG):
        assert not _combos(s) & HELD_OUT
        assert not any(f"{c} {sh}" in q + " " + a for q, a in s.qa for c, sh in HELD_OUT)
    comp = make_split("compositional", 200, CFG)
    assert all(_combos(s) & HELD_OUT for s in comp)
    assert set().union(*(_combos(s) for s in comp)) >= HELD_OUT  # every held-out pair shows up


def test_captions_parse_back_exactly():
    for s in make_split("val", 200, CFG):
        parsed = parse_caption(s.caption)
        assert [(p.shape, p.color, p.size) for p in parsed] == [(o.shape, o.color, o.size) for o in s.objects]
        assert len(s.caption.split()) <= 40
    acc = attribute_accuracy([s.caption for s in make_split("val", 50, CFG)], make_split("val", 50, CFG))
    assert all(v == 1.0 for v in acc.values()), acc


def test_attribute_accuracy_partial():
    s = _scene(Obj("circle", "red", "large", 0, 0), Obj("square", "blue", "small", 0, 2))
    assert s.caption == "a large red circle left of a small blue square."
    acc = attribute_accuracy(["Large red circle, left of a big blue star and more"], [s])
    assert acc["count"] == 1.0 and acc["color"] == 1.0 and acc["relation"] == 1.0
    assert acc["shape"] == 0.5 and acc["size"] == 0.5 and acc["exact"] == 0.0
    acc = attribute_accuracy(["a large red circle above a small blue square."], [s])
    assert acc["relation"] == 0.0 and acc["object"] == 1.0
    assert attribute_accuracy([""], [s])["count"] == 0.0


def test_vqa_on_hand_built_scene():
    # red circle top-left, blue square top-right, green star bottom-right (below the square)
    s = _scene(
        Obj("star", "green", "small", 2, 2), Obj("circle", "red", "large", 0, 0), Obj("square", "blue", "small", 0, 2)
    )
    assert s.caption == "a large red circle left of a small blue square above a small green star."
    qa = dict(s.qa)
    truth = {
        "what color is the circle?": "red",
        "what color is the square?": "blue",
        "what color is the star?": "green",
        "what shape is the red object?": "circle",
        "what shape is the blue object?": "square",
        "what shape is the green object?": "star",
        "what size is the red circle?": "large",
        "what size is the blue square?": "small",
        "what size is the green star?": "small",
        "how many objects are there?": "3",
        "how many circles are there?": "1",
        "how many crosses are there?": "0",
        "is the red circle left of the blue square?": "yes",
        "is the blue square right of the red circle?": "yes",
        "is the blue square left of the red circle?": "no",
        "is the red circle right of the blue square?": "no",
        "is the blue square above the green star?": "yes",
        "is the green star below the blue square?": "yes",
        "is the green star above the blue square?": "no",
        "is the blue square below the green star?": "no",
        "what shape is left of the blue square?": "circle",
    }
    asked = [q for q in qa if q in truth]
    assert len(asked) >= 6
    for q in asked:
        assert qa[q] == truth[q], q
    exist = [(q, a) for q, a in s.qa if q.startswith("is there")]
    assert sorted(a for _, a in exist) == ["no", "yes"]
    for q, a in exist:
        named = q[len("is there a ") : -1]
        assert (named in {o.name for o in s.objects}) == (a == "yes")
    assert {qa.kind for qa in s.qa} == {"color", "shape", "size", "count", "exist", "relation"}


def test_vqa_unique_answers_and_balance():
    scenes = make_split("train", 500, CFG)
    answers = {"exist": [], "relation": []}
    for s in scenes:
        names = [o.name for o in s.objects]
        for qa in s.qa:
            if qa.question.startswith(("what size is the", "is the")):  # referents must be unique
                for n in names:
                    if f"the {n} " in qa.question + " " or f"the {n}?" in qa.question:
                        assert names.count(n) == 1
            if qa.kind in answers and qa.answer in ("yes", "no"):
                answers[qa.kind].append(qa.answer == "yes")
    assert all(0.45 < np.mean(v) < 0.55 for v in answers.values())


def test_contrast_groups_differ_in_one_attribute():
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(100):
        group = contrast_group(rng, CFG, k=4)
        base = group[0]
        assert len({s.caption for s in group}) == 4 and base.edit == ""
        for s in group[1:]:
            kinds.add(s.edit)
            b, e = set(base.objects), set(s.objects)
            if s.edit == "count":
                assert abs(len(b) - len(e)) == 1 and (b < e or e < b)
                continue
            (old,), (new,) = b - e, e - b  # exactly one object changed ...
            fields = ("shape", "color", "size", "row", "col")
            diff = [f for f in fields if getattr(old, f) != getattr(new, f)]
            assert diff == ([s.edit] if s.edit != "position" else diff) and diff  # ... in one attribute
            if s.edit == "position":
                assert set(diff) <= {"row", "col"}
        for s in group:
            assert not _combos(s) & HELD_OUT
    assert kinds == {"shape", "color", "size", "position", "count"}


def test_hard_negatives_differ_from_truth():
    for s in make_split("test", 50, CFG):
        negs = hard_negative_captions(s, 8)
        assert len(negs) == len(set(negs)) and s.caption not in negs
        assert len(negs) == 8 or len(s.objects) == 1
        assert negs == hard_negative_captions(s, 8)  # deterministic
        truth = [(o.shape, o.color, o.size) for o in s.objects]
        for n in negs:
            parsed = parse_caption(n)
            attrs = [(p.shape, p.color, p.size) for p in parsed]
            n_diff = sum(x != y for a, b in zip(attrs, truth) for x, y in zip(a, b))
            rel_diff = sum(p.relation != q.relation for p, q in zip(parsed, parse_caption(s.caption)))
            assert n_diff + rel_diff == 1, (s.caption, n)
            assert attribute_accuracy([n], [s])["exact"] == 0.0


def test_rendering_shapes_and_non_square():
    s = generate_scene(np.random.default_rng(3), CFG)
    assert np.asarray(render(s, CFG)).shape == (64, 64, 3)
    wide = ShapesWorldConfig(width=96, height=64)
    img = np.asarray(render(s, wide))
    assert img.shape == (64, 96, 3)
    # a lone large red circle in the right-hand column of a 96x64 image: its pixels sit there
    one = _scene(Obj("circle", "red", "large", 1, 2))
    img = np.asarray(render(one, wide)).astype(int)
    red = (img[..., 0] > 150) & (img[..., 1] < 100)
    ys, xs = np.nonzero(red)
    assert xs.min() >= 64 and 21 <= ys.mean() <= 43 and red.sum() > 80
    # all six colours and shapes drawn distinctly: images of different shapes differ
    imgs = [np.asarray(render(_scene(Obj(sh, "blue", "large", 1, 1)), CFG)) for sh in SHAPES]
    assert len({im.tobytes() for im in imgs}) == len(SHAPES)
    assert len(COLORS) == 6


def test_speed():
    t0 = time.perf_counter()
    render_batch(make_split("train", 500, CFG), CFG)
    assert 500 / (time.perf_counter() - t0) > 500  # thousands/s when the machine is idle
