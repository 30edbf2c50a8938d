"""A small client for policyd's REST API (docs/policyd.md, "API"; RFC 9110 §13.1.1 If-Match,
RFC 6750 bearer tokens) on the standard library's http.client.

URLs: ``http://HOST:PORT``, ``https://HOST:PORT`` (verified against the system CAs or
``ca_file``) and ``unix:/path/to/socket`` (HTTP over a unix socket). Answers are treated as
hostile: bounded in size (:data:`MAX_ANSWER`), parsed defensively, and every error message
quotes server text only through :func:`services.ctl.output.clean`. The token is sent in the
``Authorization`` header only and never appears in a message.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from services.ctl.errors import ConnectError, ServerError, UsageError
from services.ctl.output import clean

MAX_ANSWER = 64 * 1024 * 1024  # bytes; a 1000-rule document is about 1 MiB
MAX_PAGES = 10_000
READ_CHUNK = 1 << 16
READ_BUDGET = 60.0  # seconds at least for a whole answer


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def etag(self) -> str | None:
        return self.headers.get("etag")


class Policyd:
    """policyd at ``url`` with an optional bearer ``token``."""

    def __init__(
        self, url: str, token: str | None, *, timeout: float = 15.0, ca_file: str | None = None
    ) -> None:
        self.url = url
        self._token = token
        self.timeout = timeout
        self._ca_file = ca_file
        if url.startswith("unix:"):
            self._scheme, self._unix, self._base = "unix", url.removeprefix("unix:"), ""
            if not self._unix.startswith("/"):
                raise UsageError(f"policyd URL {url}: write unix:/absolute/path")
            self._host, self._port = "localhost", 0
            return
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise UsageError(
                f"policyd URL {clean(url)}: expected http://HOST:PORT, https://HOST:PORT or "
                "unix:/path (--policyd-url/IPSECCTL_POLICYD_URL)"
            )
        if u.username or u.password:
            raise UsageError("policyd URL: put credentials in the token, not in the URL")
        try:
            port = u.port
        except ValueError:
            raise UsageError(f"policyd URL {clean(url)}: the port is not a number") from None
        self._scheme, self._unix = u.scheme, ""
        self._host, self._port = u.hostname, port or (443 if u.scheme == "https" else 80)
        self._base = u.path.rstrip("/")

    def _connection(self) -> http.client.HTTPConnection:
        if self._scheme == "unix":
            return _UnixConnection(self._unix, self.timeout)
        if self._scheme == "https":
            ctx = ssl.create_default_context(cafile=self._ca_file)
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout, context=ctx
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """One request; raises ConnectError when policyd cannot be reached or does not
        answer, ServerError when the answer is not HTTP or too large. Any status returns."""
        target = self._base + path
        if query:
            pairs = [(k, v) for k, v in query.items() if v is not None]
            target += "?" + urllib.parse.urlencode(pairs, doseq=True)
        h = {"Accept": "application/json", "User-Agent": "ipsecctl"}
        if self._token:
            h["Authorization"] = f"Bearer {self._token}"
        if body is not None:
            h["Content-Type"] = content_type
        h.update(headers or {})
        conn = self._connection()
        try:
            try:
                conn.request(method, target, body=body, headers=h)
                resp = conn.getresponse()
            except TimeoutError:
                raise ConnectError(
                    f"policyd at {self.url} did not answer within {self.timeout:g} s"
                ) from None
            except ssl.SSLError as e:
                raise ConnectError(f"TLS with policyd at {self.url} failed: {e.reason}") from None
            except (http.client.HTTPException, ValueError) as e:
                raise ServerError(
                    f"policyd at {self.url} did not answer with HTTP ({type(e).__name__}); "
                    "is the URL policyd's REST listener?"
                ) from None
            except OSError as e:
                reason = e.strerror or str(e) or type(e).__name__
                raise ConnectError(
                    f"cannot connect to policyd at {self.url}: {reason}; check that policyd "
                    "runs and --policyd-url/IPSECCTL_POLICYD_URL"
                ) from None
            try:
                data = self._read(resp, method, path)
            except TimeoutError:
                raise ConnectError(
                    f"policyd at {self.url} stopped answering within {self.timeout:g} s"
                ) from None
            except (OSError, http.client.HTTPException) as e:
                raise ServerError(
                    f"policyd at {self.url}: the answer broke off ({type(e).__name__})"
                ) from None
            if len(data) > MAX_ANSWER:
                raise ServerError(
                    f"policyd at {self.url}: answer to {method} {path} is over "
                    f"{MAX_ANSWER} bytes; refused"
                )
            return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()

    def _read(self, resp: http.client.HTTPResponse, method: str, path: str) -> bytes:
        """The body, at most MAX_ANSWER + 1 bytes, within a total time budget (a server
        that trickles bytes cannot hold the client forever)."""
        deadline = time.monotonic() + max(READ_BUDGET, 4 * self.timeout)
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_ANSWER:
            chunk = resp.read(min(READ_CHUNK, MAX_ANSWER + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if time.monotonic() > deadline:
                raise ConnectError(
                    f"policyd at {self.url} sent its answer to {method} {path} too slowly"
                )
        return b"".join(chunks)

    def call(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        what: str = "",
    ) -> tuple[Any, Answer]:
        """A request whose success is JSON (or empty); an HTTP error raises ServerError with
        policyd's message (``what`` names the object for 404 / 412 messages)."""
        a = self.request(
            method, path, query=query, body=body, content_type=content_type, headers=headers
        )
        if a.status >= 400:
            raise self.error(a, method, path, what)
        if not a.body:
            return None, a
        return parse_json(a.body, f"{method} {path}"), a

    def get(self, path: str, **query: Any) -> Any:
        return self.call("GET", path, query=query or None)[0]

    def get_all(self, path: str, **query: Any) -> list[Any]:
        """Every item of a paged list (``items`` + ``next``)."""
        items: list[Any] = []
        after: str | None = None
        for _ in range(MAX_PAGES):
            page = expect_dict(self.get(path, limit=500, after=after, **query), path)
            got = page.get("items")
            if not isinstance(got, list):
                raise ServerError(f"policyd: GET {path} answered without an items list")
            items += got
            nxt = page.get("next")
            if nxt is None or not got:
                return items
            if not isinstance(nxt, str) or nxt == after:
                raise ServerError(f"policyd: GET {path} answered a bad next page marker")
            after = nxt
        raise ServerError(f"policyd: GET {path} has over {MAX_PAGES} pages; refused")

    def error(self, a: Answer, method: str, path: str, what: str) -> ServerError:
        """policyd's error body (detail and field errors) as a message."""
        detail, errors = "", []
        try:
            doc = json.loads(a.body.decode("utf-8")) if a.body else None
        except (ValueError, RecursionError):
            doc = None
        if isinstance(doc, dict):
            d = doc.get("detail")
            if isinstance(d, str):
                detail = d
            elif d is not None:
                detail = json.dumps(d)[:1000]
            errs = doc.get("errors")
            if isinstance(errs, list):
                for e in errs[:50]:
                    if isinstance(e, dict):
                        errors.append(
                            f"  {clean(e.get('field', ''))}: {clean(e.get('message', ''))}"
                        )
        elif a.body:
            detail = f"(not a policyd error body) {a.body[:200].decode('utf-8', 'replace')}"
        if self._token and self._token in detail:
            detail = detail.replace(self._token, "<token>")
        head = f"policyd refused {method} {path}: HTTP {a.status}"
        hint = ""
        if a.status == 401:
            hint = "; check the token (IPSECCTL_TOKEN, IPSECCTL_TOKEN_FILE or --token-file)"
        elif a.status == 403:
            hint = "; this needs an admin token"
        elif a.status == 412:
            hint = (
                f"; {what or 'the object'} was changed by someone else since it was read: "
                "look at it again and retry"
            )
        lines = [f"{head}: {clean(detail) or '(no detail)'}{hint}", *errors]
        return ServerError(
            "\n".join(line.replace(self._token or "\0", "<token>") for line in lines)
        )


def parse_json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        start = clean(body[:120].decode("utf-8", "replace"))
        raise ServerError(f"policyd's answer to {what} is not JSON: {start}") from None


def expect_dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ServerError(f"policyd's answer to {what} is not a JSON object")
    return value
