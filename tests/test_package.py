"""The package's top level: every advertised name resolves, unknown names fail."""

import pytest

import jaxlearn


@pytest.mark.parametrize("name", jaxlearn.__all__)
def test_every_advertised_name_resolves(name):
    assert getattr(jaxlearn, name) is not None


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        jaxlearn.no_such_thing  # noqa: B018
