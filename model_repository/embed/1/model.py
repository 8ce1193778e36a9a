"""embed: OUTPUT = INPUT @ W, a fixed random projection batched by Triton.

W has shape (input dims, output dims) from config.pbtxt and is
``(np.random.default_rng(weight_seed).standard_normal((384, 128)) / sqrt(384)).astype(float32)``,
so a client can compute the exact reference from the ``weight_seed`` parameter.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils


def projection(seed: int, rows: int, cols: int) -> np.ndarray:
    """The model's weight matrix: deterministic in (seed, rows, cols)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        seed = int(config["parameters"]["weight_seed"]["string_value"])
        rows = int(config["input"][0]["dims"][0])
        cols = int(config["output"][0]["dims"][0])
        self.weight = projection(seed, rows, cols)

    def execute(self, requests: list) -> list:
        batches = [pb_utils.get_input_tensor_by_name(r, "INPUT").as_numpy() for r in requests]
        # One matmul over everything dynamic batching gathered, then split per request.
        product = np.concatenate(batches) @ self.weight
        bounds = np.cumsum([len(b) for b in batches])[:-1]
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", part)])
            for part in np.split(product, bounds)
        ]
