"""Value sets: the code lists a DCC's coded fields must come from.

Two sources:

* :meth:`ValueSets.builtin` — the tables shipped in ``dccsign/dcc/data/valuesets.json`` (our own
  compact format, derived once from the eHN value-set release named in its ``release`` key).
  Loaded through :mod:`importlib.resources`, so it also works from a zip or wheel.
* :meth:`ValueSets.from_directory` — newer value-set files in the official format
  (``{"valueSetId": ..., "valueSetDate": ..., "valueSetValues": {code: {"display": ...,
  "active": ...}}}``), one set per file, layered over the builtin tables.

Set ids are the official file names without ``.json``; :data:`FIELD_SETS` lists the ones the
validator consults. ``test-manf`` (the RAT device list) is deliberately absent from the
builtin tables: the only copy in the value-set repository is an example, not the real list,
so a test's ``ma`` is only restricted once a directory supplies a ``test-manf`` set.

Codes whose ``active`` flag is false stay *known*: they describe events in the past, and a
certificate for such an event is still correct. The flag is kept for :meth:`is_active`.

A :class:`ValueSets` is immutable and safe to share between threads.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, NamedTuple

__all__ = ["FIELD_SETS", "OFFICIAL_IDS", "ValueSets"]

#: Which set each coded DCC field is checked against (``<group>.<field>``).
FIELD_SETS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "v.tg": "disease-agent-targeted",
        "t.tg": "disease-agent-targeted",
        "r.tg": "disease-agent-targeted",
        "v.vp": "vaccine-prophylaxis",
        "v.mp": "vaccine-medicinal-product",
        "v.ma": "vaccine-mah-manf",
        "t.tt": "test-type",
        "t.tr": "test-result",
        "t.ma": "test-manf",
        "v.co": "country-2-codes",
        "t.co": "country-2-codes",
        "r.co": "country-2-codes",
    }
)

#: The ``valueSetId`` each official file carries (they differ from the file names). Used to
#: catch a file saved under the name of another set.
OFFICIAL_IDS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "disease-agent-targeted": "disease-agent-targeted",
        "vaccine-prophylaxis": "sct-vaccines-covid-19",
        "vaccine-medicinal-product": "vaccines-covid-19-names",
        "vaccine-mah-manf": "vaccines-covid-19-auth-holders",
        "test-type": "covid-19-lab-test-type",
        "test-result": "covid-19-lab-result",
        "test-manf": "covid-19-lab-test-manufacturer-and-name",
        "country-2-codes": "country-2-codes",
    }
)
_SET_OF_OFFICIAL_ID = {official: ours for ours, official in OFFICIAL_IDS.items()}

# ISO 3166-1 alpha-2 shape. The schema's `co` pattern needs upper-case letters, so a country
# code of another shape in a loaded file must never make a `co` acceptable (see _Lookup).
_COUNTRY_RE = re.compile(r"[A-Z]{2}")

_BUILTIN_FORMAT = 1


class _Entry(NamedTuple):
    """One code of a set: its display text and active flag."""

    display: str | None
    active: bool


class _Lookup:
    """The code tables the validator consults, resolved once per :class:`ValueSets`.

    Each attribute is a frozenset of codes (the fastest ``in`` test CPython has);
    ``test_manf`` is ``None`` when no RAT device list is loaded, and then any device id is
    accepted. Internal to :mod:`dccsign.dcc.validate`.
    """

    __slots__ = ("co", "mp", "test_manf", "tg", "tr", "tt", "vma", "vp")

    def __init__(self, sets: Mapping[str, Mapping[str, _Entry]]) -> None:
        def codes(set_id: str) -> frozenset[str]:
            return frozenset(sets.get(set_id, ()))

        self.tg = codes("disease-agent-targeted")
        self.vp = codes("vaccine-prophylaxis")
        self.mp = codes("vaccine-medicinal-product")
        self.vma = codes("vaccine-mah-manf")
        self.tt = codes("test-type")
        self.tr = codes("test-result")
        self.co = frozenset(c for c in codes("country-2-codes") if _COUNTRY_RE.fullmatch(c))
        self.test_manf = codes("test-manf") if "test-manf" in sets else None


class ValueSets:
    """An immutable collection of value sets, keyed by set id (e.g. ``"test-type"``).

    Build one with :meth:`builtin` or :meth:`from_directory`; the constructor is internal.
    """

    __slots__ = ("_lookup", "_release", "_sets")

    _sets: Mapping[str, Mapping[str, _Entry]]
    _release: str
    _lookup: _Lookup

    def __init__(self, sets: Mapping[str, Mapping[str, _Entry]], release: str) -> None:
        frozen = {sid: MappingProxyType(dict(codes)) for sid, codes in sets.items()}
        object.__setattr__(self, "_sets", MappingProxyType(frozen))
        object.__setattr__(self, "_release", release)
        object.__setattr__(self, "_lookup", _Lookup(frozen))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __repr__(self) -> str:
        return f"<ValueSets release={self._release!r} sets={sorted(self._sets)}>"

    # -- construction -------------------------------------------------------------------

    @classmethod
    def builtin(cls) -> ValueSets:
        """Return the value sets shipped with the package (loaded once, then cached).

        Raises:
            RuntimeError: the packaged table is missing or corrupt (a broken installation).
        """
        cached = _BUILTIN_CACHE.get("builtin")
        if cached is None:
            with _BUILTIN_LOCK:
                cached = _BUILTIN_CACHE.get("builtin")
                if cached is None:
                    cached = cls._load_builtin()
                    _BUILTIN_CACHE["builtin"] = cached
        return cached

    @classmethod
    def _load_builtin(cls) -> ValueSets:
        try:
            raw = resources.files("dccsign.dcc").joinpath("data/valuesets.json").read_bytes()
            doc = json.loads(raw)
            if doc.get("format") != _BUILTIN_FORMAT:
                raise ValueError(f"unsupported table format {doc.get('format')!r}")
            sets: dict[str, dict[str, _Entry]] = {}
            for set_id, body in doc["sets"].items():
                inactive = frozenset(body.get("inactive", ()))
                sets[set_id] = {
                    code: _Entry(display, code not in inactive)
                    for code, display in body["codes"].items()
                }
            return cls(sets, str(doc["release"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RuntimeError(f"dccsign's packaged value-set table is unusable: {exc}") from exc

    @classmethod
    def from_directory(cls, path: str | os.PathLike[str]) -> ValueSets:
        """Load official-format value-set files from ``path`` over the builtin tables.

        Every ``*.json`` directly inside ``path`` must be one value set. Its set id is the
        file name without ``.json`` (``vaccine-medicinal-product.json`` replaces the builtin
        ``vaccine-medicinal-product`` set as a whole); sets with other names are loaded too
        and can be queried, but the validator only consults the ids in :data:`FIELD_SETS`.
        A file named ``test-manf.json`` makes the RAT device list binding.

        Raises:
            FileNotFoundError, NotADirectoryError: ``path`` is not a directory.
            ValueError: a file is not valid JSON or not a value set (the message names the
                file and the problem), a file's ``valueSetId`` belongs to another set, or the
                directory holds no ``*.json`` file.
        """
        directory = Path(path)
        if not directory.is_dir():
            if directory.exists():
                raise NotADirectoryError(f"value-set path is not a directory: {directory}")
            raise FileNotFoundError(f"value-set directory not found: {directory}")
        files = sorted(p for p in directory.glob("*.json") if p.is_file())
        if not files:
            raise ValueError(f"no value-set files (*.json) in {directory}")
        base = cls.builtin()
        sets: dict[str, Mapping[str, _Entry]] = dict(base._sets)
        for file in files:
            sets[file.stem] = _parse_official_file(file)
        return cls(sets, f"{base._release}+{directory.name}")

    # -- queries ------------------------------------------------------------------------

    @property
    def release(self) -> str:
        """Where the tables come from: the builtin release, plus the directory name if any."""
        return self._release

    @property
    def set_ids(self) -> frozenset[str]:
        """The ids of all loaded sets."""
        return frozenset(self._sets)

    def has_set(self, set_id: str) -> bool:
        """Whether a set with this id is loaded."""
        return set_id in self._sets

    def contains(self, set_id: str, code: str) -> bool:
        """Whether ``code`` is a known code of set ``set_id`` (active or not).

        An unknown ``set_id`` contains nothing. Never raises for str arguments.
        """
        codes = self._sets.get(set_id)
        return codes is not None and isinstance(code, str) and code in codes

    def _entry(self, set_id: str, code: str) -> _Entry | None:
        """The entry of ``code`` in ``set_id``; ``None`` when either is unknown."""
        codes = self._sets.get(set_id)
        if codes is None or not isinstance(code, str):
            return None
        return codes.get(code)

    def display(self, set_id: str, code: str) -> str | None:
        """The display text of ``code`` in ``set_id``, or ``None`` if unknown or absent."""
        entry = self._entry(set_id, code)
        return None if entry is None else entry.display

    def is_active(self, set_id: str, code: str) -> bool | None:
        """The ``active`` flag of ``code`` in ``set_id``; ``None`` when the code is unknown."""
        entry = self._entry(set_id, code)
        return None if entry is None else entry.active

    def codes(self, set_id: str) -> frozenset[str]:
        """All codes of ``set_id`` (empty when the set is not loaded)."""
        return frozenset(self._sets.get(set_id, ()))


_BUILTIN_CACHE: dict[str, ValueSets] = {}
_BUILTIN_LOCK = threading.Lock()


def _parse_official_file(file: Path) -> dict[str, _Entry]:
    """Parse one official-format value-set file; ValueError names the file and the problem."""

    def bad(problem: str) -> ValueError:
        return ValueError(f"value-set file {file}: {problem}")

    try:
        doc: Any = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise bad("the top level must be a JSON object")
    set_id = doc.get("valueSetId")
    if not isinstance(set_id, str) or not set_id:
        raise bad("'valueSetId' must be a non-empty string")
    claimed = _SET_OF_OFFICIAL_ID.get(set_id)
    if claimed is not None and file.stem in OFFICIAL_IDS and claimed != file.stem:
        raise bad(f"valueSetId {set_id!r} belongs to set {claimed!r}, not {file.stem!r}")
    values = doc.get("valueSetValues")
    if not isinstance(values, dict) or not values:
        raise bad("'valueSetValues' must be a non-empty JSON object of code -> entry")
    return dict(_parse_entries(values.items(), bad))


def _parse_entries(items: Iterable[tuple[str, object]], bad: Any) -> Iterable[tuple[str, _Entry]]:
    for code, entry in items:
        if not code:
            raise bad("a code must be a non-empty string")
        if not isinstance(entry, dict):
            raise bad(f"the entry of code {code!r} must be a JSON object")
        display = entry.get("display")
        if display is not None and not isinstance(display, str):
            raise bad(f"'display' of code {code!r} must be a string")
        # A missing flag means active: the official files always carry it, and treating an
        # unflagged code as retired would silently reject valid certificates.
        active = entry.get("active", True)
        if not isinstance(active, bool):
            raise bad(f"'active' of code {code!r} must be true or false")
        yield code, _Entry(display, active)
