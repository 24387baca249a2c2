"""Every public module, function, class and method of jaxlearn says what it does."""

import importlib
import inspect
import pkgutil

import jaxlearn


def public_objects():
    """(dotted name, object) for each module and each public function, class and method
    defined in it (the names of `__all__`, or every name without a leading underscore)."""
    for info in pkgutil.walk_packages(jaxlearn.__path__, "jaxlearn."):
        module = importlib.import_module(info.name)
        yield info.name, module
        names = getattr(module, "__all__", None) or [n for n in dir(module) if n[0] != "_"]
        for name in names:
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if obj.__module__ != info.name:  # imported from elsewhere: checked there
                continue
            yield f"{info.name}.{name}", obj
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if attr[0] != "_" and inspect.isfunction(member):
                        yield f"{info.name}.{name}.{attr}", member


def test_every_public_object_has_a_docstring():
    objects = dict(public_objects())
    assert len(objects) > 300  # the walk found the package, not an empty shell
    missing = [name for name, obj in objects.items() if not inspect.getdoc(obj)]
    assert not missing, f"no docstring: {missing}"
