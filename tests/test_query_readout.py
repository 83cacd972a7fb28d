"""scripts/query_readout.py: the target layouts, and a few steps end to end on the shipped backbones."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from vlbridge.data import shapesworld as sw

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "query_readout.py"
spec = importlib.util.spec_from_file_location("query_readout", SCRIPT)
qr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qr)


def test_layouts_place_each_object_where_the_lm_reads_it():
    scene = sw.make_split("test", 50, sw.ShapesWorldConfig())[7]
    cells, where = qr.targets(scene, "grid")
    assert len(cells) == qr.SLOTS and cells.count(".") == qr.SLOTS - len(scene.objects)
    for o, k in zip(scene.objects, where):
        assert k == o.col * 3 + o.row and cells[k] == f"a {o.size} {o.color} {o.shape}"
    pieces, where = qr.targets(scene, "caption")
    assert " ".join(p for p in pieces if p != ".") == scene.caption.replace(".", " .")
    assert where == list(range(len(scene.objects)))


def test_runs_end_to_end(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "3", "--train-scenes", "64"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["layout"] == "grid" and result["steps"] == 3
    assert all(0.0 <= result[k] <= 1.0 for k in ("size", "color", "shape"))
