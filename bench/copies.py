"""How many tensor-sized buffers the gateway allocates per 4 MiB request, and how much
of the tensor the kernel reads straight into them (issue 8, "zero-copy": the tensor
bytes are copied at most once inside the gateway, each way).

    .venv/bin/python -m bench.copies [--mib 4] [--requests 5]

One real tritonserver, and one gateway per front end (the fast lane, and aiohttp's with
``--no-fast-lane``), each started with ``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc
serves every allocation of 128 KiB or more with its own ``mmap`` (growing one with
``mremap``). ``strace`` counts those calls of at least the tensor's size while binary
``infer`` requests of a ``--mib`` MiB BYTES tensor, its echo asked back as binary, go
to ``tokenize`` from ``curl``: each is a buffer that holds a whole copy of the tensor.
Receiving the request and receiving the reply need one each, so 2 per request is the
floor for a proxy that holds whole messages (nginx streams them instead).

It also sums the bytes of the ``read`` calls that ask for more than uvloop's own read
buffer holds (256,000 bytes): only a body being received in place (``gateway.http1.
BodyReceiver``, which asks for what the body lacks) asks for more, so those bytes went
from the kernel into their final buffer with no copy in the gateway. Any other read
lands in uvloop's buffer, which it copies into a new ``bytes`` for the protocol, which
copies it on: the first read of each message (its head and the body's first bytes), and
every read of a front end that does not receive in place. Reported per request as a
share of the tensor's two crossings (request in, reply in). Needs Debian's strace
and curl. Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.measure import binary_infer_body
from bench.record import write_record
from gateway.local_triton import TritonFleet, find_free_port_base
from tests.e2e.conftest import start_gateway, stop_gateway

REPO = Path(__file__).resolve().parents[1]
_SIZE = re.compile(rb"(mmap\(NULL, |mremap\(0x[0-9a-f]+, \d+, )(\d+)")
_READ = re.compile(rb"read\(\d+, .*?, (\d+)\)\s+=\s+(\d+)")
# uvloop asks every read for this much, into its own buffer (UV_STREAM_RECV_BUF_SIZE).
_LOOP_READ_BYTES = 256_000


def tokenize_request(mib: int) -> tuple[bytes, int]:
    """A binary infer body echoing ``mib`` MiB of 4 KiB strings, and its header length."""
    count = mib * 256
    rng = np.random.default_rng(0)
    tensor = b"".join(
        len(s).to_bytes(4, "little") + s for s in (rng.bytes(4092) for _ in range(count))
    )
    body, headers = binary_infer_body([("TEXT", "BYTES", [count], tensor)], ["ECHO"])
    return body, int(headers["Inference-Header-Content-Length"])


def curl(url: str, body_file: Path, header_length: int) -> int:
    """POST the file (a plain request: no ``Expect: 100-continue``); the status."""
    command = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Expect:"]
    command += ["-H", f"Inference-Header-Content-Length: {header_length}"]
    command += ["--data-binary", f"@{body_file}", url]
    return int(subprocess.run(command, capture_output=True, check=True).stdout)


def copies_per_request(
    url: str, pid: int, body_file: Path, header_length: int, size: int, requests: int, log: Path
) -> tuple[float, float]:
    """Tensor-sized mmap/mremap calls of the gateway process per request, and the share
    of the tensor's two crossings that the kernel read straight into a body buffer."""
    for _ in range(50):  # discovery finds the model within a few passes
        if curl(url, body_file, header_length) == 200:
            break
        time.sleep(0.2)
    trace = log.with_suffix(".strace")
    command = ["strace", "-f", "-s", "0", "-e", "trace=mmap,mremap,read", "-o", str(trace)]
    strace = subprocess.Popen([*command, "-p", str(pid)], stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached to every thread
    for _ in range(requests):
        assert curl(url, body_file, header_length) == 200
    strace.terminate()
    strace.wait()
    text = trace.read_bytes()
    sizes = [int(m.group(2)) for m in _SIZE.finditer(text)]
    buffers = sum(1 for s in sizes if s >= size) / requests
    in_place = sum(int(got) for asked, got in _READ.findall(text) if int(asked) > _LOOP_READ_BYTES)
    return buffers, in_place / (2 * size * requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=4)
    parser.add_argument("--requests", type=int, default=5)
    args = parser.parse_args()
    body, header_length = tokenize_request(args.mib)
    size = len(body) - header_length
    results: dict[str, float] = {}
    in_place: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        body_file = Path(tmp) / "body"
        body_file.write_bytes(body)
        fleet = TritonFleet(
            count=1,
            port_base=find_free_port_base(1),
            model_repository=REPO / "model_repository",
            log_dir=Path(tmp),
        )
        with fleet:
            for name, flag in (("fast lane", "--fast-lane"), ("aiohttp", "--no-fast-lane")):
                log = Path(tmp) / f"gateway-{flag}.log"
                gateway = start_gateway(
                    [fleet.servers[0].backend_url],
                    log,
                    flag,
                    "--max-body-bytes",
                    str(4 * size),
                    env={"MALLOC_MMAP_THRESHOLD_": "131072"},
                )
                try:
                    url = gateway.url + "/v2/models/tokenize/infer"
                    results[name], in_place[name] = copies_per_request(
                        url,
                        gateway.process.pid,
                        body_file,
                        header_length,
                        size,
                        args.requests,
                        log,
                    )
                finally:
                    stop_gateway(gateway)
                print(
                    f"{name:10s} tensor-sized buffers per request: {results[name]:.1f}, "
                    f"read in place: {in_place[name]:.0%} of the tensor's two crossings"
                )
    write_record(
        "copies",
        f"copies-{args.mib}mib",
        {
            "tensor_bytes": size,
            "requests": args.requests,
            "buffers_per_request": results,
            "read_in_place_share": in_place,
        },
    )


if __name__ == "__main__":
    main()
