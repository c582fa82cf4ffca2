"""The docs say what the code does: example files quoted verbatim, every job.toml
key documented, every toml snippet accepted by the real parser, the server-side
example files consistent with the ones the end-to-end test runs, and README's
first commands as they are."""

from __future__ import annotations

import re
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from boincd_containers.shim import jobfile

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
EXAMPLES = DOCS / "examples"
PROJECTS = DOCS / "projects.md"
VOLUNTEERS = DOCS / "volunteers.md"
README = REPO / "README.md"

FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def example_files() -> list[Path]:
    return sorted(p for p in EXAMPLES.rglob("*") if p.is_file())


def blocks(text: str, lang: str | None = None) -> list[str]:
    return [body for tag, body in FENCE.findall(text) if lang is None or tag == lang]


def test_there_are_examples() -> None:
    names = {p.relative_to(EXAMPLES).as_posix() for p in example_files()}
    assert {"job.toml", "count.sh", "standalone.sh", "server/version.xml"} <= names


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_projects_md_quotes_each_example_file_verbatim(path: Path) -> None:
    text = PROJECTS.read_text()
    rel = path.relative_to(DOCS).as_posix()
    assert f"({rel})" in text, f"projects.md does not link {rel}"
    assert path.read_text() in blocks(text), f"projects.md does not quote {rel} as it is"


def test_every_job_toml_key_is_in_the_key_table() -> None:
    text = PROJECTS.read_text()
    table_keys = set(re.findall(r"^\| `(\w+)` \|", text, re.MULTILINE))
    assert table_keys >= jobfile._KNOWN_KEYS, sorted(jobfile._KNOWN_KEYS - table_keys)
    # And the ignored ones are called ignored, with the shim's own reason.
    for key, why in jobfile._IGNORED_KEYS.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
        assert "ignored" in row, row
        assert why in row, row


def _slot(tmp_path: Path) -> tuple[Path, Path]:
    """A slot and project dir with the files the doc's snippets name."""
    slot, project = tmp_path / "slot", tmp_path / "project"
    for d in (slot / "data", slot / "scratch", project):
        d.mkdir(parents=True)
    (slot / "app.tar.gz").write_bytes(b"not really an archive")
    return slot, project


def test_every_toml_snippet_of_projects_md_is_a_valid_job(tmp_path: Path) -> None:
    snippets = blocks(PROJECTS.read_text(), "toml")
    assert len(snippets) >= 4
    slot, project = _slot(tmp_path)
    for snippet in snippets:
        data = tomllib.loads(snippet)
        dockerfile = slot / "Dockerfile"
        if not {"image", "image_name", "image_archive"} & set(data):
            dockerfile.write_text("FROM boincd-test/busybox:latest\n")
        try:
            job = jobfile.parse_job(data, slot, project)
        finally:
            dockerfile.unlink(missing_ok=True)
        assert job.warnings == (), snippet


def test_the_example_job_is_what_the_doc_says(tmp_path: Path) -> None:
    slot, project = _slot(tmp_path)
    job = jobfile.parse_job(tomllib.loads((EXAMPLES / "job.toml").read_text()), slot, project)
    assert job.source == "pull"
    assert job.command == ("sh", "/app/count.sh")
    assert job.workdir == "/app"
    assert job.checkpoint_filename == "checkpoint.txt"
    assert "checkpoint.txt" in (EXAMPLES / "count.sh").read_text()


def _refs(element: ET.Element) -> dict[str, str]:
    """open name -> physical name of an app_version's, workunit's or result's file_refs."""
    out = {}
    for ref in element.iter("file_ref"):
        name = ref.findtext("file_name") or ""
        out[ref.findtext("open_name") or "(main)"] = name.strip()
    return out


def _standalone_state() -> ET.Element:
    """The XML standalone.sh writes, with its shell variables filled in."""
    script = (EXAMPLES / "standalone.sh").read_text()
    chunks = re.findall(r"<<XML\n(.*?)^XML$", script, re.MULTILINE | re.DOTALL)
    xml = "".join(chunks).replace("$url", "http://x/").replace("$platform", "p")
    xml = re.sub(r"\$\(\([^)]*\)\)|\$now", "0", xml)
    state = re.search(r"<client_state>.*</client_state>", xml, re.DOTALL)
    assert state is not None
    return ET.fromstring(state.group(0))


