"""tests/mutation.py: its mutants are one-line changes that still parse, and bad input is one error line."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import mutation

REPO = Path(__file__).resolve().parents[1]


def test_each_mutant_changes_one_place_and_still_parses():
    source = (REPO / "data/splits.py").read_text()
    found = mutation.mutants("data/splits.py")
    kinds = {m.what.split()[0] for m in found}
    assert len(found) > 5 and {"drop", "0", "<"} & kinds
    for m in found:
        changed = m.apply(source)
        assert changed != source
        ast.parse(changed)
        lines = [i for i, (a, b) in enumerate(zip(source.splitlines(), changed.splitlines())) if a != b]
        assert len(lines) == 1 or m.what.startswith("drop ")  # a dropped keyword may join two lines
    assert len({m.key() for m in found}) == len(found)  # each mutant has its own key


@pytest.mark.parametrize("args, message", [(["not/a/module.py"], "no tests listed"),
                                           (["--again", "missing.json", "--list"], "no such file")])
def test_bad_input_is_one_error_line(args, message):
    result = subprocess.run([sys.executable, "tests/mutation.py", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1
