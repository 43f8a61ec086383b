"""Protocol conformance at run time, for protocols of compiled modules.

``@runtime_checkable`` cannot be kept on a Protocol that mypyc compiles (docs/native.md), so
tests check what its ``isinstance`` would: every member the protocol declares exists on the
object.
"""

from __future__ import annotations


def protocol_members(protocol: type) -> list[str]:
    return [name for name in vars(protocol) if not name.startswith("_") or name == "__call__"]


def implements(obj: object, protocol: type) -> bool:
    members = protocol_members(protocol)
    return bool(members) and all(hasattr(obj, name) for name in members)
