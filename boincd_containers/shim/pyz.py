"""Build the shim into one executable .pyz (zipapp) a project can ship as its app
version's main program: `python -m boincd_containers.shim.pyz OUT.pyz`."""

from __future__ import annotations

import sys
import zipapp
import zipfile
from pathlib import Path

_MAIN = "import sys\nfrom boincd_containers.shim.__main__ import main\nsys.exit(main())\n"


def build_pyz(out: Path, interpreter: str = "/usr/bin/env python3") -> Path:
    """Only the shim's own standard-library modules go in: small and fast to start."""
    shim_dir = Path(__file__).resolve().parent
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("__main__.py", _MAIN)
        archive.writestr("boincd_containers/__init__.py", "")
        for source in sorted(shim_dir.glob("*.py")):
            if source.name != "pyz.py":
                archive.write(source, f"boincd_containers/shim/{source.name}")
    zipapp.create_archive(tmp, out, interpreter=interpreter)
    tmp.unlink()
    out.chmod(0o755)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m boincd_containers.shim.pyz OUT.pyz")
    print(build_pyz(Path(sys.argv[1])))
