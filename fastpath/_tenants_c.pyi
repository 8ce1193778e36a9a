# The compiled twin of _tenants_py: the same source, so the same API.
from fastpath._tenants_py import TenantLimiter as TenantLimiter
from fastpath._tenants_py import TenantLimits as TenantLimits
