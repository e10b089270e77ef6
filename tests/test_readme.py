"""The README's Python examples run as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        namespace = {}
        exec(compile(code, str(README), "exec"), namespace)
        # the examples end with a reference-backend run of the same module: fused and reference agree
        if "y_ref" in namespace:
            import torch

            torch.testing.assert_close(namespace["moe"](namespace["x"]), namespace["y_ref"])
