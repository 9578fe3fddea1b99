"""`redteam serve`: a reference face-verification service over any zoo recogniser, on FastAPI and uvicorn.

It is what a red team is usually handed, made from a model we hold: a demo target, and the service the tests attack
over the wire. Endpoints (images are uploaded as files; faces framed like LFW, or any photo with ``--detector``):

- ``GET /health``: the service is up, which target answers and what it exposes;
- ``POST /enrol`` (``identity``, ``image``): add a face to the gallery;
- ``POST /verify`` (``image`` and either ``other`` or ``identity``): same person or not;
- ``POST /identify`` (``image``): the best gallery identity at or above the threshold (``null`` if none).

With ``--expose decision`` answers carry only the decision, never the score or the threshold; with ``score`` they
add the similarity (higher is the same person; minus the distance for an L2 model) and the threshold. Uploads are
checked before the model sees them (type, size, decodable, colour, at least 32 px; exactly one face with
``--detector``), each failure a 4xx whose ``detail`` says why. ``--api-key-env VAR`` requires the header
``X-API-Key`` to equal that variable's value (read once at start; never printed). ``--rate 20/s`` answers 429 with
``Retry-After`` beyond that rate. ``--faults 500:0.1,429:0.05,slow:0.05`` makes it misbehave on purpose, for testing
clients: that share of requests (drawn from a seeded generator) is answered 500, answered 429, or answered only after
:data:`SLOW_SECONDS`.

``--reply`` gives ``/verify`` the shape of a commercial API's answer instead, as local stand-ins for clients' specs
(``examples/remote/vendor-*.yaml``), each with a 0-100 score (:func:`vendor_score`, the model's threshold at
:data:`VENDOR_THRESHOLD`):

- ``matches``: ``{"matches": [{"similarity": 93.1}]}``, listing the face only when its similarity reaches the
  request's ``similarity_threshold`` (default :data:`VENDOR_THRESHOLD`; an empty list otherwise), as face-comparison
  APIs that return a list of matching faces do;
- ``confidence``: ``{"confidence": 93.1, "thresholds": {"1e-3": 88.4}}``, a confidence and the vendor's thresholds at
  the false-accept rates it knows (the model card's).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import math
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse
from torch import Tensor

from redteam.align import CANONICAL_SIZE
from redteam.api import FaceDetector, FaceRecognizer
from redteam.datasets import open_image, square_resize, to_tensor
from redteam.engine import load_target
from redteam.errors import DataError, RedteamError

#: Uploads larger than this are refused unread (413).
MAX_UPLOAD_BYTES = 5 * 1024 * 1024
#: The content types an upload may declare.
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp")
API_KEY_HEADER = "X-API-Key"
#: Embeddings of recent uploads kept, by content (a verify request usually repeats its reference image).
CACHED_EMBEDDINGS = 256
#: How long a ``slow`` fault holds a request before answering it (longer than clients' usual timeouts in tests).
SLOW_SECONDS = 3.0
FAULTS = ("500", "429", "slow")
#: Where the 0-100 scores of ``--reply matches|confidence`` put the model's own threshold (a common vendor default).
VENDOR_THRESHOLD = 80.0
#: How many units of the model's similarity take a vendor score from 80 to about 98 (a logistic's width).
VENDOR_WIDTH = 0.05
#: An uploaded image field (at module level: FastAPI resolves the endpoints' annotations here).
ImageUpload = Annotated[UploadFile, File()]


@dataclass(frozen=True)
class ServiceConfig:
    """``target``: the zoo recogniser that answers; ``expose``: what answers carry; ``detector``: a zoo detector
    that must find exactly one face in each upload; ``api_key``: the key clients must send (None: open);
    ``rate``: requests per second (None: unlimited); ``threshold``: another operating point, as users write it."""

    target: str
    expose: Literal["score", "decision"] = "score"
    detector: str | None = None
    api_key: str | None = None
    rate: float | None = None
    threshold: float | None = None
    device: str = "cpu"
    faults: tuple[tuple[str, float], ...] = ()  # (fault, share of requests), see parse_faults
    reply: Literal["reference", "matches", "confidence"] = "reference"  # /verify's answer shape (module docstring)
    forward: str = "torch"  # what computes the embeddings: torch, or onnxruntime on the recogniser's export


def vendor_score(similarity: float, threshold: float) -> float:
    """A similarity on the model's scale -> a vendor-style 0-100 score, increasing, with ``threshold`` at
    :data:`VENDOR_THRESHOLD` (a logistic of width :data:`VENDOR_WIDTH`), to 3 decimals as vendors print them."""
    z = (similarity - threshold) / VENDOR_WIDTH + math.log(VENDOR_THRESHOLD / (100 - VENDOR_THRESHOLD))
    return round(100 / (1 + math.exp(-max(min(z, 700.0), -700.0))), 3)


def parse_rate(text: str) -> float:
    """``20/s``, ``600/min``, ``5`` (per second) -> requests per second; a one-line error otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|second|m|min|minute))?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise RedteamError(f"--rate {text!r}: write requests per second or minute, such as 20/s or 600/min.")
    per_minute = (match.group(2) or "s").startswith("m")
    return float(match.group(1)) / (60 if per_minute else 1)


