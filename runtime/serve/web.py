"""`edgegpt web`: serve a bundle, the browser runtime (web/) and onnxruntime-web's files on 127.0.0.1.

The page (web/index.html) loads the bundle over HTTP with web/edgegpt.js, which checks every file it uses
against manifest.json (sha256 by WebCrypto) before onnxruntime-web sees it: the server is a plain static
host and checks only that the manifest reads. It serves nothing but the page's own files, the two npm
packages' browser builds and the files the manifest lists, and binds to 127.0.0.1 only.

Every response carries Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy:
require-corp, which make the page cross-origin isolated: the browser then allows SharedArrayBuffer, which
onnxruntime-web's multi-threaded WebAssembly needs (without it, it runs on one thread).
References: https://onnxruntime.ai/docs/tutorials/web/env-flags-and-session-options.html (env.wasm.numThreads),
https://web.dev/articles/coop-coep.

The npm files (onnxruntime-web, @huggingface/tokenizers, versions pinned by web/package-lock.json) are not
part of the Python package: `npm ci` in web/ puts them in web/node_modules, where a source checkout finds
them; an installed edgegpt is pointed at a node_modules folder with `node_modules=` (`--node-modules`).
"""

from __future__ import annotations

import http.server
import importlib.resources
import logging
import mimetypes
import threading
from functools import partial
from pathlib import Path

from edgegpt.errors import BundleError, ConfigError
from edgegpt.manifest import MANIFEST_NAME, read_manifest, safe_member

__all__ = ["WebServer", "web_root", "node_modules_dir"]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# What the page needs from node_modules: URL prefix -> (package folder, file suffixes served from it).
NPM_FILES = {
    "/ort/": ("onnxruntime-web/dist", (".mjs", ".wasm")),
    "/npm/tokenizers/": ("@huggingface/tokenizers/dist", (".mjs",)),
}
PAGE_FILES = ("index.html", "app.js", "edgegpt.js")
TYPES = {
    ".mjs": "text/javascript",
    ".js": "text/javascript",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".html": "text/html; charset=utf-8",
}
INSTALL_HINT = (
    "run `npm ci` in the web/ folder of an edgegpt checkout, or `npm install --prefix DIR onnxruntime-web@1.30.0 "
    "@huggingface/tokenizers@0.2.0` and pass --node-modules DIR/node_modules"
)


def web_root() -> Path:
    """The folder of the browser runtime (the package data `edgegpt.web`: index.html, app.js, edgegpt.js, src/)."""
    return Path(str(importlib.resources.files("edgegpt.web")))


def node_modules_dir(node_modules: str | Path | None = None) -> Path:
    """The node_modules folder to serve onnxruntime-web from: the given one, else web/node_modules.

    Raises:
        ConfigError: it lacks onnxruntime-web or @huggingface/tokenizers; the message says how to get them.
    """
    folder = Path(node_modules) if node_modules is not None else web_root() / "node_modules"
    for package, _ in NPM_FILES.values():
        if not (folder / package).is_dir():
            raise ConfigError(f"{folder / package}: missing, the page needs it; {INSTALL_HINT}")
    return folder


class _Handler(http.server.SimpleHTTPRequestHandler):
    """GET/HEAD of the allowed files only, with the cross-origin isolation headers."""

    def __init__(self, *args, routes: "WebServer", **kwargs):
        self.routes = routes
        super().__init__(*args, **kwargs)

    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-store")  # a re-exported bundle must never be served stale
        super().end_headers()

    def translate_path(self, path: str) -> str:
        found = self.routes.resolve(path.split("?", 1)[0].split("#", 1)[0])
        return str(found) if found is not None else "/nonexistent/edgegpt-web"

    def guess_type(self, path) -> str:
        return TYPES.get(Path(path).suffix, mimetypes.guess_type(str(path))[0] or "application/octet-stream")

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        log.debug("%s " + format, self.address_string(), *args)


class WebServer:
    """The `edgegpt web` server: `start()` serves in a thread, `serve_forever()` in this one, `close()` stops.

    >>> server = WebServer("bundles/tiny", port=0).start()  # doctest: +SKIP
    >>> server.url  # doctest: +SKIP
    'http://127.0.0.1:43121/'
    """

    def __init__(self, bundle: str | Path, *, port: int = 8000, node_modules: str | Path | None = None):
        self.bundle = Path(bundle)
        try:
            self.files = set(read_manifest(self.bundle)["files"]) | {MANIFEST_NAME}
        except BundleError as exc:
            raise BundleError(f"{exc}; `edgegpt web` serves an exported bundle") from None
        self.page = web_root()
        self.node_modules = node_modules_dir(node_modules)
        handler = partial(_Handler, routes=self)
        try:
            self.httpd = http.server.ThreadingHTTPServer((HOST, port), handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {HOST}:{port} ({exc.strerror}); choose another --port") from None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.httpd.server_address[1]}/"

    def resolve(self, url_path: str) -> Path | None:
        """The file a URL path serves, or None (404): the page, the npm builds, or a file the manifest lists."""
        if url_path == "/":
            url_path = "/index.html"
        name = url_path.lstrip("/")
        if name in PAGE_FILES or (name.startswith("src/") and name.endswith(".js") and "/" not in name[4:]):
            file = self.page / name
        elif url_path.startswith("/bundle/"):
            member = url_path[len("/bundle/") :]
            if member not in self.files:
                return None
            try:
                file = safe_member(self.bundle, member)
            except BundleError:
                return None
        else:
            for prefix, (package, suffixes) in NPM_FILES.items():
                rest = url_path[len(prefix) :]
                if url_path.startswith(prefix) and rest.endswith(suffixes) and "/" not in rest and ".." not in rest:
                    file = self.node_modules / package / rest
                    break
            else:
                return None
        return file if file.is_file() else None

    def start(self) -> "WebServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="edgegpt-web", daemon=True)
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        if self.thread is not None:
            self.httpd.shutdown()
            self.thread.join()
        self.httpd.server_close()
