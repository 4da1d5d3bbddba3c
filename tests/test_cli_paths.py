"""CLI path safety: outputs never land on a bundle, a data file, an input or a foreign
directory; every path problem is one `edgelearn: error:` line and exit 2; a failed run takes
back the directory it created. Runs the real CLI on the shipped demo bundle (no torch)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgelearn.cli import main
from edgelearn.demo import DATA, demo_data
from edgelearn.paths import check_run_out, describe_os_error, is_run_dir, remove_if_unused


def run_main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(result: tuple[int, str, str], *match: str) -> str:
    """Exit 2, exactly one `edgelearn: error:` line on stderr holding every `match`."""
    code, out, err = result
    assert code == 2, (code, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("edgelearn: error: "), err
    for m in match:
        assert m in lines[0], (m, err)
    assert "Traceback" not in out + err
    return lines[0]


def tree_digest(path: Path) -> dict[str, str]:
    """relative name -> sha256 of every file under `path` (to prove nothing was written)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory (the cwd) holding a private copy of the demo bundle `B` and a
    data file `user.npz`, so relative paths read as a user types them."""
    shutil.copytree(DATA / "demo", tmp_path / "B")
    user, _, _ = demo_data()
    np.savez(tmp_path / "user.npz", x=user.x[:64], y=user.y[:64])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def train_argv(out: str, *extra: str) -> list[str]:
    return ["train", "B", "--data", "user.npz", "--steps", "2", "--out", out, *extra]


@pytest.fixture
def trained(work: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A finished 2-step run in `runs/u1`."""
    # zo-sgd: its journal replays without the data (the default, tpsgd, needs --data)
    code, _, err = run_main(capsys, train_argv("runs/u1", "--optimizer", "zo-sgd", "--json"))
    assert code == 0, err
    return work / "runs" / "u1"


