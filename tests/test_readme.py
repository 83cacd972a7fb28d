"""Every ```python block of the README runs as written, in order, in one namespace."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    from vlbridge.assets import SHAPESWORLD

    if not (SHAPESWORLD / "lm").exists():
        pytest.fail("shipped ShapesWorld backbones are missing; run scripts/pretrain_backbones.py")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block that broke
            raise AssertionError(f"README python block {i + 1} failed: {e!r}\n{block}") from e
