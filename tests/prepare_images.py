"""Build the local test images once before the suite (no registry is reachable)."""

from tests.daemon_harness import ensure_test_image

if __name__ == "__main__":
    print("test image:", ensure_test_image())
