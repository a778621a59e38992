"""PKCS#11 key backend: DSC keys that live in a token (an HSM, or SoftHSM2 in tests and CI).

This is hazmat in the same sense as :class:`dccsign.native.SigningKey`, with one difference:
the private key never enters this process. :class:`Pkcs11SigningKey` has the exact interface
and semantics of the software key (``alg``, ``public_key_der()``, ``sign(protected,
payloads)``), so keyd can hold either. It signs only COSE Sig_structures that it builds itself
from a canonical protected header and a payload; there is no way to sign a caller's digest and
no way to read key material back.

Algorithms (SoftHSM 2.6.1 has no ``CKM_ECDSA_SHA256``, so the host always hashes):

* ES256 -- SHA-256 of the Sig_structure on the host, then ``CKM_ECDSA`` on the digest. The
  token returns raw ``r || s``; we normalise s to the low half (s > n/2 becomes n - s).
* PS256 -- SHA-256 on the host, then ``CKM_RSA_PKCS_PSS`` with SHA-256, MGF1-SHA-256 and a
  32-byte salt (RFC 8230; DCC verifiers reject other salt lengths).

Key protection. :meth:`Pkcs11Token.generate_key` creates the pair inside the token with a
sign-only private template (``CKA_SENSITIVE``, not ``CKA_EXTRACTABLE``, ``CKA_PRIVATE``, no
decrypt/unwrap/derive/sign-recover, not modifiable, not copyable). :meth:`Pkcs11Token.signing_key`
refuses a key unless it is sensitive and always was, is not extractable and never was, may
sign and do nothing else, requires login, and matches the DSC: the token's public key object
must equal the DSC's key, and a self-test signature by the private key must verify under the
DSC's key (which also catches a public object that does not belong to the private one).

Concurrency -- read this before using a token from several threads.

* python-pkcs11 0.10.1 calls ``C_Initialize(NULL)``: no locking flags, so SoftHSM2 turns its
  own locking off for the whole library. python-pkcs11 serialises operations *within* one
  session, but nothing else: two sessions used from two threads at once abort the process
  ("double free or corruption", reproduced here; SIGSEGV in the C measurements) because the
  object store and session table are shared library state.
* So this module keeps **one lock per loaded PKCS#11 module per process** and takes it around
  every call into the module: signing, object search, attribute reads, key generation, login
  and logout. With one token session per process (which :meth:`Pkcs11Token.open` enforces per
  token) that is one lock per token session; it is per module so that a second token of the
  same module cannot race the first.
* :meth:`Pkcs11SigningKey.sign` may be called from any thread. It hashes outside the lock,
  holds the lock for the token calls of the whole batch (python-pkcs11 releases the GIL inside
  each call, so other threads keep hashing and encoding meanwhile), and normalises low-S
  after releasing it. The token sets the pace: a second signing thread in the same process
  adds nothing (see the rates below).

To use more cores, run **one session per worker process**: each worker calls
:meth:`Pkcs11Token.open` itself (with the PIN handed to it over a pipe or read from the PIN
file) and then :meth:`Pkcs11Token.signing_key`::

    def worker_main(module, label, pin_source, key_id, dsc_der):
        token = Pkcs11Token.open(module, label, read_pin(pin_source), read_only=True)
        key = token.signing_key(key_id, dsc_der)
        ...  # serve sign requests with key.sign(...)

This works with the ``spawn`` and ``forkserver`` start methods and with ``fork``: a token or
signing key inherited across ``fork`` refuses to be used (its session belongs to the parent),
and the first :meth:`Pkcs11Token.open` in a forked child re-initialises the module in the
child. SoftHSM2 should run with ``library.reset_on_fork = true`` (as in the CI config).
**Start the workers' sessions one after another** (wait for each worker to report ready):
SoftHSM2's file store is not safe against one process logging in while another opens the
token (see :meth:`Pkcs11Token.open`, which retries that case, but should rarely need to).

Rates, ES256 on SoftHSM2 2.6.1 (2-core VM, 275-byte CWT; medians of 9 interleaved 2-second
runs, ``openssl speed`` anchor 36-40 k signs/s before and after):

=================================================== ============ ===========
path                                                 signs/s      vs direct
=================================================== ============ ===========
python-pkcs11 directly, CKM_ECDSA on a ready digest  9,991        1
``sign()`` with 1 payload per call                   8,500        0.85
``sign()`` with 4 payloads per call                  9,415        0.94
``sign()`` with 16 payloads per call                 9,550        0.96-0.97
``sign()`` with 64 payloads per call                 9,726        0.97
2 threads, one process (one lock), 1 payload/call    6,600-8,300  no gain
2 worker processes x 1 session, 1 payload/call       17,071       (direct: 19,418)
=================================================== ============ ===========

With the token replaced by a stub, the backend's own Python work costs 5.5 us per call plus
2 us per payload; the single-payload gap (~17 us of ~100) is larger than that because the
token's call itself runs slower when more Python work happens between calls. keyd batches,
and from 4 payloads per call on the backend stays above 0.9 of the direct rate.

The PIN comes from :func:`read_pin` (a file or a file descriptor), never from argv or the
environment, and never appears in an error message or log line. python-pkcs11 takes the PIN as
a ``str``; Python cannot wipe that string, so it lives until garbage collection like any other
secret handled by CPython.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import pkcs11
import pkcs11.exceptions as p11e
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass, TokenFlag

from .. import native
from ..errors import DccSignError

__all__ = [
    "Pkcs11Error",
    "Pkcs11SigningKey",
    "Pkcs11Token",
    "read_pin",
]

_ES256: Final = native.ES256
_PS256: Final = native.PS256
_ALG_BY_NAME: Final = {"ES256": _ES256, "PS256": _PS256}
_P256_N: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_P256_HALF_N: Final = _P256_N // 2
# DER of the named-curve OID 1.2.840.10045.3.1.7 (prime256v1), the CKA_EC_PARAMS of P-256.
_P256_PARAMS: Final = bytes.fromhex("06082a8648ce3d030107")
_RSA_BITS: Final = 2048
_PSS_PARAM: Final = (Mechanism.SHA256, pkcs11.MGF.SHA256, 32)
_PSS_VERIFY: Final = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
_KEY_ID_BYTES: Final = 16
_PIN_MAX: Final = 4096
# A fixed Sig_structure payload for the self-test in signing_key(): it is not a CWT, so the
# signature (which never leaves this module) could not pass for a DCC anyway.
_SELF_TEST_PAYLOAD: Final = b"dccsign pkcs11 key self-test: not a CWT"


class Pkcs11Error(DccSignError):
    """The token, the module or the PIN source cannot be used, or a key is refused.

    The message says why in words a security officer can act on. It never contains the PIN.
    """


# --------------------------------------------------------------------------------------------
# PIN


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def read_pin(source: str) -> bytes:
    """Read a token PIN from *source* and return it (one trailing newline removed).

    *source* is ``"file:/path"`` or a plain path (the file's contents), or ``"fd:N"`` (read
    file descriptor N to end of file, then close it: a PIN pipe is read exactly once). A
    trailing ``"\\n"`` or ``"\\r\\n"`` is removed once, so ``echo 1234 > pin`` works; any other
    byte is part of the PIN.

    Other schemes (``env:``, ``pass:`` ...) are refused on purpose: a PIN in argv or in the
    environment shows up in ``ps``, ``/proc/*/environ`` and crash dumps.

    Raises:
        Pkcs11Error: unsupported scheme, unreadable file or descriptor, empty PIN, or more than
            4096 bytes. The message names the file only when *source* is clearly a path
            (``file:`` or containing a ``/``): a bare word might be a PIN typed by mistake.
    """
    if not isinstance(source, str) or not source:
        raise Pkcs11Error("no PIN source given (use file:PATH or fd:N)")
    if source.startswith("fd:"):
        digits = source[3:]
        if not digits.isdigit():
            raise Pkcs11Error("a PIN source 'fd:N' needs a file descriptor number")
        data = _read_fd(int(digits))
        where = f"file descriptor {int(digits)}"
    else:
        explicit = source.startswith("file:")
        path = source[5:] if explicit else source
        scheme = _SCHEME.match(source)
        if not explicit and scheme and not os.path.exists(source):
            raise Pkcs11Error(
                f"PIN source scheme {scheme.group(0)!r} is not supported: "
                "PINs are read from file:PATH or fd:N only"
            )
        where = f"PIN file {path!r}" if explicit or "/" in path else "the PIN file given"
        try:
            with open(path, "rb") as f:
                data = f.read(_PIN_MAX + 1)
        except OSError as exc:
            # strerror only: str(exc) would repeat the path, which may be a mistyped PIN.
            raise Pkcs11Error(f"cannot read {where}: {exc.strerror}") from None
    if len(data) > _PIN_MAX:
        raise Pkcs11Error(f"{where} holds more than {_PIN_MAX} bytes: not a PIN")
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise Pkcs11Error(f"{where} is empty")
    return data


def _read_fd(fd: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= _PIN_MAX:
            chunk = os.read(fd, _PIN_MAX + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise Pkcs11Error(f"cannot read file descriptor {fd}: {exc.strerror}") from None
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------
# Loaded modules: one python-pkcs11 library object and one lock per module path and process


@dataclass(eq=False)
class _Module:
    """A loaded PKCS#11 module in this process.

    ``lock`` serialises every call into the module (python-pkcs11 initialises it without
    locking flags; see the module docstring). ``open_serials`` holds the serial numbers of
    tokens with an open :class:`Pkcs11Token` in this process: one session per token.
    """

    path: str
    lib: Any
    pid: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    open_serials: set[bytes] = field(default_factory=set)


_MODULES: dict[str, _Module] = {}
_MODULES_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    # Another thread may have held the registry lock at fork time; in the child that thread
    # does not exist, so the copied lock would stay locked forever.
    global _MODULES_LOCK
    _MODULES_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _load_module(module: str) -> _Module:
    path = os.path.realpath(module)
    pid = os.getpid()
    with _MODULES_LOCK:
        state = _MODULES.get(path)
        if state is not None and state.pid == pid:
            return state
        if not os.path.isfile(path):
            raise Pkcs11Error(f"PKCS#11 module not found: {module}")
        try:
            lib = pkcs11.lib(path)
            if state is not None:
                # Forked child of a process that had the module loaded: the library's state
                # (sessions, login) belongs to the parent. SoftHSM2 with reset_on_fork has
                # already dropped it, so C_Finalize may answer "not initialised"; either way
                # finish it and start afresh. The parent's lock may have been copied in the
                # locked state, so the child gets a new _Module and lock.
                try:
                    lib.finalize()
                except p11e.PKCS11Error:
                    pass
                lib.initialize()
        except p11e.PKCS11Error as exc:
            raise Pkcs11Error(f"cannot load PKCS#11 module {module}: {_why(exc)}") from None
        state = _Module(path=path, lib=lib, pid=pid)
        _MODULES[path] = state
        return state


def _reinitialize(state: _Module, module: str) -> None:
    """C_Finalize and C_Initialize again, dropping every session. Caller holds the lock."""
    try:
        state.lib.finalize()
    except p11e.PKCS11Error:
        pass  # python-pkcs11 marks the library uninitialised even when C_Finalize fails
    try:
        state.lib.initialize()
    except p11e.PKCS11Error as exc:
        raise Pkcs11Error(f"cannot re-initialise PKCS#11 module {module}: {_why(exc)}") from None


def _why(exc: BaseException) -> str:
    """A short reason from a python-pkcs11 exception (they carry no PIN)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Token


_OPEN_RETRY_DELAYS: Final = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8)


class _Transient(Exception):
    """A failure to find or log in to a token that may come from another process's
    concurrent login (see Pkcs11Token.open); its message is the final error if retrying and
    re-initialising do not help."""


def _login_failure(exc: p11e.PKCS11Error, what: str) -> Exception:
    """The error for a PKCS#11 failure while opening a session: a general error may be
    another process's concurrent login (retried as _Transient), any other one is final."""
    kind = _Transient if isinstance(exc, p11e.GeneralError) else Pkcs11Error
    return kind(f"{what}: {_why(exc)}")


#: What a failed login means, the first that matches: (python-pkcs11's exceptions, the error
#: raised, its message for the token's label). UserAlreadyLoggedIn: another user of the
#: module in this process (not this class) logged in.
_LOGIN_REFUSALS: Final[tuple[tuple[Any, type[Exception], str], ...]] = (
    (p11e.PinIncorrect, Pkcs11Error, "wrong PIN for token {label!r}"),
    (p11e.PinLocked, Pkcs11Error, "the user PIN of token {label!r} is locked"),
    (
        (p11e.PinLenRange, p11e.PinInvalid),
        Pkcs11Error,
        "the PIN has a length or characters token {label!r} does not accept",
    ),
    (
        p11e.UserAlreadyLoggedIn,
        Pkcs11Error,
        "token {label!r} is already logged in by other code in this process",
    ),
    (p11e.UserPinNotInitialized, _Transient, "token {label!r} has no user PIN set"),
)


def _refused_login(exc: p11e.PKCS11Error, token_label: str) -> Exception:
    """The error for *exc*, raised while opening a logged-in session on *token_label*: one
    of :data:`_LOGIN_REFUSALS`, else :func:`_login_failure`'s."""
    for kinds, error, message in _LOGIN_REFUSALS:
        if isinstance(exc, kinds):
            return error(message.format(label=token_label))
    return _login_failure(exc, f"cannot log in to token {token_label!r}")


def _login(
    state: _Module, module: str, token_label: str, pin_text: str, read_only: bool
) -> tuple[Any, Any]:
    """Find the token and open a logged-in session: (token, session). Caller holds the lock.

    Raises:
        _Transient: no such token, a general error, or token flags saying the PIN is locked
            or not set (all may be a race; see open()).
        Pkcs11Error: anything that retrying cannot fix.
    """
    try:
        token = state.lib.get_token(token_label=token_label)
    except p11e.NoSuchToken:
        try:
            # Uninitialised slots (SoftHSM2's spare slot) have an empty label.
            labels = sorted(t.label for t in state.lib.get_tokens() if t.label)
        except p11e.PKCS11Error:
            labels = []
        raise _Transient(
            f"no token labelled {token_label!r} in {module} (tokens: {labels or 'none'})"
        ) from None
    except p11e.MultipleTokensReturned:
        raise Pkcs11Error(f"more than one token is labelled {token_label!r} in {module}") from None
    except p11e.PKCS11Error as exc:
        raise _login_failure(exc, f"cannot list the tokens of {module}") from None
    if token.serial in state.open_serials:
        raise Pkcs11Error(
            f"token {token_label!r} is already open in this process: share that "
            "Pkcs11Token (one session per token and process)"
        )
    # Token flags may be a half-written read too (see open()): retried before believed.
    flags = token.flags
    if flags & TokenFlag.USER_PIN_LOCKED:
        raise _Transient(f"the user PIN of token {token_label!r} is locked")
    if not flags & TokenFlag.USER_PIN_INITIALIZED:
        raise _Transient(f"token {token_label!r} has no user PIN set")
    # python-pkcs11 opens the session and then logs in; when C_Login fails, the (logged-out)
    # session it opened stays open until the module is finalised. It has no handle we could
    # close, and holds no credentials.
    try:
        session = token.open(rw=not read_only, user_pin=pin_text)
    except p11e.PKCS11Error as exc:
        raise _refused_login(exc, token_label) from None
    state.open_serials.add(token.serial)
    return token, session


class _SessionHandle:
    """Base of the objects that hold this process's token session.

    They are made by a factory (never by their constructor) and cannot be pickled: a session
    handle means nothing in another process.
    """

    __slots__ = ()
    _USE_INSTEAD: ClassVar[str]  # the factory, named in the constructor's TypeError
    _NOT_PICKLABLE: ClassVar[str]  # the TypeError message of a pickling attempt

    def __init__(self) -> None:
        raise TypeError(f"use {self._USE_INSTEAD}")

    def __reduce__(self) -> Any:
        raise TypeError(self._NOT_PICKLABLE)


class Pkcs11Token(_SessionHandle):
    """A logged-in session to one token of a PKCS#11 module (one per token and process).

    Create it with :meth:`open`; end it with :meth:`close` (or use it as a context manager).
    All methods are thread-safe (they take the module lock). Signing keys obtained from
    :meth:`signing_key` share this session and stop working when it is closed.
    """

    __slots__ = ("_closed", "_label", "_module", "_pid", "_read_only", "_serial", "_session")
    _USE_INSTEAD = "Pkcs11Token.open()"
    _NOT_PICKLABLE = "a Pkcs11Token is a session of this process and cannot be pickled"

    @classmethod
    def open(
        cls, module: str, token_label: str, pin: bytes, *, read_only: bool = False
    ) -> Pkcs11Token:
        """Load *module*, find the token labelled *token_label* and log in with *pin*.

        *read_only* opens a read-only session: enough to sign, not to generate keys (keyd
        should use it). Only one :class:`Pkcs11Token` per token may be open in a process
        (PKCS#11 login state is per process and token, and a second ``C_Login`` fails).

        Failures that may be another process's concurrent login (token missing, general
        error, PIN flags) are retried for about 2 s before they are reported.

        Raises:
            Pkcs11Error: the module file is missing or does not load; no token (or more than
                one) has that label; the token is already open in this process; the PIN is
                wrong, locked, empty or not UTF-8. The PIN itself is never in the message.
        """
        if not isinstance(pin, (bytes, bytearray)) or not pin:
            raise Pkcs11Error("an empty PIN was given")
        try:
            pin_text = bytes(pin).decode("utf-8")
        except UnicodeDecodeError:
            raise Pkcs11Error("the PIN is not valid UTF-8") from None
        state = _load_module(module)
        # SoftHSM2's file store is shared by every process using the token, and a login or
        # logout in one process rewrites token state that a concurrent C_Initialize,
        # C_GetTokenInfo or C_Login in another process may read half-written. That process
        # then fails with CKR_GENERAL_ERROR, "PIN not initialised" or a missing token, and
        # keeps failing until the module is re-initialised: SoftHSM2 keeps the bad state.
        # (Measured: a process listing tokens while another logged in and out failed ~20,000
        # times in 4 s; searches, attribute reads and signing in an open session never did.)
        # So such failures are retried, re-initialising the module first when no token of
        # this process is open on it. A wrong PIN is never retried.
        for delay in (*_OPEN_RETRY_DELAYS, None):
            with state.lock:
                try:
                    token, session = _login(state, module, token_label, pin_text, read_only)
                    break
                except _Transient as exc:
                    if delay is None:
                        raise Pkcs11Error(str(exc)) from None
                    if not state.open_serials:
                        _reinitialize(state, module)
            # Jitter, so that workers started together do not retry in lock-step.
            time.sleep(delay * random.uniform(0.5, 1.5))
        self = object.__new__(cls)
        self._module = state
        self._session = session
        self._label = token_label
        self._serial = token.serial
        self._read_only = read_only
        self._pid = state.pid
        self._closed = False
        return self

    @property
    def label(self) -> str:
        return self._label

    def __enter__(self) -> Pkcs11Token:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Pkcs11Token {self._label!r} {state}>"

    def close(self) -> None:
        """Log out and close the session. Idempotent.

        A token inherited across ``fork`` is only marked closed: its session belongs to the
        parent process.
        """
        if self._closed:
            return
        state = self._module
        with state.lock:
            if self._closed:
                return
            self._closed = True
            if os.getpid() != self._pid:
                return
            state.open_serials.discard(self._serial)
            try:
                self._session.close()
            except p11e.PKCS11Error as exc:
                raise Pkcs11Error(f"closing token {self._label!r}: {_why(exc)}") from None

    def _check_usable(self) -> None:
        """Caller holds the module lock."""
        if self._closed:
            raise Pkcs11Error(f"token {self._label!r} is closed")
        if os.getpid() != self._pid:
            raise Pkcs11Error(
                f"token {self._label!r} was opened in another process (inherited across "
                "fork): open the token again in this process"
            )

    # ---- keys -----------------------------------------------------------------------------

    def generate_key(self, alg: str, label: str) -> str:
        """Generate a key pair *inside* the token and return its key id (hex of CKA_ID).

        *alg* is ``"ES256"`` (EC P-256) or ``"PS256"`` (RSA 2048, exponent 65537). The
        private key is a token object that is private, sensitive, not extractable, not
        modifiable or copyable, and may sign but not decrypt, unwrap, derive or sign-recover.
        The CKA_ID is 16 random bytes, shared by the public and the private object; *label*
        goes into CKA_LABEL of both. The pair's attributes are read back, and a token that
        did not honour the template has its new pair destroyed and the call fails.

        Raises:
            Pkcs11Error: unknown *alg*, empty *label*, a read-only session, or the token
                refused the generation.
        """
        if alg not in _ALG_BY_NAME:
            raise Pkcs11Error(f"unknown algorithm {alg!r}: use ES256 or PS256")
        if not isinstance(label, str) or not label:
            raise Pkcs11Error("a key label is required")
        if self._read_only:
            raise Pkcs11Error(f"token {self._label!r} is open read-only: cannot generate keys")
        key_type, bits, public, private = _keypair_templates(alg)
        state = self._module
        with state.lock:
            self._check_usable()
            key_id = os.urandom(_KEY_ID_BYTES)
            try:
                if any(True for _ in self._session.get_objects({Attribute.ID: key_id})):
                    raise Pkcs11Error("random key id collision; try again")  # 2^-128
                pub, priv = self._session.generate_keypair(
                    key_type,
                    bits,
                    id=key_id,
                    label=label,
                    store=True,
                    capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                    public_template=public,
                    private_template=private,
                )
            except p11e.PKCS11Error as exc:
                raise Pkcs11Error(
                    f"token {self._label!r} refused to generate a {alg} key: {_why(exc)}"
                ) from None
            self._destroy_unless_protected(pub, priv)
        return key_id.hex()

    def _destroy_unless_protected(self, pub: Any, priv: Any) -> None:
        """Read a new pair's attributes back; destroy the pair if the token did not honour
        the template. Caller holds the lock.

        Raises:
            Pkcs11Error: the pair was not protected as asked (or its attributes cannot be
                read), and has been destroyed.
        """
        try:
            problem = _protection_problem(priv)
        except p11e.PKCS11Error as exc:
            problem = f"its attributes cannot be read ({_why(exc)})"
        if problem:
            for obj in (priv, pub):
                try:
                    obj.destroy()
                except p11e.PKCS11Error:
                    pass
            raise Pkcs11Error(
                f"token {self._label!r} did not honour the key template ({problem}); "
                "the new key was destroyed"
            )

    def public_key_der(self, key_id: str) -> bytes:
        """The public key of key *key_id* as DER SubjectPublicKeyInfo (for a CSR or a match).

        Raises:
            Pkcs11Error: malformed key id, no (or several) public key objects with that id, or
                a key that is neither EC P-256 nor RSA.
        """
        cka_id = _parse_key_id(key_id)
        with self._module.lock:
            self._check_usable()
            return _spki(self._find(ObjectClass.PUBLIC_KEY, cka_id, key_id))

    def csr(self, key_id: str, subject: Any, eku_oids: list[str]) -> bytes:
        """A PEM PKCS#10 request for key *key_id*, signed inside the token.

        The request is built here from *subject* (a ``cryptography.x509.Name``), the token's
        public key and the extended key usages (*eku_oids*, dotted), so the token signs a CSR
        and nothing a caller chose: ES256 keys sign ecdsa-with-SHA256 (``CKM_ECDSA`` on the
        host's SHA-256), PS256 keys sha256WithRSAEncryption (``CKM_SHA256_RSA_PKCS``), which
        every CA accepts in a CSR.

        Raises:
            Pkcs11Error: malformed key id, no such key, or the token refused to sign.
        """
        from .csr import ECDSA_SHA256, RSA_SHA256, build_csr, to_pem

        cka_id = _parse_key_id(key_id)
        with self._module.lock:
            self._check_usable()
            priv = self._find(ObjectClass.PRIVATE_KEY, cka_id, key_id)
            public_der = _spki(self._find(ObjectClass.PUBLIC_KEY, cka_id, key_id))
            alg, _ = _private_key_kind(priv)

            def sign(info: bytes) -> bytes:
                if alg == _ES256:
                    raw = priv.sign(hashlib.sha256(info).digest(), mechanism=Mechanism.ECDSA)
                    return encode_dss_signature(
                        int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
                    )
                return priv.sign(info, mechanism=Mechanism.SHA256_RSA_PKCS)

            algorithm = ECDSA_SHA256 if alg == _ES256 else RSA_SHA256
            try:
                der = build_csr(subject, public_der, eku_oids, algorithm, sign)
            except p11e.PKCS11Error as exc:
                raise Pkcs11Error(
                    f"token {self._label!r} refused to sign the CSR: {_why(exc)}"
                ) from None
        return to_pem(der)

    def signing_key(self, key_id: str, dsc_public_key_der: bytes) -> Pkcs11SigningKey:
        """The signing key *key_id*, after checking that it is protected and matches the DSC.

        Refuses (with the reason) unless the private key has CKA_SENSITIVE and
        CKA_ALWAYS_SENSITIVE true, CKA_EXTRACTABLE false and CKA_NEVER_EXTRACTABLE true,
        CKA_SIGN true, CKA_PRIVATE true (else it could sign without login), and CKA_DECRYPT,
        CKA_UNWRAP, CKA_DERIVE and CKA_SIGN_RECOVER false (sign-only: an RSA decryption oracle
        is a signing oracle); unless it is EC P-256 or RSA 2048-4096; and unless the token's
        public key equals *dsc_public_key_der* (DER SubjectPublicKeyInfo of the DSC) and a
        self-test signature made by the private key verifies under the DSC's key.

        Raises:
            Pkcs11Error: any of the above, a malformed key id or DSC key, or no such key.
        """
        cka_id = _parse_key_id(key_id)
        try:
            dsc_key = serialization.load_der_public_key(bytes(dsc_public_key_der))
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise Pkcs11Error("the DSC public key is not a DER SubjectPublicKeyInfo") from None
        dsc_spki = dsc_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        with self._module.lock:
            self._check_usable()
            try:
                priv = self._find(ObjectClass.PRIVATE_KEY, cka_id, key_id)
                problem = _protection_problem(priv)
                if problem:
                    raise Pkcs11Error(f"key {key_id} refused: {problem}")
                alg, size = _private_key_kind(priv)
                token_spki = _spki(self._find(ObjectClass.PUBLIC_KEY, cka_id, key_id))
                # An RSA private object carries its modulus: compare it too, so a public
                # object planted next to someone else's private key is caught before signing.
                rsa_numbers = (
                    (
                        int.from_bytes(priv[Attribute.MODULUS], "big"),
                        int.from_bytes(priv[Attribute.PUBLIC_EXPONENT], "big"),
                    )
                    if alg == _PS256
                    else None
                )
            except p11e.PKCS11Error as exc:
                raise Pkcs11Error(f"cannot inspect key {key_id}: {_why(exc)}") from None
        if token_spki != dsc_spki:
            raise Pkcs11Error(
                f"key {key_id} refused: the token's public key is not the DSC's public key"
            )
        if isinstance(dsc_key, rsa.RSAPublicKey):
            dsc_numbers = dsc_key.public_numbers()
            if rsa_numbers != (dsc_numbers.n, dsc_numbers.e):
                raise Pkcs11Error(
                    f"key {key_id} refused: the private key's modulus is not the DSC's"
                )
        key = Pkcs11SigningKey._make(self, priv, alg, size, dsc_spki)
        # Proof of possession: the private object (not just the public one) matches the DSC.
        protected = native.protected_header(alg, bytes(8))
        (sig,) = key.sign(protected, [_SELF_TEST_PAYLOAD])
        tbs = native.sig_structure(protected, _SELF_TEST_PAYLOAD)
        try:
            if isinstance(dsc_key, ec.EllipticCurvePublicKey):
                der = encode_dss_signature(
                    int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
                )
                dsc_key.verify(der, tbs, ec.ECDSA(hashes.SHA256()))
            elif isinstance(dsc_key, rsa.RSAPublicKey):
                dsc_key.verify(sig, tbs, _PSS_VERIFY, hashes.SHA256())
            else:  # unreachable: the SPKI comparison above already matched an EC or RSA key
                raise Pkcs11Error(f"key {key_id} refused: unsupported DSC key type")
        except InvalidSignature:
            raise Pkcs11Error(
                f"key {key_id} refused: its self-test signature does not verify under the "
                "DSC's key (the private key does not belong to the DSC)"
            ) from None
        return key

    def _find(self, cls: ObjectClass, cka_id: bytes, key_id: str) -> Any:
        """The one object of class *cls* with CKA_ID *cka_id*. Caller holds the lock."""
        try:
            found = list(self._session.get_objects({Attribute.CLASS: cls, Attribute.ID: cka_id}))
        except p11e.PKCS11Error as exc:
            raise Pkcs11Error(f"cannot search token {self._label!r}: {_why(exc)}") from None
        what = "private key" if cls == ObjectClass.PRIVATE_KEY else "public key"
        if not found:
            raise Pkcs11Error(f"no {what} with id {key_id} in token {self._label!r}")
        if len(found) > 1:
            raise Pkcs11Error(f"{len(found)} {what} objects share id {key_id}: ambiguous")
        return found[0]


def _keypair_templates(
    alg: str,
) -> tuple[KeyType, int | None, dict[Any, Any], dict[Any, Any]]:
    """Key type, RSA bits (None for EC), public and private templates of a new *alg* pair.

    The private key is a token object that is private, sensitive, not extractable, not
    modifiable or copyable, and may sign but not decrypt, unwrap, derive or sign-recover.
    """
    common: dict[Any, Any] = {Attribute.TOKEN: True, Attribute.DERIVE: False}
    public: dict[Any, Any] = {
        **common,
        Attribute.PRIVATE: False,
        Attribute.VERIFY: True,
        Attribute.VERIFY_RECOVER: False,
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
    }
    private: dict[Any, Any] = {
        **common,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
        Attribute.SIGN_RECOVER: False,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
        # Not modifiable: nobody can later switch on CKA_DECRYPT or relabel the key.
        # Not copyable: C_CopyObject cannot make a twin with other usages.
        Attribute.MODIFIABLE: False,
        Attribute.COPYABLE: False,
    }
    if alg == "ES256":
        public[Attribute.EC_PARAMS] = _P256_PARAMS
        return KeyType.EC, None, public, private
    return KeyType.RSA, _RSA_BITS, public, private


def _parse_key_id(key_id: str) -> bytes:
    try:
        cka_id = bytes.fromhex(key_id)
    except (ValueError, TypeError):
        raise Pkcs11Error(f"malformed key id {key_id!r}: expected hex") from None
    if not cka_id:
        raise Pkcs11Error("empty key id")
    return cka_id


# The attributes a signing key must have, with the value required and why it matters.
_REQUIRED: Final = (
    (Attribute.SENSITIVE, True, "CKA_SENSITIVE is false (its value can be read)"),
    (Attribute.ALWAYS_SENSITIVE, True, "CKA_ALWAYS_SENSITIVE is false (it was once readable)"),
    (Attribute.EXTRACTABLE, False, "CKA_EXTRACTABLE is true (it can be wrapped out)"),
    (
        Attribute.NEVER_EXTRACTABLE,
        True,
        "CKA_NEVER_EXTRACTABLE is false (it was once extractable, or imported)",
    ),
    (Attribute.SIGN, True, "CKA_SIGN is false"),
    (Attribute.PRIVATE, True, "CKA_PRIVATE is false (usable without login)"),
    (Attribute.DECRYPT, False, "CKA_DECRYPT is true (not sign-only)"),
    (Attribute.UNWRAP, False, "CKA_UNWRAP is true (not sign-only)"),
    (Attribute.DERIVE, False, "CKA_DERIVE is true (not sign-only)"),
    (Attribute.SIGN_RECOVER, False, "CKA_SIGN_RECOVER is true (not sign-only)"),
)


def _protection_problem(priv: Any) -> str:
    """Empty when *priv* is protected and sign-only, else every reason, joined.

    Caller holds the lock. An attribute the token does not report counts as failing: a
    protection we cannot see is one we cannot rely on.
    """
    problems = []
    for attr, wanted, reason in _REQUIRED:
        try:
            value = priv[attr]
        except (p11e.AttributeTypeInvalid, p11e.AttributeSensitive):
            problems.append(f"{attr.name} cannot be read")
            continue
        if bool(value) is not wanted:
            problems.append(reason)
    return "; ".join(problems)


def _private_key_kind(priv: Any) -> tuple[int, int]:
    """(COSE alg, signature size in bytes) of a private key object. Caller holds the lock."""
    key_type = priv[Attribute.KEY_TYPE]
    if key_type == KeyType.EC:
        if priv[Attribute.EC_PARAMS] != _P256_PARAMS:
            raise Pkcs11Error("the EC key is not on P-256 (prime256v1): ES256 needs P-256")
        return _ES256, 64
    if key_type == KeyType.RSA:
        bits = len(priv[Attribute.MODULUS].lstrip(b"\0")) * 8
        if not 2048 <= bits <= 4096:
            raise Pkcs11Error(f"RSA key of about {bits} bits: PS256 needs 2048 to 4096 bits")
        return _PS256, (bits + 7) // 8
    raise Pkcs11Error(f"key type {key_type!r} is neither EC P-256 nor RSA")


def _spki(pub: Any) -> bytes:
    """DER SubjectPublicKeyInfo of a public key object. Caller holds the lock."""
    key_type = pub[Attribute.KEY_TYPE]
    key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    if key_type == KeyType.EC:
        if pub[Attribute.EC_PARAMS] != _P256_PARAMS:
            raise Pkcs11Error("the EC public key is not on P-256 (prime256v1)")
        point = pub[Attribute.EC_POINT]
        # PKCS#11 says CKA_EC_POINT is a DER OCTET STRING; some tokens give the bare point.
        if len(point) == 67 and point[:2] == b"\x04\x41":
            point = point[2:]
        try:
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        except ValueError:
            raise Pkcs11Error("the token's EC point is not a valid P-256 point") from None
    elif key_type == KeyType.RSA:
        key = rsa.RSAPublicNumbers(
            int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big"),
            int.from_bytes(pub[Attribute.MODULUS], "big"),
        ).public_key()
    else:
        raise Pkcs11Error(f"key type {key_type!r} is neither EC P-256 nor RSA")
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --------------------------------------------------------------------------------------------
# Signing key


class Pkcs11SigningKey(_SessionHandle):
    """A token-held ES256 or PS256 key with the interface of :class:`dccsign.native.SigningKey`.

    Obtained from :meth:`Pkcs11Token.signing_key` (which checked its protection and its DSC).
    It holds a handle, never key material, and cannot be pickled. Thread-safe: see the module
    docstring for the lock and its cost.

    Attributes:
        alg: the COSE algorithm this key signs with (-7 ES256, -37 PS256).
    """

    __slots__ = ("_buffer", "_key", "_mechanism", "_param", "_spki", "_token", "alg")
    _USE_INSTEAD = "Pkcs11Token.signing_key()"
    _NOT_PICKLABLE = "a Pkcs11SigningKey is a token session handle and cannot be pickled"

    @classmethod
    def _make(
        cls, token: Pkcs11Token, priv: Any, alg: int, sig_size: int, spki: bytes
    ) -> Pkcs11SigningKey:
        self = object.__new__(cls)
        self._token = token
        self._key = priv
        self.alg = alg
        self._spki = spki
        if alg == _ES256:
            self._mechanism, self._param = Mechanism.ECDSA, None
        else:
            self._mechanism, self._param = Mechanism.RSA_PKCS_PSS, _PSS_PARAM
        # python-pkcs11 allocates an 8 KiB output buffer per call by default; the signature
        # size is known, so ask for exactly that.
        self._buffer = sig_size
        return self

    def __repr__(self) -> str:
        name = "ES256" if self.alg == _ES256 else "PS256"
        return f"<Pkcs11SigningKey {name} in {self._token.label!r}>"

    def public_key_der(self) -> bytes:
        """The public key as DER SubjectPublicKeyInfo (equal to the DSC's, checked at creation)."""
        return self._spki

    def sign(self, protected: bytes, payloads: Sequence[bytes]) -> list[bytes]:
        """Sign the Sig_structure of each payload under *protected*, in the token.

        Returns one signature per payload: ES256 as 64-byte raw ``r || s`` (each half
        left-padded, s in the low half), PS256 as the RSA-PSS signature (salt 32).

        Raises:
            ValueError: *protected* is not the canonical header for this key's algorithm.
            TypeError: a payload is not ``bytes``.
            Pkcs11Error: the token is closed, was opened in another process, or failed.
        """
        native.check_protected(self.alg, protected)
        items = tuple(payloads)
        for i, p in enumerate(items):
            if type(p) is not bytes:
                raise TypeError(f"payload {i} must be bytes, not {type(p).__name__}")
        sha256 = hashlib.sha256
        build = native.sig_structure
        # Hash before taking the lock: the lock serialises the token, not the host work.
        digests = [sha256(build(protected, p)).digest() for p in items]
        token = self._token
        sign = self._key.sign
        mechanism, param, size = self._mechanism, self._param, self._buffer
        with token._module.lock:
            token._check_usable()
            try:
                raw = [
                    sign(d, mechanism=mechanism, mechanism_param=param, buffer_size=size)
                    for d in digests
                ]
            except p11e.PKCS11Error as exc:
                raise Pkcs11Error(f"token {token.label!r} failed to sign: {_why(exc)}") from None
        if self.alg != _ES256:
            return raw
        out = []
        for sig in raw:
            if len(sig) != 64:
                raise Pkcs11Error(f"the token returned a {len(sig)}-byte ECDSA signature")
            s = int.from_bytes(sig[32:], "big")
            if s > _P256_HALF_N:
                # low-S: (r, n - s) verifies as well and makes the signature unique, so
                # signature-hash revocation lists stay stable.
                sig = sig[:32] + (_P256_N - s).to_bytes(32, "big")
            out.append(sig)
        return out