def parse_faults(text: str) -> tuple[tuple[str, float], ...]:
    """``500:0.1,429:0.05,slow:0.05`` -> ``(("500", 0.1), ...)``; shares in [0, 1] summing to at most 1."""
    faults = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, share = part.partition(":")
        try:
            value = float(share)
        except ValueError:
            value = -1.0
        if kind not in FAULTS or not 0 <= value <= 1:
            raise RedteamError(
                f"--faults {part!r}: write fault:share with a fault of {', '.join(FAULTS)}, e.g. 500:0.1."
            )
        faults.append((kind, value))
    if sum(share for _, share in faults) > 1:
        raise RedteamError(f"--faults {text!r}: the shares add up to more than 1.")
    return tuple(faults)


class RateLimit:
    """A token bucket: ``rate`` requests per second, bursts up to one second's worth (at least one)."""

    def __init__(self, rate: float):
        self.rate, self.capacity = rate, max(1.0, rate)
        self.tokens, self.updated = self.capacity, time.monotonic()
        self.lock = threading.Lock()

    def wait(self) -> float:
        """Take a token and return 0, or return the seconds until one is free (nothing taken)."""
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= 1:
                self.tokens -= 1
                return 0.0
            return (1 - self.tokens) / self.rate


class FaceService:
    """The model, the optional face detector and the gallery behind the endpoints."""

    def __init__(self, config: ServiceConfig):
        device = torch.device(config.device)
        model = load_target(config.target, device, config.threshold, forward=config.forward)
        if not isinstance(model, FaceRecognizer):
            raise RedteamError(f"{config.target} is a detector; redteam serve answers with a recogniser.")
        detector = load_target(config.detector, device) if config.detector else None
        if detector is not None and not isinstance(detector, FaceDetector):
            raise RedteamError(f"--detector {config.detector} is a recogniser; give a detector such as mtcnn.")
        if config.reply != "reference" and config.expose != "score":
            raise RedteamError(f"--reply {config.reply} answers with a 0-100 score: use it with --expose score.")
        self.config, self.model, self.detector, self.device = config, model, detector, device
        self.gallery: dict[str, Tensor] = {}
        self.cache: dict[bytes, Tensor] = {}
        self.comparisons = 0  # verifications and identifications answered (clients' queries, as the service saw them)
        self.lock = threading.Lock()  # one model call at a time: the model is shared by the server's threads

    def face(self, upload: UploadFile, data: bytes) -> Tensor:
        """An upload as a canonical face ``[1, 3, S, S]``, or an HTTP error that says what is wrong with it."""
        name = upload.filename or "upload"
        if upload.content_type not in IMAGE_TYPES:
            raise HTTPException(415, f"{name}: content type {upload.content_type!r}; send {', '.join(IMAGE_TYPES)}.")
        try:
            image = open_image(io.BytesIO(data), name=name).convert("RGB")
        except DataError as error:
            raise HTTPException(422, str(error)) from None
        face = square_resize(to_tensor(image), CANONICAL_SIZE)[None].to(self.device)
        if self.detector is not None:
            with self.lock, torch.no_grad():
                found = len(self.detector.detect(face)[0].boxes)
            if found != 1:
                raise HTTPException(422, f"{name}: {found} faces found; upload a photo of exactly one face.")
        return face

    def embed(self, face: Tensor, data: bytes) -> Tensor:
        """``face``'s embedding; the same upload again (a client comparing many probes with one reference) is
        answered from a bounded cache of the last :data:`CACHED_EMBEDDINGS` uploads' embeddings."""
        key = hashlib.sha256(data).digest()
        with self.lock:
            if key not in self.cache:
                with torch.no_grad():
                    self.cache[key] = self.model.embed(face)[0]
                if len(self.cache) > CACHED_EMBEDDINGS:
                    self.cache.pop(next(iter(self.cache)))  # the oldest
            return self.cache[key]

    def embed_upload(self, upload: UploadFile, data: bytes) -> Tensor:
        """An upload checked (:meth:`face`) and embedded (:meth:`embed`)."""
        return self.embed(self.face(upload, data), data)

    def answer(self, score: Tensor, **fields: Any) -> dict[str, Any]:
        """The decision on a 0-d ``score``, and the score and threshold when the service exposes scores. It decides
        on the margin in the score's own precision, as redteam's threats do, so that a score a hair from the
        threshold gets the same answer here and in a run against the model held in-process."""
        self.comparisons += 1
        threshold = self.model.threshold
        answer = {**fields, "match": bool(score - threshold >= 0)}
        if self.config.expose == "score":
            answer |= {"score": float(score), "threshold": threshold}
        return answer

    def vendor_answer(self, score: float, similarity_threshold: float | None) -> dict[str, Any]:
        """A comparison answered in the ``--reply`` shape of a commercial API (module docstring)."""
        self.comparisons += 1
        threshold = self.model.threshold
        shown = vendor_score(score, threshold)
        if self.config.reply == "matches":
            cut = VENDOR_THRESHOLD if similarity_threshold is None else similarity_threshold
            return {"matches": [{"similarity": shown}] if shown >= cut else []}
        strict = self.model.card.threshold_far
        known = {"1e-3": vendor_score(strict, threshold)} if strict is not None and threshold != strict else {}
        return {"confidence": shown, "thresholds": known}


