"""Every code block of the README runs in these tests: the Python examples as written (one that ends its process,
as a gloo program must, in a subprocess), the shell commands checked against what they name (make targets,
modules and scripts with the flags they are given, shell syntax; `pip install` lines are tests/test_build.py's),
and the layout listing against the tree."""
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README.read_text(), flags=re.S)


def test_every_block_says_its_language():
    assert BLOCKS, "README has no code block"
    assert all(lang in ("python", "bash", "text") for lang, _ in BLOCKS), [
        code[:60] for lang, code in BLOCKS if lang not in ("python", "bash", "text")]


def test_the_layout_names_what_is_there():
    # the text block is the repository's layout: every path it names exists (indented ones under the last folder)
    (layout,) = [code for lang, code in BLOCKS if lang == "text"]
    parent = ROOT
    for line in layout.splitlines():
        if not line.strip() or line.startswith(" " * 10):         # a description's continuation line
            continue
        name = line.split()[0]
        base = parent if line.startswith(" ") else ROOT
        assert (base / name).exists(), f"{name} (under {base.relative_to(ROOT) or '.'}) does not exist"
        if not line.startswith(" ") and name.endswith("/"):
            parent = ROOT / name


@pytest.mark.parametrize("code", [c for lang, c in BLOCKS if lang == "python"],
                         ids=lambda c: c.strip().splitlines()[0][:40])
def test_readme_python_examples_run(code):
    if "os._exit(" in code:      # a program's whole life: run it as one
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    # the examples end with a reference-backend run of the same module: fused and reference agree
    if "y_ref" in namespace:
        import torch

        torch.testing.assert_close(namespace["moe"](namespace["x"]), namespace["y_ref"])


def _commands():
    out = []
    for lang, code in BLOCKS:
        if lang != "bash":
            continue
        for line in code.splitlines():
            line = line.split(" #")[0].strip()
            if line:
                out.append(line)
    return out


def _flags(words):
    return [w.split("=")[0] for w in words if w.startswith("--")]


@pytest.mark.parametrize("line", _commands())
def test_readme_shell_commands_name_what_exists(line):
    words = shlex.split(line)
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):        # VAR=value prefixes
        words.pop(0)
    tool = words[0]
    if tool == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
        for target in (w for w in words[1:] if "=" not in w):
            assert target in targets, f"make {target}: no such target"
    elif tool in ("pip", "python", "python3") and words[1:3] in (["install", "--no-build-isolation"], ["install", "."]):
        pass                                                       # tests/test_build.py installs the package
    elif tool == "pip":
        assert words[1] == "install", line
    elif tool == "bash":
        assert subprocess.run(["bash", "-n", words[1]], cwd=ROOT).returncode == 0, line
    elif tool.endswith("torchrun"):
        script = next(w for w in words if w.endswith(".py"))
        assert (ROOT / script).exists(), script                    # tests/test_distributed.py runs it under torchrun
    elif tool.endswith("python"):
        target = ["-m", words[2]] if words[1] == "-m" else [words[1]]
        rest = words[3:] if words[1] == "-m" else words[2:]
        r = subprocess.run([sys.executable, *target, "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, f"{' '.join(target)} --help: {r.stderr[-1500:]}"
        for flag in _flags(rest):
            assert flag in r.stdout, f"{' '.join(target)} takes no {flag}"
    else:
        raise AssertionError(f"a command the README test does not know how to check: {line}")
