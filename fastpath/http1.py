"""HTTP/1.1 request and reply heads, parsed (see fastpath/_http1_py.py).

Uses the compiled ``fastpath._http1_c`` unless ``MESHGATE_NO_EXTENSIONS`` is set or it
is not built, else the pure-Python twin; both stay reachable as ``http1_c`` (None when
not loaded) and ``http1_py`` so tests can exercise each.
"""

from typing import TYPE_CHECKING

from fastpath import _http1_py as http1_py
from fastpath._select import compiled_twin

http1_c = compiled_twin("_http1_c")

COMPILED: bool = http1_c is not None

# Type checkers see the pure-Python twin; the compiled one has the same signatures.
if TYPE_CHECKING or http1_c is None:
    from fastpath._http1_py import parse_reply_head, parse_request_head
else:
    from fastpath._http1_c import parse_reply_head, parse_request_head

__all__ = ["COMPILED", "http1_c", "http1_py", "parse_reply_head", "parse_request_head"]
