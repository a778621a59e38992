"""Every exception the dccsign package defines for others to catch derives from DccSignError;
the native core's from NativeError (it imports nothing of the engine)."""

import importlib
import inspect
import pkgutil

import pytest

import dccsign
import dccsign.native
from dccsign.errors import DccSignError
from dccsign.native.errors import NativeError


def _public_exceptions(package, *, skip=()):
    found = {}
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if module.name.endswith("__main__") or module.name.startswith(skip):
            continue
        mod = importlib.import_module(module.name)
        for name, obj in vars(mod).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == mod.__name__
                and not name.startswith("_")
            ):
                found[f"{mod.__name__}.{name}"] = obj
    return found


ENGINE = _public_exceptions(dccsign, skip=("dccsign.bench",))


def test_the_engine_defines_exceptions():
    assert {"dccsign.keyd.client.KeydError", "dccsign.dcc.validate.DCCValidationError"} <= set(
        ENGINE
    )


@pytest.mark.parametrize("name", sorted(ENGINE))
def test_engine_exceptions_derive_from_dccsign_error(name):
    assert issubclass(ENGINE[name], DccSignError)


def test_native_exceptions_derive_from_native_error():
    found = _public_exceptions(dccsign.native)
    assert found
    assert {n for n, cls in found.items() if not issubclass(cls, NativeError)} == set()
