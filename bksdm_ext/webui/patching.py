"""Wrapping a function of the WebUI or of another extension where its callers look it up."""

from __future__ import annotations

_MARK = "__bksdm_wrapped__"


def wrap(owner, name: str, make, kind=None) -> None:
    """Replace `owner.name` by `make(original)`; idempotent ("Reload UI" imports our script again).

    `kind`: `staticmethod` when `owner` is a class whose attribute is one (it is called unbound).
    """
    original = getattr(owner, name)
    if getattr(original, _MARK, False):
        return
    wrapped = make(original)
    wrapped.__wrapped__ = original
    setattr(wrapped, _MARK, True)
    setattr(owner, name, kind(wrapped) if kind else wrapped)


def is_wrapped(function) -> bool:
    return bool(getattr(function, _MARK, False))
