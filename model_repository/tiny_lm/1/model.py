"""tiny_lm: a word-level trigram text generator served as a decoupled Triton model.

The model is counted at load time from ``corpus.txt`` beside this file (public-domain
U.S. founding documents and Lincoln speeches, see README.md). A token is one
whitespace-separated word of the corpus, emitted with one leading space. Tensor names
and semantics follow Triton's LLM backends; model_repository/README.md documents them.

Generation runs synchronously inside ``execute()`` on purpose: one instance serves one
sequence at a time, so concurrent requests wait in Triton's queue as on a busy GPU.
Only the optional config parameter ``concurrent_sequences`` (unset by default) changes
that, for load tests that need many streams at once.
"""

from __future__ import annotations

import json
import math
import random
import string
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

CORPUS = Path(__file__).with_name("corpus.txt")
DEFAULT_MAX_TOKENS = 16
SENTENCE_ENDS = (".", "?", "!", ":", ";")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def context_key(word: str) -> str:
    """What a word contributes as context: case and surrounding punctuation do not matter."""
    return word.strip(string.punctuation).lower() or word


def sample(counts: Counter, rng: random.Random, temperature: float, top_p: float) -> str:
    """One word from follower counts; temperature 0 is argmax (first seen wins a tie)."""
    ranked = counts.most_common()
    if temperature == 0.0:
        return ranked[0][0]
    # Weights relative to the top count, in log space so a tiny temperature cannot overflow.
    top = math.log(ranked[0][1])
    weights = [math.exp((math.log(count) - top) / temperature) for _, count in ranked]
    # Nucleus: the shortest most-likely prefix whose probability mass reaches top_p.
    budget = top_p * sum(weights)
    kept, mass = 0, 0.0
    while kept < len(weights) and (kept == 0 or mass < budget):
        mass += weights[kept]
        kept += 1
    point = rng.random() * mass
    for (word, _), weight in zip(ranked[:kept], weights[:kept]):
        point -= weight
        if point < 0.0:
            return word
    return ranked[kept - 1][0]


class TrigramModel:
    """Follower counts for two-word and one-word contexts, plus sentence starts."""

    def __init__(self, text: str) -> None:
        words = text.split()
        self.trigrams: dict[tuple[str, str], Counter] = defaultdict(Counter)
        self.bigrams: dict[str, Counter] = defaultdict(Counter)
        self.starts: Counter = Counter([words[0]])
        for first, second in zip(words, words[1:]):
            self.bigrams[context_key(first)][second] += 1
            if first.endswith(SENTENCE_ENDS):
                self.starts[second] += 1
        for first, second, third in zip(words, words[1:], words[2:]):
            self.trigrams[(context_key(first), context_key(second))][third] += 1

    def next_word(
        self, context: list[str], rng: random.Random, temperature: float, top_p: float
    ) -> str:
        """Continue the last two words if known, else the last word, else start a sentence."""
        keys = [context_key(word) for word in context[-2:]]
        followers = None
        if len(keys) == 2:
            followers = self.trigrams.get((keys[0], keys[1]))
        if not followers and keys:
            followers = self.bigrams.get(keys[-1])
        return sample(followers or self.starts, rng, temperature, top_p)


@dataclass
class Generation:
    """One validated request."""

    prompt: str
    max_tokens: int
    stream: bool
    temperature: float
    top_p: float
    seed: int | None
    stop_words: list[str]


def _decode(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name} is not valid UTF-8: {exc}") from None


