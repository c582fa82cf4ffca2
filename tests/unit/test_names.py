"""Container and image names: never BOINC 8.2's `boinc__` prefix, one name per task."""

from __future__ import annotations

import itertools
import re

import pytest

from boincd_containers.core import labels as L

# What Docker accepts as a container name (daemon/names.RestrictedNamePattern).
DOCKER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
# Docker's image reference grammar for one path component (distribution/reference).
IMAGE_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*")


def test_usual_names_read_as_they_are() -> None:
    assert (
        L.container_name("www.example.org_proj", "wu_1_0") == "boincd__www.example.org_proj__wu_1_0"
    )
    assert L.container_name("einstein.phys.uwm.edu", "h1_0151.10-x_2") == (
        "boincd__einstein.phys.uwm.edu__h1_0151.10-x_2"
    )


def test_the_prefix_is_not_the_one_boinc_clients_clean_up() -> None:
    # client/cs_apps.cpp docker_cleanup removes names for which
    # docker_is_boinc_name() holds: strstr(name, "boinc__") == name.
    name = L.container_name("p", "r")
    assert not name.startswith("boinc__")
    assert not L.built_image_name("p", "0123abcd").startswith("boinc__")
    assert L.is_legacy_name("boinc__p__r")
    assert L.is_legacy_name("/boinc__p__r")
    assert not L.is_legacy_name(name)


TRICKY = [
    "c;x",
    "c x",
    "c_x",
    "c.-3bx",
    "a__b",
    "a",
    "b__c",
    "a_",
    "_b",
    "_",
    "__",
    "x.-",
    ".-",
    "é",
    "\udcff",
    "wu-1",
    "wu.-1",
    "-",
    ".",
    "A",
]


def test_names_never_collide_and_engines_accept_them() -> None:
    seen: dict[str, tuple[str, str]] = {}
    for project, result in itertools.product(TRICKY, repeat=2):
        name = L.container_name(project, result)
        assert DOCKER_NAME.fullmatch(name), name
        assert name not in seen, f"{(project, result)} and {seen.get(name)} share {name}"
        seen[name] = (project, result)


def test_long_names_stay_within_the_limit_and_apart() -> None:
    a = L.container_name("p", "x" * 300)
    b = L.container_name("p", "x" * 299 + "y")
    assert len(a) <= L.MAX_NAME_LENGTH
    assert len(b) <= L.MAX_NAME_LENGTH
    assert a != b
    assert DOCKER_NAME.fullmatch(a)


@pytest.mark.parametrize(
    "project", ["www.Example.org_proj", "a..b__c!!", "__", "é", "x" * 300, "-a-"]
)
def test_built_image_names_are_valid_references(project: str) -> None:
    name = L.built_image_name(project, "0123456789abcdef")
    _head, sep, digest = name.rpartition("__")
    assert sep
    assert digest == "0123456789abcdef"
    assert name.startswith("boincd__")
    assert IMAGE_COMPONENT.fullmatch(name), name
    assert len(name) < 256


def test_legacy_names_are_the_old_scheme() -> None:
    assert L.legacy_container_name("a b", "r/1") == "boinc__a_b__r_1"
