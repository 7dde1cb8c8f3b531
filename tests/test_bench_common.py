"""bench/common.py's CSV writer: appends under the same header, refuses a file with other columns."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from common import write_rows  # noqa: E402


def test_write_rows_appends_and_refuses_other_columns(tmp_path):
    p = tmp_path / "r.csv"
    write_rows(p, [{"a": 1, "b": 2}])
    write_rows(p, [{"a": 3, "b": 4}])
    assert p.read_text().splitlines() == ["a,b", "1,2", "3,4"]
    with pytest.raises(ValueError, match="new file"):
        write_rows(p, [{"a": 5, "b": 6, "c": 7}])
    assert p.read_text().splitlines() == ["a,b", "1,2", "3,4"]   # left as it was
