"""Length-prefixed encoding of associated data.

    encode(f1, f2, ...) = len(f1) || f1 || len(f2) || f2 || ...     len = uint32 big-endian

Every field is prefixed, so no two different tuples encode to the same bytes (("ab", "c") and
("a", "bc") differ), which a plain concatenation would not guarantee.
"""

from __future__ import annotations

import struct

_LEN = struct.Struct(">I")


def encode(*fields: bytes) -> bytes:
    """Encodes fields as length-prefixed bytes (see the module docstring)."""
    return b"".join(_LEN.pack(len(f)) + f for f in fields)
