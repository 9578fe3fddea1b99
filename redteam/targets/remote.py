"""A face-verification API as a target, ``--target remote:api.yaml``, or a vendor's command-line tool,
``--target exec:tool.yaml``, each described by a spec file.

The API compares two faces; redteam treats it as a recogniser whose "embedding" is the image itself and whose
similarity is one request per pair (``similarity(a, b)``), so every threat that compares a probe with an enrolment
image (dodging, impersonation) and every query attack works unchanged, and the oracle counts each request. It
offers scores or decisions only, as the spec says; never gradients.

A spec (YAML)::

    url: http://127.0.0.1:8080/verify
    method: POST                            # default
    headers: {X-API-Key: "${MY_API_KEY}"}   # ${VAR}: from the environment when the target loads, never stored
    body: multipart                         # or json (images as base64 strings)
    fields: {image: $PROBE, other: $REFERENCE}
    encoding: png                           # or jpeg (with quality: 1-100): the API sees the image re-encoded
    answer: score                           # where the answer is in the JSON reply: a.b.0.c
    meaning: similarity                     # similarity (higher: same person), distance, confidence (0-100)
                                            # or decision (a boolean, or a string listed in match_values)
    threshold: 0.45                         # for a score: where it decides "same person"
    threshold_from: thresholds.1e-4         # optional: where replies state the vendor's threshold; each reply's
                                            # must equal `threshold` (else the run stops, saying so)
    missing: 0                              # optional: the value an absent answer stands for (an API that
                                            # lists no match under its cut-off); absent answers are errors otherwise
    timeout: 30                             # seconds per request
    concurrency: 4                          # requests in flight at once (default 1), when the API allows it
    retries: 5                              # on 429, 5xx and connection errors, exponential backoff,
                                            # honouring Retry-After
    insecure: false                         # true: skip TLS certificate checks (warned about at load)

A tool's spec has ``command`` instead of ``url``, ``headers``, ``body`` and ``fields``: its argument list (never a
shell string), with ``$PROBE`` and ``$REFERENCE`` where the two image files go, e.g. ``command: [vendor-cli,
compare, $PROBE, $REFERENCE, --json]``; its standard output is read like a reply (JSON at ``answer``; an empty
``answer`` takes the whole output, a JSON value or plain text).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import httpx
import numpy as np
import torch
import yaml
from PIL import Image
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential
from torch import Tensor, nn

from redteam.api import TARGETS, FaceRecognizer, ModelCard, Preprocessing
from redteam.console import console
from redteam.errors import RedteamError

Meaning = Literal["similarity", "distance", "confidence", "decision"]
PLACEHOLDERS = ("$PROBE", "$REFERENCE")
#: A reply larger than this is refused unread (a misbehaving API must not fill memory).
MAX_REPLY_BYTES = 1 << 20


class RemoteError(RedteamError):
    """The API cannot be used: a wrong spec, a refusal, or an endpoint that stays down."""


@dataclass(frozen=True)
class RemoteSpec:
    """A parsed, checked spec file (see the module docstring)."""

    path: Path
    meaning: Meaning
    answer: str
    url: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    command: list[str] | None = None
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    body: Literal["multipart", "json"] = "multipart"
    encoding: Literal["png", "jpeg"] = "png"
    quality: int = 95
    threshold: float | None = None
    threshold_from: str | None = None
    missing: float | None = None
    match_values: tuple[str, ...] = ("match", "same", "true", "yes")
    timeout: float = 30.0
    concurrency: int = 1
    retries: int = 5
    insecure: bool = False

    @classmethod
    def load(cls, path: Path, kind: Literal["remote", "exec"]) -> RemoteSpec:
        """Read and check a spec of an API (``remote``) or a tool (``exec``); one-line :class:`RemoteError` naming
        the file and key otherwise."""
        if not path.is_file():
            raise RemoteError(f"remote spec {path} does not exist.")
        try:
            raw = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise RemoteError(f"{path} is not a YAML spec: {str(error).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise RemoteError(f"{path} must be a YAML mapping (url:, fields:, answer:, meaning:, ...).")
        known = {f for f in cls.__dataclass_fields__ if f != "path"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RemoteError(f"{path}: unknown key {', '.join(unknown)}; a spec takes {', '.join(sorted(known))}.")
        needed = ("url", "fields") if kind == "remote" else ("command",)
        missing = [key for key in (*needed, "answer", "meaning") if key not in raw]
        if missing:
            raise RemoteError(f"{path}: missing {', '.join(missing)}.")
        spec = cls(path=path, **raw)
        spec.check()
        return spec

    def check(self) -> None:
        where = str(self.path)
        if (self.url is None) == (self.command is None):
            raise RemoteError(f"{where}: give either url (an API) or command (a tool), not both.")
        if self.command is not None:
            if not isinstance(self.command, list) or not all(isinstance(a, str) for a in self.command):
                raise RemoteError(f"{where}: command is a list of arguments such as [tool, $PROBE, $REFERENCE].")
            placed = self.command
        else:
            if not re.match(r"https?://", str(self.url)):
                raise RemoteError(f"{where}: url must start with http:// or https://, not {self.url!r}.")
            placed = list(self.fields.values()) if isinstance(self.fields, dict) else []
        if self.meaning not in ("similarity", "distance", "confidence", "decision"):
            raise RemoteError(
                f"{where}: meaning is similarity, distance, confidence or decision, not {self.meaning!r}."
            )
        if self.meaning != "decision" and self.threshold is None:
            raise RemoteError(f"{where}: a {self.meaning} needs its threshold (where the API decides a match).")
        if self.threshold_from is not None and self.threshold is None:
            raise RemoteError(f"{where}: threshold_from checks replies against threshold; give threshold too.")
        if not isinstance(self.concurrency, int) or not 1 <= self.concurrency <= 64:
            raise RemoteError(f"{where}: concurrency is a whole number of requests in flight, 1 to 64.")
        if self.body not in ("multipart", "json") or self.encoding not in ("png", "jpeg"):
            raise RemoteError(f"{where}: body is multipart or json and encoding png or jpeg.")
        if sorted(v for v in placed if v in PLACEHOLDERS) != sorted(PLACEHOLDERS):
            what = "command" if self.command is not None else "fields"
            raise RemoteError(f"{where}: {what} must place both $PROBE and $REFERENCE once each.")

    @property
    def answers(self) -> Literal["scores", "decisions"]:
        return "decisions" if self.meaning == "decision" else "scores"

    def resolved_headers(self) -> dict[str, str]:
        """Headers with ``${VAR}`` taken from the environment (a one-line error naming an unset variable)."""

        def value(match: re.Match[str]) -> str:
            name = match.group(1)
            if not os.environ.get(name):
                raise RemoteError(f"{self.path}: header needs ${{{name}}}, which is unset or empty.")
            return os.environ[name]

        return {key: re.sub(r"\$\{(\w+)\}", value, str(text)) for key, text in self.headers.items()}


class RemoteRecognizer(FaceRecognizer):
    """A face API behind a spec: ``embed`` is the image itself, ``similarity`` one request per pair."""

    spec: ClassVar[RemoteSpec]
    keeps_ledger = True

    def __init__(self) -> None:
        super().__init__()
        self.placement = nn.Parameter(torch.zeros(0))  # a target lives on a device: one (empty) parameter
        self.headers = self.spec.resolved_headers()
        if self.spec.insecure:
            console.print(f"warning: {self.spec.path} turns TLS certificate checks off (insecure: true)")
        self.client = httpx.Client(timeout=self.spec.timeout, follow_redirects=False, verify=not self.spec.insecure)
        self.retrying = _with_retries(self.spec.retries)  # built once: every request goes through it
        concurrent = self.spec.concurrency > 1
        self.pool = ThreadPoolExecutor(self.spec.concurrency, "redteam-request") if concurrent else None

    @classmethod
    def weights_fingerprint(cls) -> str:
        """What the API is: the spec's content (secrets stay in the environment, not in the file)."""
        return hashlib.sha256(cls.spec.path.read_bytes()).hexdigest()

    @property
    def threshold(self) -> float:
        if self.threshold_override is not None:
            return self.threshold_override
        return 0.5 if self.spec.threshold is None else self.as_similarity(self.spec.threshold)

    def threshold_text(self, threshold: float | None = None) -> str:
        if self.spec.meaning == "decision":
            return "the API's own (it answers decisions)"
        value = self.threshold if threshold is None else threshold
        return f"{self.spec.meaning} {-value if self.spec.meaning == 'distance' else value:g}"

    def embed(self, images: Tensor) -> Tensor:
        return images.flatten(1)

    def similarity(self, a: Tensor, b: Tensor) -> Tensor:
        """One request per row pair of flattened ``[B, 3 * S * S]`` images -> ``[B]`` scores (higher: same)."""
        encoded: dict[bytes, bytes] = {}  # a call's rows share few references: encode each once

        def reference(flat: Tensor) -> bytes:
            pixels = self._pixels(flat)
            key = pixels.tobytes()
            if key not in encoded:
                encoded[key] = self._encoded(pixels)
            return encoded[key]

        pairs = [(self._encoded(self._pixels(x)), reference(y)) for x, y in zip(a, b)]
        if self.pool is None or len(pairs) < 2:
            scores = [self.compare(*pair) for pair in pairs]
        else:  # the answers do not depend on the order they arrive in: the same scores, sooner
            scores = list(self.pool.map(lambda pair: self.compare(*pair), pairs))
        return torch.tensor(scores, dtype=a.dtype, device=a.device)

    def similarity_matrix(self, a: Tensor, b: Tensor) -> Tensor:
        raise RemoteError("a remote verification API compares pairs; identification needs an identify endpoint.")

    def compare(self, probe: bytes, reference: bytes) -> float:
        """The API's answer for two encoded images, on the similarity scale (a decision is 1 or 0)."""
        return self.as_similarity(self.ask(probe, reference)[0])

    def ask(self, probe: bytes, reference: bytes) -> tuple[float | bool | str, Any]:
        """The value the spec reads from the API's reply for two encoded images, and the whole reply."""
        reply = self._send(probe, reference)
        self._check_threshold(reply)
        return self._read(reply), reply

    def encode(self, image: Tensor) -> bytes:
        """``[3, S, S]`` in ``[0, 1]`` -> the bytes sent (the spec's encoding)."""
        return self._encoded(self._pixels(image.flatten()))

    @staticmethod
    def _pixels(flat: Tensor) -> np.ndarray:
        """A flattened ``[3 * S * S]`` image in ``[0, 1]`` -> ``[S, S, 3]`` 8-bit pixels."""
        side = int(round((flat.numel() / 3) ** 0.5))
        pixels = (flat.detach().view(3, side, side).permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()
        return np.ascontiguousarray(pixels)

    def _encoded(self, pixels: np.ndarray) -> bytes:
        """Pixels in the spec's encoding (JPEG at its quality)."""
        buffer = io.BytesIO()
        # PNG at zlib's fastest level: lossless all the same, and 2-3x faster on lightly perturbed faces.
        options = {"quality": self.spec.quality} if self.spec.encoding == "jpeg" else {"compress_level": 1}
        Image.fromarray(pixels).save(buffer, format=self.spec.encoding.upper(), **options)
        return buffer.getvalue()

    def _send(self, probe: bytes, reference: bytes) -> Any:
        """The reply to a comparison: from the ledger when this exact request was answered before, else asked (and
        then kept in the ledger with its status, latency and tries)."""
        request = hashlib.sha256(hashlib.sha256(probe).digest() + hashlib.sha256(reference).digest()).hexdigest()
        kept = self.ledger.answer(request) if self.ledger is not None else None
        if kept is not None:
            return kept
        started, tries = time.monotonic(), [0]
        if self.spec.command is not None:
            reply, status = self._run(probe, reference), 0
            tries[0] = 1
        else:
            reply, status = self._post(probe, reference, tries)
        if self.ledger is not None:
            self.ledger.record(request, reply, status, time.monotonic() - started, tries[0])
        return reply

    def _post(self, probe: bytes, reference: bytes, tries: list[int]) -> tuple[Any, int]:
        """The API's JSON reply and status; ``tries[0]`` counts the requests it took."""
        images = {"$PROBE": probe, "$REFERENCE": reference}
        kind = f"image/{self.spec.encoding}"
        if self.spec.body == "multipart":
            files = {
                k: (f"{k}.{self.spec.encoding}", images[v], kind) for k, v in self.spec.fields.items() if v in images
            }
            data = {k: v for k, v in self.spec.fields.items() if v not in images}
            request = {"files": files, "data": data}
        else:
            body = {k: base64.b64encode(images[v]).decode() if v in images else v for k, v in self.spec.fields.items()}
            request = {"json": body}

        def attempt() -> tuple[Any, int]:
            tries[0] += 1
            return self._request(request)

        return self.retrying(attempt)()

    def _run(self, probe: bytes, reference: bytes) -> Any:
        """The tool run on the two images written to files; its output as JSON where it is JSON, else text."""
        with tempfile.TemporaryDirectory(prefix="redteam-exec-") as folder:
            files = {}
            for placeholder, data in (("$PROBE", probe), ("$REFERENCE", reference)):
                files[placeholder] = Path(folder) / f"{placeholder[1:].lower()}.{self.spec.encoding}"
                files[placeholder].write_bytes(data)
            arguments = [str(files.get(argument, argument)) for argument in self.spec.command or []]
            try:
                done = subprocess.run(arguments, capture_output=True, timeout=self.spec.timeout, check=False)
            except (OSError, subprocess.TimeoutExpired) as error:
                raise RemoteError(f"{arguments[0]} could not run: {error}") from None
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise RemoteError(f"{arguments[0]} failed (exit {done.returncode}): {tail[0][:200]}")
        output = done.stdout[:MAX_REPLY_BYTES].decode(errors="replace").strip()
        try:
            return json.loads(output)
        except ValueError:
            return output

    def _request(self, request: dict[str, Any]) -> tuple[Any, int]:
        assert self.spec.url is not None
        try:
            reply = self.client.request(self.spec.method, self.spec.url, headers=self.headers, **request)
        except httpx.TransportError as error:
            raise Transient(f"{type(error).__name__}: {error}", None) from None
        if reply.status_code == 429 or reply.status_code >= 500:
            raise Transient(f"HTTP {reply.status_code}", reply.headers.get("Retry-After"))
        if len(reply.content) > MAX_REPLY_BYTES:
            raise RemoteError(f"{self.spec.url} answered {len(reply.content)} bytes; more than a verdict needs.")
        if reply.status_code >= 400:
            raise RemoteError(f"{self.spec.url} refused the request: HTTP {reply.status_code} {reply.text[:200]}")
        try:
            return reply.json(), reply.status_code
        except ValueError:
            raise RemoteError(f"{self.spec.url} answered something that is not JSON: {reply.text[:100]!r}") from None

    def _read(self, reply: Any) -> float | bool | str:
        """The value at the spec's ``answer`` path (``missing`` where the reply has none and the spec gives it)."""
        try:
            return _at(reply, self.spec.answer)
        except KeyError:
            if self.spec.missing is not None:
                return self.spec.missing
            raise RemoteError(
                f"{self.spec.path}: answer {self.spec.answer!r} is not in the reply {reply!r:.200}."
            ) from None
        except TypeError:
            raise RemoteError(
                f"{self.spec.path}: answer {self.spec.answer!r} in {reply!r:.100} is not a value."
            ) from None

    def _check_threshold(self, reply: Any) -> None:
        """Stop when the API states a threshold (``threshold_from``) other than the spec's: every verdict would be
        judged at the wrong operating point."""
        if self.spec.threshold_from is None or self.spec.threshold is None:
            return
        try:
            stated = float(_at(reply, self.spec.threshold_from))
        except (KeyError, TypeError, ValueError):
            raise RemoteError(f"{self.spec.path}: threshold_from {self.spec.threshold_from!r} is not a number in "
                              f"the reply {reply!r:.200}.") from None  # fmt: skip
        if abs(stated - self.spec.threshold) > 1e-6 * max(1.0, abs(stated)):
            raise RemoteError(f"{self.spec.path}: the API decides at {stated:g} ({self.spec.threshold_from}), the "
                              f"spec at threshold {self.spec.threshold:g}: correct the spec.")  # fmt: skip

    def as_similarity(self, value: float | bool | str) -> float:
        """A value as the API means it -> a similarity (higher: same person)."""
        meaning = self.spec.meaning
        if meaning == "decision":
            if isinstance(value, str):
                return float(value.strip().lower() in self.spec.match_values)
            return float(bool(value))
        if isinstance(value, bool):
            raise RemoteError(f"{self.spec.path}: a {meaning} answer must be a number, got {value!r}.")
        try:
            number = float(value)
        except ValueError:
            raise RemoteError(f"{self.spec.path}: a {meaning} answer must be a number, got {value!r}.") from None
        return -number if meaning == "distance" else number


def _at(reply: Any, path: str) -> float | bool | str:
    """The value at a dotted ``path`` (``a.b.0.c``) of a JSON reply; ``KeyError`` where the path is absent (an index
    past a list's end included), ``TypeError`` where it ends on a list or mapping."""
    value = reply
    for part in filter(None, path.split(".")):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(path)
    if isinstance(value, bool | int | float | str):
        return value
    raise TypeError(path)


class Transient(Exception):
    """A failure worth retrying (429, 5xx, a dropped connection), with the server's Retry-After if any."""

    def __init__(self, what: str, retry_after: str | None):
        super().__init__(what)
        self.retry_after = float(retry_after) if retry_after and retry_after.isdigit() else None


def _with_retries(attempts: int):
    """Retry transient failures with exponential backoff (1 s doubling, at most 30 s), waiting at least what the
    server's Retry-After asks; after ``attempts`` more tries, one :class:`RemoteError` line."""
    backoff = wait_exponential(multiplier=1, max=30)

    def wait(state: Any) -> float:
        error = state.outcome.exception()
        asked = error.retry_after if isinstance(error, Transient) and error.retry_after else 0.0
        return max(asked, backoff(state))

    def give_up(state: Any) -> None:
        raise RemoteError(f"the API stays unavailable after {state.attempt_number} tries: {state.outcome.exception()}")

    return retry(
        retry=retry_if_exception(lambda error: isinstance(error, Transient)),
        wait=wait,
        stop=stop_after_attempt(attempts + 1),
        retry_error_callback=give_up,
        reraise=False,
    )


@TARGETS.register_scheme("remote", "a face-verification API described by a spec file (remote:api.yaml)")
def remote_target(argument: str) -> type[RemoteRecognizer]:
    """The target class for the API spec at ``argument``."""
    return _target_class("remote", argument)


@TARGETS.register_scheme("exec", "a vendor's command-line tool described by a spec file (exec:tool.yaml)")
def exec_target(argument: str) -> type[RemoteRecognizer]:
    """The target class for the tool spec at ``argument``."""
    return _target_class("exec", argument)


def _target_class(kind: Literal["remote", "exec"], argument: str) -> type[RemoteRecognizer]:
    spec = RemoteSpec.load(Path(argument), kind)
    where = f"the API at {spec.url}" if spec.url else f"the tool {(spec.command or ['?'])[0]}"
    card = ModelCard(
        name=f"{kind}:{argument}",
        task="recognition",
        architecture=where,
        weights="unknown (the vendor's)",
        licence="the vendor's terms",
        preprocessing=Preprocessing(mean=None, notes=f"sent as {spec.encoding.upper()}; the vendor's own beyond"),
        threshold=spec.threshold,
        notes=f"answers {spec.answers}: {spec.meaning} at {spec.answer or 'the whole output'!r}",
    )
    attributes = {"spec": spec, "card": card, "offers": spec.answers}
    return type(f"{kind.title()}_{Path(argument).stem}", (RemoteRecognizer,), attributes)
