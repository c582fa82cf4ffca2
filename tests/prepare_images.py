"""Build the local test images anew before the suite (no registry is reachable).

Run by scripts/test.sh, so every CI run proves what a fresh machine does: the
busybox test image is rebuilt from /bin/busybox whatever an earlier run left,
the copies in Podman's stores (rootful, and rootless where the test user
exists) are removed and loaded again from it, and what a killed earlier run of
the volunteer tests left (a `hello-world` image carrying HELLO_LABEL, `boinc__`
decoys carrying DECOY_LABEL) is removed, so the tests that need them make them
themselves. That happens under the single-client lock, which every test using
them holds, so no live test of another session loses its own. A `hello-world`
without the label is the machine owner's and stays.
"""

from __future__ import annotations

from boincd_containers.testing.boinc import single_client_lock
from boincd_containers.testing.daemon import TEST_IMAGE, docker, rebuild_test_image
from boincd_containers.testing.podman import PodmanService, podman_available, rootless_user
from boincd_containers.testing.volunteer import DECOY_LABEL, HELLO_IMAGE, HELLO_LABEL


def remove_volunteer_leftovers() -> None:
    with single_client_lock():
        fmt = f'{{{{index .Config.Labels "{HELLO_LABEL}"}}}}'
        if docker("image", "inspect", "--format", fmt, HELLO_IMAGE, check=False) == "1":
            docker("rmi", "-f", HELLO_IMAGE, check=False)
            print("removed", HELLO_IMAGE, "left by an earlier test run")
        decoys = docker("ps", "-aq", "--filter", f"label={DECOY_LABEL}", check=False).split()
        if decoys:
            docker("rm", "-f", *decoys, check=False)
            print("removed", len(decoys), "decoy containers left by an earlier test run")


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
        except RuntimeError as e:
            # E.g. another session's rootless service: the tests still replace a
            # copy whose id is not Docker's (TestEngine.ensure_test_image).
            print(f"warning: Podman store {'rootless' if user else 'rootful'} not refreshed: {e}")
        finally:
            service.stop()


def main() -> None:
    print("test image:", TEST_IMAGE, rebuild_test_image())
    remove_volunteer_leftovers()
    refresh_podman_stores()


if __name__ == "__main__":
    main()
