"""The wire format: frame headers, bit packing, and the multi-tensor container.

Every payload fedsqueeze produces is a *frame*::

    offset size  field
    0      4     magic  b"FSQZ"
    4      1     format version (currently 1)
    5      2     codec id (u16, stable number; see ``fedsqueeze.codecs.registry``)
    7      1     dtype code of the original tensor (see ``DTYPE_CODES``)
    8      1     flags (reserved, must be 0)
    9      1     ndim (0..8)
    10     4*nd  shape, one u32 per dimension
    ..     4     body length in bytes (u32)
    ..     4     CRC32 of header bytes before this field *and* of the body
    ..     n     body (codec specific; it carries every parameter needed to decode)

All integers are little-endian. The header is ``18 + 4*ndim`` bytes (22 for a vector).
"""

from fedsqueeze.wire.container import decode_container, encode_container, inspect_container
from fedsqueeze.wire.frame import (
    DTYPE_CODES,
    FORMAT_VERSION,
    MAGIC,
    FrameHeader,
    build_frame,
    inspect,
    parse_frame,
)

__all__ = [
    "DTYPE_CODES",
    "FORMAT_VERSION",
    "MAGIC",
    "FrameHeader",
    "build_frame",
    "decode_container",
    "encode_container",
    "inspect",
    "inspect_container",
    "parse_frame",
]
