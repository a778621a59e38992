"""Shared fixtures.

* ``impl``: every test of the native core runs against both implementations. The native
  parameter skips with the real import error as its reason, except where the native build is
  mandatory (``DCCSIGN_BUILD_NATIVE=1`` or ``CI=true``): there a missing extension fails.
* :func:`shared_path`: test data from ``../shared`` is read in place. When it is absent a test
  skips with a clear reason, except under ``CI=true``, where its absence is a failure.
* ``keyd_env``: an in-process keyd on a private copy of the development keystore, with its own
  audit log; :func:`kid_for` picks a key of that keystore by the DCC types it may sign, and
  :func:`fail_audit_commits` makes its audit log fail as a full disk does.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DCCSIGN_SHARED_DIR", REPO.parent / "shared"))
IN_CI = os.environ.get("CI") == "true"
NATIVE_REQUIRED = IN_CI or os.environ.get("DCCSIGN_BUILD_NATIVE") == "1"


def shared_path(*parts: str) -> Path:
    """Return a path below ``../shared``; skip (or fail under CI) when it does not exist."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = (
            f"shared test data not found: {path} (set DCCSIGN_SHARED_DIR or check out shared/)"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def _load_impl(name: str):
    from dccsign import native

    try:
        return native.implementation(name)
    except ImportError as exc:
        if native.PURE_PYTHON_FORCED:
            pytest.skip(f"native implementation disabled by DCCSIGN_PUREPYTHON=1 ({exc})")
        if NATIVE_REQUIRED:
            pytest.fail(f"native extension required but not importable: {exc}")
        pytest.skip(f"native extension not built: {exc}")


@pytest.fixture(params=["native", "python"], scope="session")
def impl(request):
    """One implementation of :mod:`dccsign.native` (a module with the common API)."""
    return _load_impl(request.param)


@pytest.fixture(scope="session")
def dev_keystore(tmp_path_factory):
    """A development keystore created once per session (read-only use)."""
    from dccsign.keys.keystore import init_dev

    return init_dev(tmp_path_factory.mktemp("ks") / "dev").directory


@pytest.fixture
def dev_keystore_copy(dev_keystore, tmp_path):
    """A private copy of the development keystore that a test may break."""
    import shutil

    target = tmp_path / "ks"
    shutil.copytree(dev_keystore, target)
    return target


def kid_for(store, usage: str) -> bytes:
    """The kid of *store*'s entry whose DSC allows exactly the DCC types in *usage* ("v", "tr")."""
    return next(e.kid for e in store.entries if e.dsc.usages == frozenset(usage))


@pytest.fixture
def keyd_env(dev_keystore_copy, tmp_path):
    """``(store, keyd, log, audit_dir)``: a :class:`~dccsign.keyd.service.Keyd` on a private
    keystore copy whose audit log is ``tmp_path / "audit"``; closed after the test."""
    from dccsign.audit.key import AuditKey
    from dccsign.audit.writer import AuditLog
    from dccsign.keyd.service import Keyd
    from dccsign.keys.keystore import Keystore, resolve_passphrase

    store = Keystore.open(dev_keystore_copy)
    pw = resolve_passphrase(store.directory)
    key = AuditKey.create(tmp_path / "audit-key.pem", pw)
    log = AuditLog.open(tmp_path / "audit", key)
    keyd = Keyd(store.directory, pw, log)
    yield store, keyd, log, tmp_path / "audit"
    keyd.close()
    log.close()


def fail_audit_commits(monkeypatch, log) -> None:
    """Make every commit of signature records to *log* raise ``AuditUnavailable`` (ENOSPC)."""
    from dccsign.audit.errors import AuditUnavailable

    def broken(*args):
        raise AuditUnavailable("No space left on device")

    monkeypatch.setattr(log, "append_columns_many", broken)


def need_redis() -> None:
    """Skip when redis-server or redis-cli is not installed, except under ``CI=true``, where
    that is a failure."""
    import shutil

    missing = [tool for tool in ("redis-server", "redis-cli") if shutil.which(tool) is None]
    if missing:
        message = f"{' and '.join(missing)} not installed (Debian package redis-server)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def redis(tmp_path):
    """A throw-away ``redis-server`` on a free port (``dccsign.testing.cluster.Redis``);
    skips when it is not installed, except under ``CI=true``, where that is a failure."""
    from dccsign.testing.cluster import Redis
    from dccsign.testing.net import free_port

    need_redis()
    server = Redis(tmp_path / "redis", free_port())
    server.start()
    try:
        server.wait_ready(60)
        yield server
    finally:
        server.stop()
