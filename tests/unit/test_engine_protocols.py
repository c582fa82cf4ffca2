"""The real Engine and the fakes tests hand the components fit each component's
Protocol (engine/protocols.py). mypy checks the signatures statically
(testing/conformance.py); here the same is asserted at run time, resource by
resource, so that a fake missing a verb fails a test, not a component deep in
another one."""

from __future__ import annotations

import inspect

import pytest

from boincd_containers.engine import protocols as P
from boincd_containers.engine.adapter import Engine
from boincd_containers.testing.conformance import COMPONENT_PROTOCOLS
from boincd_containers.testing.fake_images import ImageEngine
from boincd_containers.testing.fakes import FakeEngine


def engines() -> list[Engine | FakeEngine]:
    return [Engine("unix:///nonexistent"), FakeEngine(), ImageEngine()]


@pytest.mark.parametrize("protocol", COMPONENT_PROTOCOLS, ids=lambda p: p.__name__)
def test_each_engine_is_an_instance_of_each_component_protocol(protocol: type) -> None:
    for engine in engines():
        assert isinstance(engine, protocol), (type(engine).__name__, protocol.__name__)


def _verbs(protocol: type) -> dict[str, inspect.Signature]:
    """The methods a protocol names, with their signatures (its bases' too)."""
    found: dict[str, inspect.Signature] = {}
    for klass in reversed(protocol.__mro__):
        for name, member in vars(klass).items():
            if not name.startswith("_") and inspect.isfunction(member):
                found[name] = inspect.signature(member)
    return found


def _resources(protocol: type) -> dict[str, type]:
    """The resource properties of a component protocol and the protocol each has."""
    hints = {}
    for klass in reversed(protocol.__mro__):
        for name, member in vars(klass).items():
            if isinstance(member, property) and member.fget is not None:
                annotation = member.fget.__annotations__.get("return")
                resource = getattr(P, str(annotation), None)
                if isinstance(resource, type):
                    hints[name] = resource
    return hints


@pytest.mark.parametrize("protocol", COMPONENT_PROTOCOLS, ids=lambda p: p.__name__)
def test_each_resource_has_the_verbs_with_the_parameters_asked_for(protocol: type) -> None:
    for engine in engines():
        for attribute, resource_protocol in _resources(protocol).items():
            resource = getattr(engine, attribute)
            for verb, wanted in _verbs(resource_protocol).items():
                method = getattr(resource, verb, None)
                assert callable(method), f"{type(engine).__name__}.{attribute}.{verb}"
                have = inspect.signature(method).parameters
                for name, param in wanted.parameters.items():
                    if name == "self":
                        continue
                    assert name in have or any(p.kind is p.VAR_KEYWORD for p in have.values()), (
                        f"{type(engine).__name__}.{attribute}.{verb} lacks {name}"
                    )
                    assert param.kind is have[name].kind if name in have else True
