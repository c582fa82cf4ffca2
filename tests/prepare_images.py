"""Build the local test images anew before the suite (no registry is reachable).

Run by scripts/test.sh, so every CI run proves what a fresh machine does: the
busybox test image is rebuilt from /bin/busybox whatever an earlier run left,
the copies in Podman's stores (rootful, and rootless where the test user
exists) are removed and loaded again from it, and a `hello-world` image that
an earlier test run made and left behind (it carries HELLO_LABEL) is removed,
so the tests that need one build it themselves. A `hello-world` image without
that label is the machine owner's and stays.
"""

from __future__ import annotations

from tests.daemon_harness import TEST_IMAGE, docker, rebuild_test_image
from tests.podman_harness import PodmanService, podman_available, rootless_user
from tests.volunteer import HELLO_IMAGE, HELLO_LABEL


def remove_leftover_hello_world() -> None:
    fmt = f'{{{{index .Config.Labels "{HELLO_LABEL}"}}}}'
    label = docker("image", "inspect", "--format", fmt, HELLO_IMAGE, check=False)
    if label:
        docker("rmi", HELLO_IMAGE, check=False)
        print("removed", HELLO_IMAGE, "left by an earlier test run")


def refresh_podman_stores() -> None:
    if not podman_available():
        return
    rootless = rootless_user()
    for user in [None] + ([rootless] if rootless is not None else []):
        service = PodmanService(user)
        try:
            engine = service.start()
            engine.remove_image(TEST_IMAGE)
            engine.ensure_test_image()
            print(f"test image loaded into {engine}: {engine.image_id(TEST_IMAGE)}")
        finally:
            service.stop()


def main() -> None:
    print("test image:", TEST_IMAGE, rebuild_test_image())
    remove_leftover_hello_world()
    refresh_podman_stores()


if __name__ == "__main__":
    main()
