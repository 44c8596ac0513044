"""HTTP protocol for uvicorn that understands Vault's ``LIST`` method.

hvac sends ``LIST /v1/...`` as a real HTTP method; httptools (llhttp) refuses methods it does
not know. The Vault Go client turns LIST into ``GET ...?list=true`` itself; this protocol does
the same translation on the request line, only at the start of a request, and leaves everything
else to uvicorn's fast httptools implementation.
"""

from __future__ import annotations

from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_LIST = b"LIST "


def rewrite_list_request_line(data: bytes) -> bytes:
    end = data.find(b" ", len(_LIST))
    if end < 0:
        return data
    target = data[len(_LIST) : end]
    separator = b"&" if b"?" in target else b"?"
    return b"GET " + target + separator + b"list=true" + data[end:]


class VaultHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._at_request_start = True

    def data_received(self, data: bytes) -> None:
        if self._at_request_start and data.startswith(_LIST):
            data = rewrite_list_request_line(data)
        self._at_request_start = False
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._at_request_start = True
        super().on_response_complete()


def uvicorn_config(
    app: Any,
    *,
    sock_fd: int | None = None,
    host: str = "127.0.0.1",
    port: int = 8200,
    log_level: str = "warning",
    tls_cert_file: str = "",
    tls_key_file: str = "",
) -> uvicorn.Config:
    """The one uvicorn configuration, shared by the workers and the tests' in-thread server."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        fd=sock_fd,
        loop="uvloop",
        http=VaultHttpProtocol,
        lifespan="on",
        log_level=log_level,
        access_log=False,
        server_header=False,
        proxy_headers=False,  # X-Forwarded-For is not trusted: the audit records the peer itself
        ssl_certfile=tls_cert_file or None,
        ssl_keyfile=tls_key_file or None,
        timeout_keep_alive=30,
    )