def test_server_side_files_agree_with_the_client_state_the_test_runs() -> None:
    state = _standalone_state()
    version = ET.parse(EXAMPLES / "server" / "version.xml").getroot()
    app_version = state.find("app_version")
    assert app_version is not None
    assert version.findtext("api_version") == app_version.findtext("api_version") == "7.20.0"
    files = {
        (f.findtext("logical_name") or "(main)"): (f.findtext("physical_name") or "")
        for f in version.iter("file")
    }
    assert files == _refs(app_version)
    assert all(
        f.find("copy_file") is not None for f in version.iter("file") if f.findtext("logical_name")
    )

    wu_in = ET.parse(EXAMPLES / "server" / "count_in.xml").getroot()
    wu = state.find("workunit")
    assert wu is not None
    assert wu_in.find("workunit") is not None
    for bound in ("rsc_fpops_est", "rsc_fpops_bound", "rsc_memory_bound", "rsc_disk_bound"):
        assert float(wu_in.findtext(f"workunit/{bound}") or 0) == float(wu.findtext(bound) or -1)
    assert [r.findtext("open_name") for r in wu_in.iter("file_ref")] == list(_refs(wu))

    out = ET.parse(EXAMPLES / "server" / "count_out.xml").getroot()
    result = state.find("result")
    assert result is not None
    assert [r.findtext("open_name") for r in out.iter("file_ref")] == list(_refs(result))
    assert out.find("result/file_ref/copy_file") is not None


def test_the_docs_link_each_other_and_exist() -> None:
    readme = README.read_text()
    assert "(docs/projects.md)" in readme
    assert "(docs/volunteers.md)" in readme
    assert "DESIGN.md" not in readme, "README must not send users to a file they do not have"
    assert "(api.md)" in PROJECTS.read_text()
    assert VOLUNTEERS.exists()


def test_readme_keeps_its_first_two_commands() -> None:
    commands = [b.strip() for b in blocks(README.read_text(), "")]
    assert commands[:2] == ["./scripts/run-daemon.sh", "./scripts/test.sh"]
    for script in ("scripts/run-daemon.sh", "scripts/test.sh"):
        assert (REPO / script).stat().st_mode & 0o111, f"{script} is not executable"


def test_volunteers_md_explains_every_doctor_finding() -> None:
    sources = (REPO / "boincd_containers" / "cli").glob("doctor*.py")
    ids = {
        m
        for path in sources
        for m in re.findall(r'Finding\(\s*"([a-z_]+\.[a-z_]+)"', path.read_text())
    }
    assert len(ids) > 10
    rows = set(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", VOLUNTEERS.read_text(), re.MULTILINE))
    assert ids <= rows, f"volunteers.md lacks doctor findings {sorted(ids - rows)}"


def test_the_daemon_setup_uses_the_system_python_and_no_test_extras() -> None:
    """README's first command: scripts/run-daemon.sh sets up without test tools, from
    /usr/bin/python3 (a root-only pyenv first on PATH made a venv others could not run)."""
    run_daemon = (REPO / "scripts/run-daemon.sh").read_text()
    assert "scripts/setup.sh\n" in run_daemon, "run-daemon.sh must not ask setup.sh for --test"
    setup = (REPO / "scripts/setup.sh").read_text()
    assert "system_python=/usr/bin/python3" in setup
    assert '"$system_python" -m venv .venv' in setup
    assert not re.search(r"^\s*python3 -m venv", setup, re.MULTILINE)
    extras = setup.index("spec='.[test]'")
    branch = setup.rindex('if [ "$want_tests" = "--test" ]; then', 0, extras)
    assert "fi" not in setup[branch:extras], "the test extras must be installed only for --test"
    assert "spec=.\n" in setup
