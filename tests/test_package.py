"""The package's top level: every module and advertised name resolves to itself."""

import importlib
import types
from pathlib import Path

import pytest

import jaxlearn


def test_every_module_of_the_package_is_advertised():
    here = Path(jaxlearn.__file__).parent
    modules = {p.stem for p in here.glob("*.py") if p.stem != "__init__"}
    modules |= {p.parent.name for p in here.glob("*/__init__.py")}
    assert modules == set(jaxlearn._SUBMODULES)


@pytest.mark.parametrize("name", jaxlearn.__all__)
def test_every_advertised_name_resolves_to_its_module(name):
    value = getattr(jaxlearn, name)
    if name in jaxlearn._SUBMODULES:
        assert isinstance(value, types.ModuleType) and value.__name__ == f"jaxlearn.{name}"
    else:  # the same object as in the module the top level says defines it
        assert value is getattr(importlib.import_module(f"jaxlearn.{jaxlearn._NAMES[name]}"), name)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        jaxlearn.no_such_thing  # noqa: B018
