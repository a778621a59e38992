"""The one value both sans-IO codecs (:mod:`.wire`, :mod:`.keyd`) return when they need more
bytes, like h11's ``NEED_DATA``: compare with ``is``."""

from __future__ import annotations

from typing import Final, final

__all__ = ["NEED_DATA", "NeedData"]


@final
class NeedData:
    """The type of :data:`NEED_DATA`, its only instance."""

    __slots__ = ()
    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"

    def __reduce__(self) -> str:
        return "NEED_DATA"  # a copy or an unpickled one is the module's own instance


#: Returned by ``next_event()`` (and the wire codec's ``next_frame()``) when the bytes
#: received so far hold no complete frame.
NEED_DATA: Final = NeedData()
