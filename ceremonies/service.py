"""The runner's view of the service: the CLI's HTTP client, plus the request id of each answer.

Every call the ceremony makes is audited by the service under a request id; the transcript
lists those ids so that an auditor can find each step's records in the audit log.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from typing import Any

from api.cli import Client, CliError

_STATUS = re.compile(r"(\d{3}): ")


class ServiceError(Exception):
    """The service refused or could not be reached; ``status`` is None when unreachable."""

    def __init__(self, message: str, status: int | None, request_id: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.request_id = request_id


@dataclass
class Service:
    address: str
    request_ids: list[str] = field(default_factory=list)
    # The CA bundle that this service's TLS certificate chains to, when the system's does not
    # (another site's service, given with --peer-ca); None: the system's trust store.
    ca_file: str | None = None
    _context: ssl.SSLContext | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.ca_file:
            try:
                self._context = ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ServiceError(
                    f"cannot use the CA file {self.ca_file}: {exc}", None, None
                ) from None

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str | None = None,
    ) -> Any:
        """One request; its request id is kept for the step that made it, refused or not."""
        client = Client(self.address, token)
        client.context = self._context
        try:
            answer = client.call(method, path, body)
        except CliError as exc:
            self._keep(client.last_request_id)
            found = _STATUS.match(str(exc))
            status = int(found.group(1)) if found else None
            raise ServiceError(str(exc), status, client.last_request_id) from None
        self._keep(client.last_request_id)
        return answer

    def last_request_id(self) -> str | None:
        return self.request_ids[-1] if self.request_ids else None

    def _keep(self, request_id: str | None) -> None:
        if request_id:
            self.request_ids.append(request_id)

    def info(self) -> dict[str, Any]:
        """What the runner needs before anyone logs in (``GET /v1/ekms/ceremonies/service``)."""
        answer = self.call("GET", "ekms/ceremonies/service")
        return dict(answer["data"])
