"""``audit export --out FILE`` writes the export 0600 and never widens an existing FILE's mode:
an export names principals, key ids and source addresses."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

EXPORT = "/v1/audit/export"


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common default umask, under which the old code made the export 0644."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _export(invoke, stub, out: Path) -> None:
    stub.answers[EXPORT] = (200, {"seq": 1})
    result = invoke(["audit", "export", "--out", str(out)], env={"KEYGRANTS_ADDR": stub.addr})
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == b'{"seq": 1}'


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_022")
def test_a_new_export_file_is_0600(invoke, stub, tmp_path: Path) -> None:
    out = tmp_path / "new.jsonl"
    _export(invoke, stub, out)
    assert _mode(out) == 0o600


@pytest.mark.usefixtures("umask_022")
@pytest.mark.parametrize(("before", "after"), [(0o600, 0o600), (0o400, 0o400), (0o644, 0o600),
                                               (0o640, 0o600), (0o666, 0o600)],
                         ids=lambda mode: f"{mode:04o}")
def test_replacing_an_export_never_widens_its_mode(invoke, stub, tmp_path: Path,
                                                   before: int, after: int) -> None:
    """An existing 0600 export (kept as evidence) became 0644 when exported over."""
    out = tmp_path / "evidence.jsonl"
    out.write_bytes(b"earlier export\n")
    out.chmod(before)
    _export(invoke, stub, out)
    assert _mode(out) == after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evidence.jsonl"]  # no temp file left
