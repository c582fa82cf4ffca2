"""Build the shim into one executable .pyz (zipapp) a project can ship as its app
version's main program: `python -m boincd_containers.shim.pyz OUT.pyz`."""

from __future__ import annotations

import py_compile
import sys
import tempfile
import zipapp
import zipfile
from pathlib import Path

from .boinc_api import API_VERSION

_MAIN = "import sys\nfrom boincd_containers.shim.__main__ import main\nsys.exit(main())\n"


def _bytecode(source: Path) -> bytes:
    """The .pyc bytes of `source` for this interpreter (unchecked hash-based, so a
    zip's mtimes do not matter)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "module.pyc"
        py_compile.compile(
            str(source), cfile=str(out), doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )  # fmt: skip
        return out.read_bytes()


def build_pyz(out: Path, python: str = "/usr/bin/env -S python3") -> Path:
    """Only the shim's own standard-library modules go in: small and fast to start.

    The interpreter runs isolated and without `site` (-IS): the shim needs nothing
    from site-packages or PYTHON* variables, and skipping them saves time and memory
    at every task start.
    """
    interpreter = f"{python} -IS"
    shim_dir = Path(__file__).resolve().parent
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        # BOINC's update_versions takes an app version's <api_version> from the
        # main program (`strings FILE | grep 'API_VERSION_x.y.z$'`); the members
        # are compressed, the archive's comment (its last bytes) is not.
        archive.comment = f"API_VERSION_{API_VERSION}".encode()
        archive.writestr("__main__.py", _MAIN)
        archive.writestr("boincd_containers/__init__.py", "")
        for source in sorted(shim_dir.glob("*.py")):
            if source.name != "pyz.py":
                name = f"boincd_containers/shim/{source.name}"
                archive.write(source, name)
                # zipimport uses a .pyc beside the .py when its magic number
                # matches the interpreter: no compiling at every task start.
                archive.writestr(name + "c", _bytecode(source))
    zipapp.create_archive(tmp, out, interpreter=interpreter)
    tmp.unlink()
    out.chmod(0o755)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m boincd_containers.shim.pyz OUT.pyz")
    print(build_pyz(Path(sys.argv[1])))
