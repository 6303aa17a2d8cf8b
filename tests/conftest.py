import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from fixtures import tiny  # noqa: E402,F401  (session fixture shared by all tests)


# tryfirst: xdist's worker reads the xdist_group marks in its own hook of this name.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2 --dist loadgroup`), tests that share a module-scoped
    fixture (one engine or server per module, or per fixture parameter) stay on one
    worker, so each engine starts once; every other test is distributed on its own."""
    for item in items:
        shared = [
            name for name, defs in item._fixtureinfo.name2fixturedefs.items()
            if defs[-1].scope in ("module", "class", "package")
        ]
        if not shared:
            continue
        key = [item.module.__name__]
        callspec = getattr(item, "callspec", None)
        for name in sorted(shared):
            if callspec is not None and name in callspec.params:
                key.append(f"{name}={callspec.params[name]}")
        item.add_marker(pytest.mark.xdist_group(":".join(key)))
