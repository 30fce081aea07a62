"""The HTTP JSON API (FastAPI) over :class:`broadface.serve.service.FaceService`, and the page at ``/``.

Every client error is a 4xx JSON ``{"detail": "<one line naming the field or file>"}``: service
errors (:mod:`broadface.serve.errors`), request validation (a missing field, malformed JSON, a
value of the wrong type), an unknown route, a body over the size limit (refused from its
``Content-Length`` before it is read, or as soon as a chunked body passes the limit). Writes
need ``X-API-Key`` when the service has a key, and are refused from web pages of other origins;
a loopback server answers only to loopback host names. OpenAPI: ``/openapi.json``, and ``/docs``
(Swagger UI) and ``/redoc`` served from the package's own copies of their scripts (fastapi-offline).
"""
from __future__ import annotations

import hmac
import logging
import sys
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Body, Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from broadface.serve.errors import Forbidden, NotFound, ServeError, Unauthorized
from broadface.serve.gallery import Gallery
from broadface.serve.service import FaceService, Upload, parse_metadata

log = logging.getLogger("broadface.serve")
_ALIGN = "auto: 112x112 squares are aligned crops, other images are detected and aligned; yes: always; no: never"
AlignForm = Annotated[Literal["auto", "yes", "no"], Form(description=_ALIGN)]


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes`` (declared or counted while streaming)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = f"request body over the limit of {self.max_bytes} bytes"
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            status = 413 if declared.isdigit() else 400
            response = JSONResponse({"detail": too_big if status == 413 else "malformed Content-Length header"},
                                    status_code=status, headers={"Connection": "close"})
            return await response(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, too_big)
            return message

        await self.app(scope, counted, send)


class LoopbackHosts:
    """ASGI middleware for a server on loopback: 400 unless the Host header names this machine
    (127.x.x.x, localhost, [::1]), so a web page cannot reach it through a DNS name re-pointed at
    127.0.0.1 (DNS rebinding)."""

    NAMES = ("127.0.0.1", "localhost", "[::1]")

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.NAMES and not name.startswith("127."):
                response = JSONResponse({"detail": f"Host {host!r}: this server answers only to 127.0.0.1, "
                                         "localhost or [::1]"}, status_code=400)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _read(files: list[UploadFile], limit: int) -> list[Upload]:
    """The uploads' bytes (at most ``limit + 1`` read from each: the reader refuses what is over)."""
    return [Upload(f.filename or f"upload {i + 1}", f.file.read(limit + 1)) for i, f in enumerate(files)]


def _error_text(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        if e.get("type") == "json_invalid":  # loc is ("body", character position)
            where = e.get("loc", ("body", "?"))[-1]
            parts.append(f"body: malformed JSON ({e.get('ctx', {}).get('error', 'decode error')} at character "
                         f"{where}); expected a JSON object")
            continue
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "header"))
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(_request, err: ServeError):
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, err: RequestValidationError):
        return JSONResponse({"detail": _error_text(err)}, status_code=422)

    @app.exception_handler(Exception)
    async def internal(_request, err: Exception):  # a bug, not bad input: logged with its traceback
        log.exception("internal error")
        return JSONResponse({"detail": f"internal error ({type(err).__name__}): {err}"}, status_code=500)


def _write_access(api_key: str | None):
    """A dependency of every write: 403 for a browser request from a page of another origin (a form
    post needs no CORS preflight), 401 unless it carries the service's API key (when it has one)."""

    def check(request: Request, x_api_key: Annotated[str | None, Header(
              description="needed for writes when the service has a key")] = None) -> None:
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            raise Forbidden(f"write from a page of another origin ({origin}) refused")
        if api_key is None:
            return
        if x_api_key is None or not hmac.compare_digest(x_api_key.encode(), api_key.encode()):
            raise Unauthorized("this write needs the service's API key in the X-API-Key header")

    return Depends(check)


