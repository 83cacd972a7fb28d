"""The code in README.md and docs/*.md runs as written.

Each file's fenced blocks run in order, in one temporary working directory:
- ```python blocks are executed in one namespace per file;
- ```bash / ```sh blocks run through bash (-e) with this venv's bin/ first on PATH (`vlbridge`, `python`)
  and the repository root on PYTHONPATH (experiments/, benchmarks/), and must exit 0. Two kinds are
  run otherwise: a block of nothing but plain `vlbridge ...` commands runs them in this process
  through `vlbridge.cli.main` (the console script's function, with the same argv), which spares a
  torch import per command; a block of nothing but `make` commands is checked with `make -n` (the
  targets exist and every `python -m MODULE` they would run resolves), since running it would
  install packages, train for tens of minutes, or run this suite inside itself;
- ```json blocks must parse, and one with an "out_dir" is a training recipe that must load;
- ```text blocks are shown, never run: commands that need a download, real datasets, a GPU or hours
  (the docs introduce them as such), and plain listings.
A fence of any other language fails, so that no block goes unchecked by accident.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```\s*$", flags=re.S | re.M)
KINDS = {"python", "bash", "sh", "json", "text"}
README_LIMIT = 12_000  # bytes: a README a newcomer reads in five minutes


def blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, code, line number) of every fenced block, in order."""
    text = path.read_text()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def shell_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def check_make(code: str, where: str):
    """`make -n` for each target: it exists, and every `python -m MODULE` it would run is importable."""
    for command in commands(code):
        dry = subprocess.run(["make", "-n", "-C", str(ROOT), *command[1:]], capture_output=True, text=True)
        assert dry.returncode == 0, f"{where}: `{' '.join(command)}` fails as a dry run:\n{dry.stderr}"
        for module in re.findall(r"-m\s+([\w.]+)", dry.stdout):
            assert importlib.util.find_spec(module) is not None, (
                f"{where}: `{' '.join(command)}` would run `python -m {module}`, which does not exist"
            )


def commands(code: str) -> list[list[str]]:
    """The shell words of each command of a block (continuation lines joined, comments dropped)."""
    return [words for line in code.replace("\\\n", " ").splitlines() if (words := shlex.split(line, comments=True))]


def only(program: str, code: str) -> bool:
    """Every command of the block runs `program`, with no shell syntax beyond quoting."""
    unquoted = re.sub(r"'[^']*'|\"[^\"]*\"", "", code.replace("\\\n", " "))
    plain = not re.search(r"[|&;<>$`]", re.sub(r"(^|\s)#.*", "", unquoted, flags=re.M))
    cmds = commands(code)
    return plain and bool(cmds) and all(c[0] == program for c in cmds)


def run_vlbridge(code: str, where: str):
    from vlbridge.cli import main

    for argv in commands(code):
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                main(argv[1:])
        except SystemExit as e:
            if e.code not in (0, None):
                raise AssertionError(f"{where}: `{shlex.join(argv)}` exited {e.code}\n{err.getvalue()[-3000:]}") from e
        except Exception as e:
            raise AssertionError(f"{where}: `{shlex.join(argv)}` failed: {e!r}\n{err.getvalue()[-3000:]}") from e


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_code_blocks_run(path, tmp_path, monkeypatch):
    from vlbridge.assets import SHAPESWORLD

    if not (SHAPESWORLD / "lm").exists():
        pytest.fail("shipped ShapesWorld backbones are missing; run scripts/pretrain_backbones.py")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    name = path.relative_to(ROOT)
    for lang, code, line in blocks(path):
        where = f"{name}:{line} ({lang} block)"
        assert lang in KINDS, f"{where}: unknown block language {lang!r}; use one of {sorted(KINDS)}"
        if lang == "python":
            try:
                exec(compile(code, where, "exec"), namespace)
            except Exception as e:  # name the block that broke
                raise AssertionError(f"{where} failed: {e!r}\n{code}") from e
        elif lang == "json":
            check_json(code, where, tmp_path)
        elif lang in ("bash", "sh") and only("make", code):
            check_make(code, where)
        elif lang in ("bash", "sh") and only("vlbridge", code):
            run_vlbridge(code, where)
        elif lang in ("bash", "sh"):
            run = subprocess.run(
                ["bash", "-e", "-c", code], cwd=tmp_path, env=shell_env(), capture_output=True, text=True, timeout=300
            )
            assert run.returncode == 0, (
                f"{where} exited {run.returncode}\n{code}\n--- stdout\n{run.stdout[-3000:]}"
                f"\n--- stderr\n{run.stderr[-3000:]}"
            )


