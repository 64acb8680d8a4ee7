"""The README's Python example runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_five_lines_of_python(capsys):
    text = README.read_text()
    section = text[text.index("## Five lines of Python") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["Trace_ELBO", "TraceMeanField_ELBO"]
    for line in lines:
        elbos = [float(v) for v in re.findall(r"-?\d+\.\d+", line)]
        assert len(elbos) == 5 and all(v < 0 for v in elbos) and elbos[-1] > elbos[0]
