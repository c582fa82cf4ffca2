"""The pure helpers of image_sources: references, error meanings, archives,
progress summaries and build output."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from boincd_containers.core.errors import BoincdError, ImageError, NotFound, Unavailable
from boincd_containers.images.sources import (
    BuildTracker,
    PullProgress,
    archive_image,
    build_context,
    fetch_error,
    normalize_ref,
)


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("busybox", "busybox:latest"),
        ("reg.example:5000/team/app", "reg.example:5000/team/app:latest"),
        ("reg.example:5000/team/app:2", "reg.example:5000/team/app:2"),
        ("app@sha256:" + "a" * 64, "app@sha256:" + "a" * 64),
        (" app:1 ", "app:1"),
    ],
)
def test_normalize_ref(ref: str, expected: str) -> None:
    assert normalize_ref(ref) == expected


@pytest.mark.parametrize(
    ("raised", "kind", "text"),
    [
        (NotFound("manifest for x:1 not found: manifest unknown"), ImageError, "no such image"),
        (
            Unavailable("pull access denied for x, repository does not exist"),
            ImageError,
            "credentials",
        ),
        (Unavailable("unauthorized: authentication required"), ImageError, "credentials"),
        (Unavailable('Get "https://r/v2/": dial tcp: i/o timeout'), Unavailable, "reached"),
        (Unavailable("lookup r: no such host"), Unavailable, "reached"),
        (ImageError("pinging container registry r: connection refused"), Unavailable, "reached"),
        (ImageError("failed to register layer: no space left on device"), Unavailable, "disk"),
        (ImageError("Error processing tar file(exit status 1): unexpected EOF"), ImageError, "EOF"),
        (Unavailable("500 something odd"), Unavailable, "odd"),
        (BoincdError("something odd"), ImageError, "odd"),
    ],
)
def test_fetch_errors_say_what_happened_and_whether_to_retry(
    raised: BoincdError, kind: type[BoincdError], text: str
) -> None:
    error = fetch_error(raised, "cannot pull x:1")
    assert type(error) is kind
    assert text in error.message
    assert error.message.count("cannot pull x:1") == 1
    assert error.retryable is (kind is Unavailable)


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_archive_image_reads_id_and_tags_without_loading(tmp_path: Path) -> None:
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": []}}).encode()
    manifest = [{"Config": "abc.json", "RepoTags": ["proj/app:3"], "Layers": []}]
    archive = tmp_path / "image.tar"
    archive.write_bytes(_tar({"abc.json": config, "manifest.json": json.dumps(manifest).encode()}))
    image_id, tags = archive_image(archive)
    assert image_id == "sha256:" + hashlib.sha256(config).hexdigest()
    assert tags == ["proj/app:3"]

    oci = tmp_path / "oci.tar"
    oci.write_bytes(_tar({"index.json": b"{}"}))
    assert archive_image(oci) == (None, [])

    for name, data in {
        "garbage.tar": b"not a tar at all" * 100,
        "cut.tar": _tar({"manifest.json": json.dumps(manifest).encode()}),
    }.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError, match="damaged") as refused:
            archive_image(tmp_path / name)
        # Said in words, not as tarfile's list of reprs ("ReadError('not a gzip file')").
        assert "Error(" not in str(refused.value)
        assert "\n" not in str(refused.value)


def test_build_context_is_reproducible_and_leaves_out_boinc_files(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM x\n")
    (tmp_path / "app.py").write_text("print(1)\n")
    first = build_context(tmp_path)
    (tmp_path / "stderr.txt").write_text("changes every run")
    (tmp_path / "boinc_lockfile").write_text("")
    assert build_context(tmp_path) == first
    (tmp_path / "app.py").write_text("print(2)\n")
    assert build_context(tmp_path) != first
    (tmp_path / "Dockerfile").unlink()
    with pytest.raises(BoincdError, match="no Dockerfile"):
        build_context(tmp_path)


def test_pull_progress_sums_layers_in_one_line() -> None:
    now = [100.0]
    progress = PullProgress("app:1", clock=lambda: now[0])
    assert (
        progress.update({"status": "Pulling from app", "id": "1"})
        == "pulling app:1: Pulling from app"
    )
    progress.update({"status": "Pulling fs layer", "id": "a"})
    progress.update({"status": "Pulling fs layer", "id": "b"})
    now[0] = 102.0  # 1 KiB in 2 s
    text = progress.update(
        {"status": "Downloading", "id": "a", "progressDetail": {"current": 1024, "total": 4096}}
    )
    assert text == "pulling app:1: 0 of 2 layers, 1.0 KiB of 4.0 KiB, 512 B/s"
    assert progress.detail() == {"bytes_done": 1024, "bytes_total": 4096, "bytes_per_s": 512}
    now[0] = 103.0
    assert progress.update({"status": "Waiting", "id": "b"}) == (
        "pulling app:1: 0 of 2 layers, 1.0 KiB of 4.0 KiB, 341 B/s"
    )
    now[0] = 120.0  # the rate looks back 10 s: one sample in that window, no rate to show
    assert progress.update({"status": "Pull complete", "id": "a"}) == (
        "pulling app:1: 1 of 2 layers, 4.0 KiB of 4.0 KiB"
    )


def test_build_tracker_knows_which_images_the_build_made() -> None:
    tracker = BuildTracker()
    lines = [
        "Step 1/4 : FROM base", " ---> 111111111111",
        "Step 2/4 : COPY a /a", " ---> Using cache", " ---> 222222222222",
        "Step 3/4 : RUN make", " ---> Running in cccccccccccc",
        "Removing intermediate container cccccccccccc", " ---> 333333333333",
        "Step 4/4 : LABEL x=y", " ---> 444444444444",
    ]  # fmt: skip
    shown = [tracker.update({"stream": line + "\n"}) for line in lines]
    assert tracker.fresh_images == ["333333333333", "444444444444"]
    assert [s for s in shown if s] == [line for line in lines if line.startswith("Step")]
    assert tracker.update({"aux": {"ID": "sha256:" + "4" * 64}}) == ""
