"""tokenize: byte strings in, the same strings, their reversals and their lengths out.

For input TEXT = [t0, t1, ...] (BYTES, any bytes, including empty strings and NUL):
ECHO[i] = ti, REVERSED[i] = ti[::-1] (byte order reversed), LENGTHS[i] = len(ti) in bytes.
Nothing is decoded, so every byte value round-trips.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            # BYTES tensors arrive as object arrays of Python bytes: no decoding, no NUL trimming.
            items = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            reversed_items = np.array([item[::-1] for item in items], dtype=np.object_)
            lengths = np.array([len(item) for item in items], dtype=np.int32)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("ECHO", items),
                        pb_utils.Tensor("REVERSED", reversed_items),
                        pb_utils.Tensor("LENGTHS", lengths),
                    ]
                )
            )
        return responses