# -- train --out --------------------------------------------------------------------------------
def test_train_into_the_bundle_is_refused(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_digest(work / "B")
    assert_refused(run_main(capsys, train_argv("B")), "B is a bundle directory")
    assert_refused(run_main(capsys, train_argv("B/run")), "B/run", "inside", "B")
    assert tree_digest(work / "B") == before
    assert sorted(p.name for p in (work / "B").iterdir()) == sorted(before)  # no lock, no run


def test_train_into_a_data_file_is_refused(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = (work / "user.npz").read_bytes()
    other = work / "other.npz"
    other.write_bytes(data)
    for out in ("user.npz", "other.npz"):  # the run's own data, and any other file
        assert_refused(run_main(capsys, train_argv(out)), out, "not a directory")
    assert (work / "user.npz").read_bytes() == data
    assert other.read_bytes() == data


def test_train_into_a_foreign_directory_is_refused(work: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    photos = work / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8 not a run")
    line = assert_refused(run_main(capsys, train_argv("photos")),
                          "photos is a directory that is not an edgelearn run", "cat.jpg")
    assert "new or empty directory" in line
    assert sorted(p.name for p in photos.iterdir()) == ["cat.jpg"]
    assert_refused(run_main(capsys, train_argv(".")), "not an edgelearn run")


def test_train_into_an_empty_or_run_directory_works(work: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (work / "empty").mkdir()
    code, out, err = run_main(capsys, train_argv("empty", "--json"))
    assert code == 0, err
    assert is_run_dir(work / "empty")
    # an existing run directory is resumed, not refused
    argv = ["train", "B", "--data", "user.npz", "--steps", "4", "--out", "empty", "--json"]
    code, out, err = run_main(capsys, argv)
    assert code == 0, err
    assert json.loads(out)["resumed_from"] == 2


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_train_where_nothing_can_be_created(work: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(run_main(capsys, train_argv("/proc/run")), "/proc/run", "cannot write into")
    (work / "notes.txt").write_text("a file")
    assert_refused(run_main(capsys, train_argv("notes.txt/run")), "notes.txt/run",
                   "notes.txt is not a directory")


def test_failed_run_removes_the_directory_it_created(work: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "B", "--data", "missing/user.npz", "--steps", "2", "--out", "new/a/run"]
    assert_refused(run_main(capsys, argv), "missing/user.npz: no such data file")
    assert not (work / "new").exists()
    # a directory that existed before the run is the user's: it stays
    (work / "mine").mkdir()
    argv[-1] = "mine"
    assert_refused(run_main(capsys, argv), "missing/user.npz")
    assert (work / "mine").is_dir()
    # refused inside train(), after the CLI created the directory: taken back too
    budget = train_argv("new2", "--memory-budget-mb", "0.001")
    assert_refused(run_main(capsys, budget), "memory budget")
    assert not (work / "new2").exists()


def test_remove_if_unused_keeps_work(trained: Path, tmp_path: Path) -> None:
    assert not remove_if_unused(trained)  # journal with steps, weights: kept
    assert (trained / "journal.bin").is_file()
    bare = tmp_path / "bare"
    (bare / "sub").mkdir(parents=True)
    (bare / "sub" / "lock").touch()
    assert remove_if_unused(bare)
    assert not bare.exists()


def test_check_run_out_accepts_only_run_dirs(trained: Path, tmp_path: Path) -> None:
    check_run_out(trained)
    check_run_out(tmp_path / "brand" / "new")
    (trained / "notes.txt").write_text("a user's file in a run directory")
    check_run_out(trained)  # still a run (journal, lock): resumable


def test_oserror_inside_a_command_is_one_line(work: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A run directory whose journal.bin is a directory: the OSError becomes one line."""
    run = work / "odd"
    (run / "journal.bin").mkdir(parents=True)
    (run / "lock").touch()
    code, out, err = run_main(capsys, train_argv("odd", "--json"))
    assert_refused((code, "", err), "odd/journal.bin")
    assert "journal.bin" in json.loads(out)["error"]


def test_describe_os_error_names_the_paths() -> None:
    e = OSError(errno.EISDIR, os.strerror(errno.EISDIR), "runs", None, "x.safetensors")
    assert describe_os_error(e) == f"runs -> x.safetensors: {os.strerror(errno.EISDIR)}"
    assert describe_os_error(FileNotFoundError(errno.ENOENT, "No such file or directory",
                                               "a/b")) == "a/b: No such file or directory"


# -- replay --out -------------------------------------------------------------------------------
@pytest.mark.parametrize(("out", "match"), [
    ("nodir/sub/r.safetensors", "directory nodir/sub does not exist"),
    ("runs/u1", "runs/u1 is a directory"),
    ("runs/u1/journal.bin", "is an input of this command"),
    ("B/weights.safetensors", "lies inside B"),
    ("B/extra.safetensors", "lies inside B"),
    ("user.npz", "not a .safetensors file; not overwriting it"),
])
def test_replay_out_problems(trained: Path, capsys: pytest.CaptureFixture[str], out: str,
                             match: str) -> None:
    before = tree_digest(trained.parents[1])
    argv = ["replay", "B", "runs/u1/journal.bin", "--out", out]
    assert_refused(run_main(capsys, argv), match)
    assert tree_digest(trained.parents[1]) == before


def test_replay_out_ok_and_json_error(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, ["replay", "B", "runs/u1/journal.bin", "--out",
                                       "r.safetensors", "--json"])
    assert code == 0, err
    code, out, err = run_main(capsys, ["replay", "B", "runs/u1/journal.bin", "--out", "runs",
                                       "--json"])
    assert_refused((code, "", err), "is a directory")
    assert "is a directory" in json.loads(out)["error"]


# -- demo, eval, bake, prepare ------------------------------------------------------------------
def test_demo_out_problems(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_digest(work)
    assert_refused(run_main(capsys, ["demo", "--out", "user.npz", "--steps", "1"]),
                   "user.npz is a file")
    assert_refused(run_main(capsys, ["demo", "--out", "B", "--steps", "1"]),
                   "B is a bundle directory")
    d = work / "d"
    d.mkdir()
    (d / "zo-sgd").write_text("not a run")
    assert_refused(run_main(capsys, ["demo", "--out", "d", "--steps", "1"]),
                   "d/zo-sgd exists and is not a directory")
    before["d/zo-sgd"] = hashlib.sha256(b"not a run").hexdigest()
    assert tree_digest(work) == before


def test_data_path_is_named_as_given(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "sub").mkdir()
    (work / "sub" / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    for data, match in (("sub/none.npz", "sub/none.npz: no such data file"),
                        ("sub/bad.npz", "sub/bad.npz: not a readable .npz data file"),
                        ("sub", "sub: is a directory")):
        assert_refused(run_main(capsys, ["eval", "B", "--data", data]), match)


def test_bake_out_problems(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = trained.parents[1]
    w = "runs/u1/weights.safetensors"
    before = tree_digest(work)
    bake = ["bake", "B", "--weights", w, "--out"]
    assert_refused(run_main(capsys, [*bake, "user.npz"]), "user.npz exists and is not a directory")
    assert_refused(run_main(capsys, [*bake, "B", "--overwrite"]), "B is an input")
    assert_refused(run_main(capsys, [*bake, ".", "--overwrite"]), "holds B, an input")
    assert_refused(run_main(capsys, [*bake, "runs/u1", "--overwrite"]),
                   "runs/u1", "holds runs/u1/weights.safetensors")
    (work / "docs").mkdir()
    (work / "docs" / "thesis.tex").write_text("years of work")
    assert_refused(run_main(capsys, [*bake, "docs", "--overwrite"]),
                   "docs is not a bundle directory", "--overwrite only replaces a bundle")
    assert (work / "docs" / "thesis.tex").read_text() == "years of work"
    if Path("/proc/self").is_dir():
        assert_refused(run_main(capsys, [*bake, "/proc/x"]), "/proc/x: cannot write into /proc")
    before["docs/thesis.tex"] = hashlib.sha256(b"years of work").hexdigest()
    assert tree_digest(work) == before


def test_prepare_out_problems(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(run_main(capsys, ["prepare", "B/model.onnx", "--out", "B/model.onnx"]),
                   "B/model.onnx is an input")
    assert_refused(run_main(capsys, ["prepare", "B/model.onnx", "--out", "user.npz"]),
                   "user.npz exists and is not a directory")
    assert_refused(run_main(capsys, ["prepare", "B/model.onnx", "--out", "B", "--overwrite"]),
                   "B holds B/model.onnx")
