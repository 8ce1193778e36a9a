# meshgate images. Stages:
#   build    compiles the Cython fastpath into wheels (meshgate and its dependencies)
#   triton   NVIDIA's Triton 24.10 (2.51) with model_repository/ baked in, for Kubernetes
#   runtime  the gateway (default target): compiled fastpath, non-root; also runs the
#            GPU adapter sidecar (`meshgate adapter gpu`)
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY fastpath ./fastpath
COPY gateway ./gateway
COPY adapters ./adapters
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM nvcr.io/nvidia/tritonserver:24.10-py3 AS triton
COPY model_repository /models
CMD ["tritonserver", "--model-repository=/models"]

FROM python:3.11-slim AS runtime
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 meshgate
# Fail the build if a compiled module is missing: the pure-Python twins would run, slower.
RUN python -c "import importlib, pkgutil, fastpath; \
mods = [importlib.import_module('fastpath.' + m.name) for m in pkgutil.iter_modules(fastpath.__path__)]; \
missing = [m.__name__ for m in mods if getattr(m, 'COMPILED', True) is False]; \
assert not missing, f'not compiled: {missing}'"
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=5s --timeout=2s --retries=12 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/v2/health/ready').status != 200)"
ENTRYPOINT ["meshgate"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
