"""Per-tenant limits: requests per second, concurrency, tokens per minute (see ``_tenants_py``).

Uses the compiled ``fastpath._tenants_c`` unless ``MESHGATE_NO_EXTENSIONS`` is set or it
is not built, else the pure-Python twin; both stay reachable as ``tenants_c`` (None when
not loaded) and ``tenants_py`` so tests can exercise each.
"""

from typing import TYPE_CHECKING

from fastpath import _tenants_py as tenants_py
from fastpath._select import compiled_twin

tenants_c = compiled_twin("_tenants_c")

COMPILED: bool = tenants_c is not None

# Type checkers see the pure-Python twin; the compiled one has the same signatures.
if TYPE_CHECKING or tenants_c is None:
    from fastpath._tenants_py import TenantLimiter, TenantLimits
else:
    from fastpath._tenants_c import TenantLimiter, TenantLimits

__all__ = ["COMPILED", "TenantLimiter", "TenantLimits", "tenants_c", "tenants_py"]
