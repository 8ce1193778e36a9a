# meshgate gateway image: compiled fastpath, non-root.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY fastpath ./fastpath
COPY gateway ./gateway
COPY adapters ./adapters
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim AS runtime
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 meshgate
USER meshgate
EXPOSE 8080
HEALTHCHECK --interval=5s --timeout=2s --retries=12 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/v2/health/ready').status != 200)"
ENTRYPOINT ["meshgate"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