def _scalar(request, name: str, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise ValueError(f"{name} must hold exactly one value, got {values.size}")
    return values[0]


def parse_request(request) -> Generation:
    """Read and validate every input; raises ValueError with a message for the client."""
    prompt = _decode(bytes(_scalar(request, "text_input", b"")), "text_input")
    max_tokens = int(_scalar(request, "max_tokens", DEFAULT_MAX_TOKENS))
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    temperature = float(_scalar(request, "temperature", 1.0))
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    top_p = float(_scalar(request, "top_p", 1.0))
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    seed = _scalar(request, "seed", None)
    stop_tensor = pb_utils.get_input_tensor_by_name(request, "stop_words")
    stop_values = [] if stop_tensor is None else stop_tensor.as_numpy().reshape(-1)
    # An empty stop word would match at once; it means "no stop word".
    stop_words = [word for word in (_decode(v, "stop_words") for v in stop_values) if word]
    return Generation(
        prompt=prompt,
        max_tokens=max_tokens,
        stream=bool(_scalar(request, "stream", False)),
        temperature=temperature,
        top_p=top_p,
        seed=None if seed is None else int(seed),
        stop_words=stop_words,
    )


def find_stop(text: str, start: int, stop_words: list[str]) -> int:
    """Index of the first stop word that ends after ``start`` in text, or -1."""
    hits = [text.find(word, max(0, start - len(word) + 1)) for word in stop_words]
    return min((hit for hit in hits if hit >= 0), default=-1)


def held_back(text: str, stop_words: list[str]) -> int:
    """How many trailing characters might begin a stop word and so cannot be streamed yet."""
    longest = 0
    for word in stop_words:
        for size in range(min(len(word) - 1, len(text)), longest, -1):
            if word.startswith(text[-size:]):
                longest = size
                break
    return longest


def response(text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int):
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor(
                "finish_reason", np.array([finish_reason.encode("utf-8")], dtype=np.object_)
            ),
            pb_utils.Tensor("prompt_tokens", np.array([prompt_tokens], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([completion_tokens], dtype=np.int32)),
        ]
    )


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        pace = parameters.get("ms_per_token", {}).get("string_value", "0")
        self.seconds_per_token = float(pace) / 1000.0
        # Above 1, sequences run on that many threads and execute() returns at once: a
        # decoupled model's response sender may answer after execute() returned.
        concurrent = int(parameters.get("concurrent_sequences", {}).get("string_value", "1"))
        self.pool = ThreadPoolExecutor(concurrent, "tiny_lm") if concurrent > 1 else None
        self.model = TrigramModel(CORPUS.read_text(encoding="utf-8"))
        # The family must stay referenced or Triton drops the metric from /metrics.
        self.tokens_family = pb_utils.MetricFamily(
            name="tiny_lm_tokens_generated_total",
            description="Tokens generated by tiny_lm, counted as each is produced",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.tokens = self.tokens_family.Metric(
            labels={"model": args["model_name"], "version": args["model_version"]}
        )
        # Metric updates from concurrent threads crash Triton 2.51's server (measured).
        self.tokens_lock = threading.Lock()

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                generation = parse_request(request)
            except ValueError as exc:
                error = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
                sender.send(error, flags=FINAL)
                continue
            if self.pool is None:
                self._generate(generation, sender)
            else:
                self.pool.submit(self._generate_on_thread, generation, sender)

    def finalize(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)  # let running sequences send their final response

    def _generate_on_thread(self, generation: Generation, sender) -> None:
        try:
            self._generate(generation, sender)
        except Exception as exc:  # the pool would keep it: end the stream with it instead
            error = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
            sender.send(error, flags=FINAL)

    def _generate(self, generation: Generation, sender) -> None:
        rng = random.Random(generation.seed)
        stop_words = generation.stop_words
        context = generation.prompt.split()
        prompt_tokens = len(context)
        text, sent, count, finish_reason = "", 0, 0, "length"
        while count < generation.max_tokens:
            if sender.is_cancelled():
                sender.send(flags=FINAL)
                return
            time.sleep(self.seconds_per_token)
            word = self.model.next_word(context, rng, generation.temperature, generation.top_p)
            context = [*context[-1:], word]
            count += 1
            with self.tokens_lock:
                self.tokens.increment(1)
            before = len(text)
            text += " " + word
            stop = find_stop(text, before, stop_words)
            if stop >= 0:
                text, finish_reason = text[:stop], "stop"
                break
            # The last token travels with the final response, which carries finish_reason.
            if generation.stream and count < generation.max_tokens:
                ready = len(text) - held_back(text, stop_words)
                if ready > sent:
                    sender.send(response(text[sent:ready], "", prompt_tokens, count))
                    sent = ready
        sender.send(response(text[sent:], finish_reason, prompt_tokens, count), flags=FINAL)
