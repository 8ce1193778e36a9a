"""The compiled twin is the one in use, unless MESHGATE_NO_EXTENSIONS=1 asks otherwise.

A build that silently fell back to pure Python would pass every other test while
being many times slower: this test is what fails then (aiohttp's test_c_parser_loaded).
"""

from __future__ import annotations

import importlib.machinery
from types import ModuleType

import pytest

from fastpath import (
    NO_EXTENSIONS,
    admission,
    framing,
    grpc_wire,
    http1,
    infer_request,
    scoring,
    tenants,
)

# (selector module, its compiled twin, its pure twin, a public name both export)
SELECTORS = [
    (framing, framing.framing_c, framing.framing_py, "serialize_bytes_tensor"),
    (grpc_wire, grpc_wire.grpc_wire_c, grpc_wire.grpc_wire_py, "decode_infer_response"),
    (scoring, scoring.scoring_c, scoring.scoring_py, "Scorer"),
    (admission, admission.admission_c, admission.admission_py, "Admitter"),
    (tenants, tenants.tenants_c, tenants.tenants_py, "TenantLimiter"),
    (http1, http1.http1_c, http1.http1_py, "parse_request_head"),
    (
        infer_request,
        infer_request.infer_request_c,
        infer_request.infer_request_py,
        "parse_infer_request",
    ),
]


@pytest.mark.parametrize(
    ("selector", "compiled", "pure", "name"), SELECTORS, ids=[s[0].__name__ for s in SELECTORS]
)
def test_selected_implementation(
    selector: ModuleType, compiled: ModuleType | None, pure: ModuleType, name: str
) -> None:
    if NO_EXTENSIONS:
        assert compiled is None and not selector.COMPILED
        assert getattr(selector, name) is getattr(pure, name)
        return
    assert compiled is not None, f"{selector.__name__}: the compiled twin did not load"
    assert selector.COMPILED
    assert str(compiled.__file__).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert getattr(selector, name) is getattr(compiled, name)
