"""pytest imports test modules by basename (rootdir-relative, no packages): two test files of the same
name in different folders stop the whole suite at collection, and only a full run shows it."""

from collections import Counter

from tests.helpers import REPO


def test_test_modules_have_unique_basenames():
    names = Counter(path.name for path in (REPO / "tests").rglob("test_*.py"))
    assert not [name for name, n in names.items() if n > 1], names
