"""The README's Python examples run, in order, in one namespace (documentation that cannot drift)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert len(blocks) >= 5, "the README's API examples are missing"
  namespace = {}
  for index, block in enumerate(blocks):
    exec(compile(block, f"README.md python block {index}", "exec"), namespace)