def _face_routes(service: FaceService, write) -> APIRouter:
    """The page, health, model info, enrol, search and verify."""
    router, limit = APIRouter(), service.config.max_image_bytes

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return resources.files("broadface.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @router.get("/health", summary="Liveness and gallery size")
    def health():
        return {"status": "ok", **service.gallery.counts()}

    @router.get("/model", summary="Model, threshold, index and limits")
    def model_info():
        return service.info()

    @router.post("/identities/{name}/images", status_code=201, dependencies=[write],
                 summary="Enrol images under an identity (created if new)")
    def enrol(name: str, images: Annotated[list[UploadFile], File(description="one or more face images")],
              metadata: Annotated[str | None, Form(description="JSON object; replaces the identity's metadata")] = None,
              align: AlignForm = "auto"):
        return service.enrol(name, _read(images, limit), metadata, align)

    @router.post("/search", summary="Top-k identities for a face, with same/different decisions")
    def search(image: Annotated[UploadFile, File()], top_k: Annotated[int, Form()] = 5, align: AlignForm = "auto",
               threshold: Annotated[float | None, Form()] = None, crop: Annotated[bool, Form()] = False):
        return service.search(_read([image], limit)[0], top_k, align, threshold, crop)

    @router.post("/verify", summary="Cosine similarity of two faces and a same/different decision")
    def verify(image_a: Annotated[UploadFile, File()], image_b: Annotated[UploadFile, File()],
               align: AlignForm = "auto", threshold: Annotated[float | None, Form()] = None):
        a, b = _read([image_a, image_b], limit)
        return service.verify(a, b, align, threshold)

    return router


def _gallery_routes(gallery: Gallery, write) -> APIRouter:
    """List, read, update and delete identities and images."""
    router = APIRouter()

    @router.get("/identities", summary="List identities (by name, paged)")
    def list_identities(offset: Annotated[int, Query(ge=0)] = 0,
                        limit: Annotated[int, Query(ge=1, le=1000)] = 100, prefix: str = ""):
        total, items = gallery.store.list_identities(offset, limit, prefix)
        return {"total": total, "offset": offset, "identities": items}

    @router.get("/identities/{name}", summary="One identity with its images")
    def get_identity(name: str):
        return gallery.identity(name)

    @router.patch("/identities/{name}", dependencies=[write], summary="Replace an identity's metadata")
    def set_metadata(name: str, metadata: Annotated[dict, Body(embed=True)]):
        return gallery.set_metadata(name, parse_metadata(metadata))

    @router.delete("/identities/{name}", dependencies=[write], summary="Delete an identity and its images")
    def delete_identity(name: str):
        return gallery.delete_identity(name)

    @router.get("/images/{image_id}", summary="One enrolled image's record")
    def get_image(image_id: int):
        found = gallery.store.image(image_id)
        if found is None:
            raise NotFound(f"unknown image id {image_id}")
        return found

    @router.get("/images/{image_id}/crop", summary="The aligned crop of an enrolled image (JPEG)",
                response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def get_crop(image_id: int):
        data = gallery.store.crop(image_id)
        if data is None:
            raise NotFound(f"unknown image id {image_id} (or it has no stored crop)")
        return Response(data, media_type="image/jpeg")

    @router.delete("/images/{image_id}", dependencies=[write], summary="Delete one enrolled image")
    def delete_image(image_id: int):
        return gallery.delete_image(image_id)

    return router


def create_app(service: FaceService) -> FastAPI:
    """The FastAPI application for one service; it closes the service's gallery at shutdown."""
    config = service.config

    @asynccontextmanager
    async def lifespan(_app):
        yield
        service.close()  # at shutdown (SIGINT / SIGTERM): the gallery file is closed cleanly
        print(f"broadface serve: gallery {config.gallery} closed", file=sys.stderr, flush=True)

    app = FastAPIOffline(title="broadface face search", version="1", lifespan=lifespan,  # /docs without a CDN
                         description="Enrol faces under identities, search and verify them with one broadface model.")
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    if config.loopback:
        app.add_middleware(LoopbackHosts)
    _install_errors(app)
    write = _write_access(config.api_key)
    app.include_router(_face_routes(service, write))
    app.include_router(_gallery_routes(service.gallery, write))
    return app