def check_json(code: str, where: str, tmp_path: Path):
    try:
        data = json.loads(code)
    except json.JSONDecodeError as e:
        raise AssertionError(f"{where} is not valid JSON: {e}\n{code}") from e
    if isinstance(data, dict) and "out_dir" in data:  # a recipe: its fields and values must be what train reads
        from vlbridge.training.train import load_recipe

        (tmp_path / "recipe.json").write_text(code)
        try:
            load_recipe(tmp_path / "recipe.json")
        except Exception as e:
            raise AssertionError(f"{where} is not a recipe vlbridge train reads: {e!r}") from e


def test_console_script():
    """The docs' `vlbridge` commands run in-process above; this is the installed command itself."""
    run = subprocess.run(
        ["vlbridge", "caption", "--help"], env=shell_env(), capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "--example" in run.stdout, run.stderr


def test_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail into docs/ (limit {README_LIMIT})"


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_links_resolve(path):
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor on the same page
        assert (path.parent / target.split("#")[0]).exists(), f"{path.name}: link to {target} goes nowhere"


def test_cli_doc_names_every_command_and_flag():
    from vlbridge.cli import build_parser

    doc = (ROOT / "docs" / "cli.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o not in doc]
    for command, parser in sub.choices.items():
        if f"vlbridge {command}" not in doc:
            missing.append(f"vlbridge {command}")
        for action in parser._actions:
            missing += [f"{command} {o}" for o in action.option_strings if o.startswith("--") and o not in doc]
    assert not missing, f"docs/cli.md does not mention {missing}"


# ---------------------------------------------------------------- experiments/write_results.py


def synthetic_report() -> dict:
    """A report.json as experiments.demo writes it, with every part, tiny and made up."""
    caps = {
        "metrics": {
            "color": 0.91,
            "shape": 0.82,
            "size": 0.73,
            "count": 0.99,
            "relation": 0.55,
            "object": 0.6,
            "exact": 0.4,
        },
        "decode": {"num_beams": 1, "max_new_tokens": 40, "prompt": "a photo of"},
        "n": 500,
        "samples": [{"caption": "a small red circle.", "predicted": "a small red square."}],
    }
    vqa = {
        "accuracy": 0.876,
        "by_kind": {"color": 0.9, "relation": 0.6},
        "n": 2752,
        "decode": {"num_beams": 1, "max_new_tokens": 4, "prompt": "Question: {} Answer:"},
    }
    ret = {
        "itc": {"i2t_r1": 0.945, "i2t_r5": 0.99, "i2t_r10": 1.0, "t2i_r1": 0.94},
        "itc_itm": {"i2t_r1": 0.952, "t2i_r1": 0.949},
        "k": 16,
        "rerank": "log_odds",
        "n": 1000,
    }
    shots = {str(k): {"color": 0.1 * k, "shape": 0.2, "size": 0.3, "count": 0.4, "exact": 0.0} for k in (0, 1, 4)}
    flamingo = {
        "summary": {
            "caption_random": shots,
            "caption_rices": shots,
            "vqa": {"0": 0.05, "1": 0.2, "4": 0.25},
            "incontext": {k: {"accuracy": 0.36, "format_accuracy": 1.0} for k in ("0", "1", "4")},
        },
        "overrides": [],
        "final_loss": 1.96,
        "curve": [{"step": 400, "loss": 1.96}],
    }
    eve = {
        "captions": {"metrics": {"color": 0.7, "shape": 0.19, "size": 0.8, "count": 0.86}, "n": 300},
        "vqa": {"accuracy": 0.48},
        "language_loss_before": {"caption": 0.88, "qa": 0.62},
        "language_loss_after_stage2": {"caption": 1.11, "qa": 0.92},
    }
    return {
        "machine": {"platform": "Linux", "torch": "2.x", "threads": 2},
        "timings_s": {"stage1_train": 251.0, "total": 1154.0},
        "test_retrieval": ret,
        "test_captions": caps,
        "test_vqa": vqa,
        "compositional_retrieval": ret,
        "compositional_captions": caps,
        "compositional_vqa": vqa,
        "curves": {
            "stage1": [{"step": s, "probe_itc_i2t_r1": s / 1000, "probe_n": 200} for s in range(100, 800, 100)],
            "stage2": [
                {
                    "step": 100,
                    "probe_caption_color": 0.3,
                    "probe_caption_shape": 0.26,
                    "probe_caption_count": 0.58,
                    "probe_n": 50,
                }
            ],
        },
        "recipes": {"stage1": {"steps": 700, "batch_size": 64}, "stage2": {"steps": 2000, "batch_size": 64}},
        "backbone_ceilings": {"lm_ceiling": {"test/vqa/pooled_bos": {"all": 0.9019, "relation_yes_no": 0.4696}}},
        "targets": {
            "vqa_accuracy": {"target": 0.85, "reached": 0.876, "met": True},
            "itm_improves_r1": {"itc": 0.945, "itc_itm": 0.952, "met": True},
        },
        "flamingo": {"flamingo": flamingo, "no_tanh": flamingo},
        "eve": {
            "eve": eve,
            "latency": {
                "blip2": {"seconds_per_image": 0.034},
                "eve_over_blip2": 0.9,
                "eve": {"seconds_per_image": 0.031, "new_tokens": 20, "threads": 2},
            },
        },
    }


def synthetic_bench() -> dict:
    env = {"environment": {"device": "cpu", "torch": "2.x", "transformers": "5.x", "threads": 2}}
    return {
        "bench.json": {
            **env,
            "results": [
                {
                    "bench": "stage1_step",
                    "size": "tiny",
                    "precision": "bf16",
                    "attention": "explicit",
                    "s_per_step": 0.71,
                    "samples_per_s": 90.1,
                    "speedup_vs_fp32_fused": 2.04,
                }
            ],
        },
        "bench_transformers.json": {
            **env,
            "results": [
                {
                    "bench": "train_step",
                    "mode": "vlbridge itc+itm",
                    "precision": "bf16",
                    "batch": 8,
                    "s_per_step": 5.44,
                    "flops_per_step": 1.32e12,
                    "fraction_of_matmul_peak": 0.62,
                    "speedup_vs_transformers_best": 1.15,
                    "parity_max_abs_loss_diff": {"sdpa": 0.0, "eager": 6e-8},
                    "matmul_peak": {"bf16": {"flops_per_s": 3.9e11}},
                    "profile_bf16": {"vlbridge itc+itm": {"matmul_share": 0.76}},
                },
                {
                    "bench": "generate",
                    "mode": "vlbridge",
                    "num_beams": 5,
                    "images_per_s": 0.98,
                    "speedup_vs_transformers": 0.91,
                    "same_ids": True,
                },
            ],
        },
        "bench_memory.json": {
            **env,
            "lm": {"layers": 16, "width": 2048},
            "batch": 4,
            "naive_over_frozen": 4.18,
            "results": [
                {
                    "case": "frozen_bf16",
                    "peak_gib": 4.09,
                    "memory": "peak RSS",
                    "lm_params": 950_000_000,
                    "trainable_params": 100,
                    "optimizer_state_bytes": 2**30,
                }
            ],
        },
    }


def test_write_results_renders_a_report():
    from experiments import write_results as wr

    report = synthetic_report()
    page = wr.render(report, synthetic_bench())
    for expected in (
        "0.945 / 0.990 / 1.000",
        "0.876",
        "0.952 / 0.949",
        "`no_tanh`",
        "0.360 (1.000)",
        "`eve`",
        "1.110 / 0.920",
        "EVE / BLIP-2 = 0.90",
        "0.902",
        "2.04x",
        "4.18x",
        "num_beams=1",
        "1.15x",
        "eager 6.0e-08",
        "bf16 0.39",
        "76%",
        "0.91x",
    ):
        assert expected in page, expected
    assert "not meaningful" not in page
    table = wr.headline(report)
    assert "0.910 / 0.820 / 0.990" in table and "0.945 / 0.952" in table and "4-shot" in table
    assert "0.400 / 0.200 / 0.400" in table  # Flamingo at 4 shots, random demonstrations

    readme = f"intro\n{wr.START}\nold table\n{wr.END}\nrest\n"
    new = wr.replace_between(readme, table)
    assert "old table" not in new and new.startswith("intro\n") and new.endswith(f"{wr.END}\nrest\n")
    assert wr.replace_between(new, table) == new  # idempotent
    with pytest.raises(ValueError):
        wr.replace_between("no markers", table)


def test_write_results_without_optional_parts(tmp_path):
    from experiments import write_results as wr

    report = {k: v for k, v in synthetic_report().items() if k not in ("flamingo", "eve")}
    report["recipes"]["stage1"]["steps"] = 4  # a --quick run
    (tmp_path / "report.json").write_text(json.dumps(report))
    (tmp_path / "README.md").write_text(f"# x\n{wr.START}\n{wr.END}\n")
    wr.main(
        [
            "--demo",
            str(tmp_path / "report.json"),
            "--bench",
            str(tmp_path / "none"),
            "--results",
            str(tmp_path / "docs" / "results.md"),
            "--readme",
            str(tmp_path / "README.md"),
        ]
    )
    page = (tmp_path / "docs" / "results.md").read_text()
    assert "did not include flamingo and eve" in page and "not meaningful" in page and "make bench" in page
    readme = (tmp_path / "README.md").read_text()
    assert "BLIP-2" in readme and "Flamingo" not in readme
