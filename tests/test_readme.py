"""README drift: every `edgelearn ...` command line in the README parses with the real CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from edgelearn.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    cmds = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            for part in re.split(r"&&|;", line):
                part = part.strip()
                if part.startswith("edgelearn "):
                    cmds.append(part)
    return cmds


def test_readme_has_commands() -> None:
    assert len(_commands()) >= 10


@pytest.mark.parametrize("cmd", _commands())
def test_readme_command_parses(cmd: str) -> None:
    argv = shlex.split(cmd)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on an unknown flag / missing argument
        raise AssertionError(f"README command does not parse: {cmd}") from e


def _python_api_block() -> str:
    text = README.read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


def test_python_api_example_runs(tmp_path, monkeypatch, capsys) -> None:
    """The README's app loop, executed as written (in a scratch directory); run again, it
    resumes the finished run and has nothing to add."""
    pytest.importorskip("onnxruntime")
    block = _python_api_block()
    assert len(block.strip().splitlines()) <= 20
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        exec(compile(block, "README.md#python-api", "exec"), {"__name__": "readme"})
        assert 0.0 <= float(capsys.readouterr().out.strip()) <= 1.0
    assert (tmp_path / "runs" / "app" / "journal.bin").is_file()
    assert (tmp_path / "runs" / "app" / "session.json").is_file()