async def _read(upload: UploadFile) -> bytes:
    """An upload's bytes, refused (413) past :data:`MAX_UPLOAD_BYTES` without reading the rest."""
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"{upload.filename or 'upload'} is over {MAX_UPLOAD_BYTES // 2**20} MiB.")
    return data


def create_app(config: ServiceConfig) -> FastAPI:
    """The service for ``config`` (the model is loaded here, before the first request)."""
    service = FaceService(config)
    limit = RateLimit(config.rate) if config.rate else None

    def guard(request: Request) -> None:
        """Every endpoint: the API key first (401), then the rate limit (429 with Retry-After)."""
        if config.api_key is not None and request.headers.get(API_KEY_HEADER) != config.api_key:
            raise HTTPException(401, f"missing or wrong {API_KEY_HEADER} header.")
        if limit is not None:
            wait = limit.wait()
            if wait > 0:
                raise HTTPException(429, "too many requests.", headers={"Retry-After": str(math.ceil(wait))})

    app = FastAPI(title=f"redteam reference face service: {config.target}", dependencies=[Depends(guard)])

    injected: dict[str, int] = {}
    if config.faults:
        draws, draw_lock = random.Random(0), threading.Lock()

        @app.middleware("http")
        async def misbehave(request: Request, call_next: Any) -> Any:
            """Answer a seeded share of requests with the configured faults instead of (or after) the real answer."""
            with draw_lock:
                roll = draws.random()
            for kind, share in config.faults:
                if roll < share:
                    injected[kind] = injected.get(kind, 0) + 1
                    if kind == "500":
                        return JSONResponse({"detail": "injected fault"}, status_code=500)
                    if kind == "429":
                        return JSONResponse({"detail": "injected throttle"}, 429, headers={"Retry-After": "1"})
                    await asyncio.sleep(SLOW_SECONDS)
                    break
                roll -= share
            return await call_next(request)

    @app.get("/health")
    def health() -> dict[str, Any]:
        status = {"status": "ok", "target": config.target, "expose": config.expose, "enrolled": len(service.gallery),
                  "comparisons": service.comparisons}  # fmt: skip
        return status | ({"faults injected": injected} if config.faults else {})

    @app.post("/enrol")
    async def enrol(identity: Annotated[str, Form(min_length=1, max_length=200)], image: ImageUpload) -> dict[str, Any]:
        embedding = service.embed_upload(image, await _read(image))
        service.gallery[identity] = embedding
        return {"identity": identity, "enrolled": len(service.gallery)}

    @app.post("/verify")
    async def verify(
        image: ImageUpload,
        other: Annotated[UploadFile | None, File()] = None,
        identity: Annotated[str | None, Form()] = None,
        similarity_threshold: Annotated[float | None, Form(ge=0, le=100)] = None,
    ) -> dict[str, Any]:
        if (other is None) == (identity is None):
            raise HTTPException(422, "send either a second image (other) or an enrolled identity, not both.")
        probe = service.embed_upload(image, await _read(image))
        if other is not None:
            reference = service.embed_upload(other, await _read(other))
        elif identity in service.gallery:
            reference = service.gallery[identity]
        else:
            raise HTTPException(404, f"identity {identity!r} is not enrolled.")
        score = service.model.similarity(probe[None], reference[None])[0]
        if config.reply != "reference":
            return service.vendor_answer(float(score), similarity_threshold)
        return service.answer(score)

    @app.post("/identify")
    async def identify(image: ImageUpload) -> dict[str, Any]:
        if not service.gallery:
            raise HTTPException(409, "the gallery is empty: enrol faces first.")
        probe = service.embed_upload(image, await _read(image))
        names = list(service.gallery)
        scores = service.model.similarity_matrix(probe[None], torch.stack([service.gallery[n] for n in names]))[0]
        best = int(scores.argmax())
        answer = service.answer(scores[best])
        return {"identity": names[best] if answer.pop("match") else None, **answer}

    return app


def serve(config: ServiceConfig, host: str, port: int) -> None:
    """Run the service until interrupted (uvicorn, one process)."""
    import uvicorn

    uvicorn.run(create_app(config), host=host, port=port, log_level="warning")


def api_key_from(variable: str | None) -> str | None:
    """The key in environment variable ``variable`` (None: no key); a one-line error when it is unset or empty."""
    if variable is None:
        return None
    key = os.environ.get(variable)
    if not key:
        raise RedteamError(f"--api-key-env {variable}: that environment variable is unset or empty.")
    return key
