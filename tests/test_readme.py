"""The README's self-contained schedule example runs and trains."""

import re

from conftest import REPO


def test_readme_schedule_example_runs(capsys):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## A schedule you can trust")[1].split("## ")[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    exec(compile(code, "README.md", "exec"), {})
    ends, loss = capsys.readouterr().out.split("\n")[:2]
    assert ends == "[1099, 3099, 7099]"
    assert float(loss) < 1e-6
