"""``python -m benchmarks.run`` argument handling: bad paths are refused before any benchmark runs, and a
damaged results file is named instead of a JSON traceback (nothing here runs a benchmark)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import run as bench_run


def test_markdown_in_a_missing_directory_is_refused_up_front(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_run.parse_args(["--only", "demo", "--markdown", str(tmp_path / "nope" / "B.md")])
    assert exc.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_results_dir_that_is_a_file_is_refused_up_front(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--results-dir", str(tmp_path / "file"), "--markdown", str(tmp_path / "B.md")])
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["{bad json", json.dumps([1, 2]), json.dumps({"benchmark": "demo"})])
def test_damaged_results_file_is_named(tmp_path: Path, content: str) -> None:
    (tmp_path / "demo.json").write_text(content)
    with pytest.raises(bench_run.ResultsFileError, match=r"demo\.json"):
        bench_run.load_results(tmp_path)
    markdown = tmp_path / "B.md"
    assert bench_run.main(["--render-only", "--results-dir", str(tmp_path), "--markdown", str(markdown)]) == 1
    assert not markdown.exists()


def test_render_only_with_only_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_run.parse_args(["--render-only", "--only", "tta", "--markdown", str(tmp_path / "B.md")])
    assert exc.value.code == 2 and "--only does not apply" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, "{bad json", json.dumps({"benchmark": "other"})])
def test_distill_merge_from_a_bad_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                content: str | None) -> None:
    from benchmarks import bench_distill

    source, into = tmp_path / "gpu.json", tmp_path / "distill.json"
    into.write_text(json.dumps({"benchmark": bench_distill.NAME, "results": {}}))
    if content is not None:
        source.write_text(content)
    with pytest.raises(SystemExit) as exc:
        bench_distill.main(["--merge-from", str(source), "--into", str(into)])
    assert exc.value.code == 2 and "--merge-from" in capsys.readouterr().err
    assert json.loads(into.read_text()) == {"benchmark": bench_distill.NAME, "results": {}}  # left as it was
