"""``/v1/transit``: Vault's transit shapes over HSM-backed keys.

Batch requests answer per item, as Vault does: each item gets its result or its ``error``; the
status is 400 if any item failed unless ``partial_failure_response_code`` says otherwise.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from api.errors import MethodNotAllowedError
from api.http import Body, Call, Handler, envelope, parse_model
from kms.derivation import wipe
from kms.errors import EkmsError, InvalidRequestError, PermissionDeniedError
from kms.keys import (
    Classification,
    KeyPolicy,
    KeyType,
    Residency,
    decode_b64_field,
    parse_enum,
    validate_key_name,
)
from kms.policy import Operation
from kms.service import HashAlgorithm, Marshaling

if TYPE_CHECKING:
    from collections.abc import Callable

    from kms.service import KeyService
    from kms.sites import SiteRegistry


DECRYPT, DATAKEY, SIGN = Operation.DECRYPT, Operation.DATAKEY, Operation.SIGN


class CreateKeyRequest(Body):
    type: str = KeyType.AES256_GCM96.value
    classification: str = Classification.SECRET.value
    residency: str = Residency.HSM.value
    derived: bool = False  # context is always bound, so derived is accepted and changes nothing
    convergent_encryption: bool = False
    exportable: bool = False
    allow_plaintext_backup: bool = False
    auto_rotate_period: str | int = 0


class ConfigRequest(Body):
    min_decryption_version: int | None = None
    min_encryption_version: int | None = None
    deletion_allowed: bool | None = None
    exportable: bool | None = None
    allow_plaintext_backup: bool | None = None
    auto_rotate_period: str | int | None = None


class EncryptItem(Body):
    plaintext: str
    context: str = ""
    key_version: int | None = None
    nonce: str | None = None
    reference: str = ""


class DecryptItem(Body):
    ciphertext: str
    context: str = ""
    nonce: str | None = None
    reference: str = ""


class RewrapItem(Body):
    ciphertext: str
    context: str = ""
    key_version: int | None = None
    nonce: str | None = None
    reference: str = ""


class DatakeyRequest(Body):
    context: str = ""
    nonce: str | None = None
    bits: int = 256


class SignItem(Body):
    input: str
    context: str | None = None
    reference: str = ""


class VerifyItem(Body):
    input: str
    signature: str
    context: str | None = None
    reference: str = ""


_BATCH_OPTIONS = {"batch_input", "partial_failure_response_code", "type", "convergent_encryption"}
_SIGN_OPTIONS = {
    "hash_algorithm",
    "prehashed",
    "marshaling_algorithm",
    "key_version",
    "signature_algorithm",
    "salt_length",
    "name",  # hvac repeats the key name in the body of verify
}


def key_json(policy: KeyPolicy) -> dict[str, Any]:
    if policy.key_type.is_symmetric:
        keys: dict[str, Any] = {
            str(n): int(v.created_at) for n, v in sorted(policy.versions.items())
        }
    else:
        keys = {
            str(n): {
                "creation_time": int(v.created_at),
                "name": "P-256" if policy.key_type is KeyType.ECDSA_P256 else "ed25519",
                "public_key": _pem(v.public_key),
            }
            for n, v in sorted(policy.versions.items())
        }
    symmetric = policy.key_type.is_symmetric
    return {
        "name": policy.name,
        "type": policy.key_type.value,
        "classification": policy.classification.value,
        "residency": policy.residency.value,
        "keys": keys,
        "latest_version": policy.latest_version,
        "min_available_version": 0,
        "min_decryption_version": policy.min_decryption_version,
        "min_encryption_version": policy.min_encryption_version,
        "deletion_allowed": policy.deletion_allowed,
        "derived": False,
        "exportable": False,
        "allow_plaintext_backup": False,
        "auto_rotate_period": 0,
        "imported_key": False,
        "supports_encryption": symmetric,
        "supports_decryption": symmetric,
        "supports_derivation": False,
        "supports_signing": not symmetric and not policy.verify_only,
    } | ({"origin_site": policy.origin_site} if policy.verify_only else {})


def _pem(der: bytes | None) -> str:
    if der is None:
        return ""
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines) + "\n-----END PUBLIC KEY-----\n"


def _reject_unsupported(nonce: str | None) -> None:
    if nonce:
        raise InvalidRequestError("nonce is not supported: nonces are always random")


class TransitRoutes:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.keys: KeyService = handler.runtime.keys
        self.sites: SiteRegistry = handler.runtime.sites

    # --- batch plumbing -------------------------------------------------------------------

    def _items(self, data: dict[str, Any], single_fields: set[str]) -> tuple[list[Any], bool]:
        batch = data.get("batch_input")
        if batch is None:
            single = {k: v for k, v in data.items() if k not in _BATCH_OPTIONS}
            return [single], False
        if not isinstance(batch, list) or not batch:
            raise InvalidRequestError("batch_input must be a non-empty list")
        limit = self.handler.settings.max_batch_items
        if len(batch) > limit:
            raise InvalidRequestError(f"batch_input has {len(batch)} items; the limit is {limit}")
        stray = sorted(k for k in set(data) & single_fields if data[k] not in (None, ""))
        unknown = sorted(set(data) - single_fields - _BATCH_OPTIONS - {"reference"})
        if unknown:
            raise InvalidRequestError(f"unknown field {unknown[0]!r}")
        if stray:
            raise InvalidRequestError(
                f"field {stray[0]!r} must be inside batch_input items when batch_input is given"
            )
        return batch, True

    def _batch(
        self,
        call: Call,
        data: dict[str, Any],
        single_fields: set[str],
        one: Callable[[Any], dict[str, Any]],
    ) -> tuple[int, Any]:
        items, batched = self._items(data, single_fields)
        code = data.get("partial_failure_response_code")
        if code is not None and (not isinstance(code, int) or not 200 <= code < 600):
            raise InvalidRequestError("partial_failure_response_code must be an HTTP status code")
        if not batched:
            result = one(items[0])
            return 200, envelope(call, result)
        results: list[dict[str, Any]] = []
        failures = 0
        for item in items:
            reference = item.get("reference", "") if isinstance(item, dict) else ""
            try:
                result = one(item)
            except EkmsError as exc:
                failures += 1
                result = {"error": str(exc)}
            if reference:
                result["reference"] = reference
            results.append(result)
        call.details["items"] = len(items)
        call.details["failed_items"] = failures
        status = 200
        if failures:
            status = code if (code and failures < len(items)) else 400
        return status, envelope(call, {"batch_results": results})

    def _context(self, call: Call, text: str) -> bytes:
        context = decode_b64_field(text, "context")
        digest = self.handler.context_hash(context)
        if digest is not None:
            seen = call.details.setdefault("contexts", [])
            if digest not in seen and len(seen) < 16:
                seen.append(digest)
        return context

    # --- routes ---------------------------------------------------------------------------

    def router(self) -> APIRouter:  # noqa: C901, PLR0915 - one closure per Vault path
        router = APIRouter(prefix="/v1/transit", tags=["transit"])
        run = self.handler.run
        keys = self.keys
        access = self.handler.runtime.access
        # Only an active site serves key operations (kms.sites): one cached read per request.
        serving = self.sites.require_serving

        @router.api_route("/keys/{name}", methods=["POST", "PUT"])
        async def create_key(request: Request, name: str) -> Response:
            def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
                call.key = validate_key_name(name)
                access.authorise_key_admin(call.caller, change=True)
                serving()  # keys are made at the active site; others receive them by backup
                body = parse_model(CreateKeyRequest, data)
                if body.convergent_encryption or body.exportable or body.allow_plaintext_backup:
                    raise InvalidRequestError(
                        "convergent_encryption, exportable and allow_plaintext_backup are not "
                        "supported: keys never leave the HSM"
                    )
                if body.auto_rotate_period not in (0, "0", "", "0s"):
                    raise InvalidRequestError("auto_rotate_period is not supported yet")
                key_type = parse_enum(KeyType, body.type, "type")
                classification = parse_enum(Classification, body.classification, "classification")
                residency = parse_enum(Residency, body.residency, "residency")
                existing = keys._store.get_policy(name)  # noqa: SLF001 - idempotent create
                if existing is not None:
                    if existing.key_type is not key_type:
                        raise InvalidRequestError(
                            f"key {name!r} exists with type {existing.key_type.value}"
                        )
                    return 200, envelope(call, key_json(existing), ["key already exists"])
                policy = keys.create_key(name, key_type, classification, residency)
                call.version = policy.latest_version
                call.details = {
                    "type": key_type.value,
                    "classification": classification.value,
                    "residency": residency.value,
                }
                return 200, envelope(call, key_json(policy))

            return await run(request, "transit.key.create", work, root_only=False)

        @router.get("/keys/{name}")
        async def read_key(request: Request, name: str) -> Response:
            def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
                call.key = name
                access.authorise_key_read(call.caller, name)
                return 200, envelope(call, key_json(keys.policy(name)))

            return await run(request, "transit.key.read", work, root_only=False, body=False)

        @router.api_route("/keys", methods=["GET", "LIST"])
        async def list_keys(request: Request) -> Response:
            def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
                if request.method == "GET" and request.query_params.get("list") != "true":
                    raise MethodNotAllowedError("use LIST, or GET with ?list=true")
                access.authorise_key_admin(call.caller, change=False)
                names = keys.list_names()
                if not names:
                    return 404, {"errors": []}
                return 200, envelope(call, {"keys": names})

            return await run(request, "transit.key.list", work, root_only=False, body=False)

        @router.api_route("/keys/{name}/rotate", methods=["POST", "PUT"])
        async def rotate_key(request: Request, name: str) -> Response:
            def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
                call.key = name
                access.authorise_key_admin(call.caller, change=True)
                serving()
                policy = keys.rotate(name)
                call.version = policy.latest_version
                return 200, envelope(call, key_json(policy))

            return await run(request, "transit.key.rotate", work, root_only=False)

        @router.api_route("/keys/{name}/config", methods=["POST", "PUT"])
        async def configure_key(request: Request, name: str) -> Response:
            def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
                call.key = name
                access.authorise_key_admin(call.caller, change=True)
                body = parse_model(ConfigRequest, data)
                if body.exportable or body.allow_plaintext_backup:
                    raise InvalidRequestError("keys cannot be made exportable")
                if body.deletion_allowed and not call.caller.root:
                    raise PermissionDeniedError("allowing deletion is break-glass: root token")
                if body.auto_rotate_period not in (None, 0, "0", "", "0s"):
                    raise InvalidRequestError("auto_rotate_period is not supported yet")
                policy = keys.configure(
                    name,
                    min_decryption_version=body.min_decryption_version,
                    min_encryption_version=body.min_encryption_version,
                    deletion_allowed=body.deletion_allowed,
                )
                call.details = body.model_dump(exclude_none=True)
                return 200, envelope(call, key_json(policy))

            return await run(request, "transit.key.config", work, root_only=False)

        @router.delete("/keys/{name}")
        async def delete_key(request: Request, name: str) -> Response:
            def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
                call.key = name
                keys.delete(name)
                return 204, None

            return await run(request, "transit.key.delete", work, body=False)

        @router.api_route("/encrypt/{name}", methods=["POST", "PUT"])
        async def encrypt(request: Request, name: str) -> Response:
            def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
                call.key = name
                serving()
                policy = keys.policy(name)

                def one(raw: Any) -> dict[str, Any]:
                    item = parse_model(EncryptItem, raw)
                    _reject_unsupported(item.nonce)
                    plaintext = decode_b64_field(item.plaintext, "plaintext")
                    ciphertext, version = keys.encrypt(
                        policy, plaintext, self._context(call, item.context), item.key_version
                    )
                    call.version = version
                    return {"ciphertext": ciphertext, "key_version": version}

                return self._batch(call, data, {"plaintext", "context", "key_version"}, one)

            return await run(request, "transit.encrypt", work)

        @router.api_route("/decrypt/{name}", methods=["POST", "PUT"])
        async def decrypt(request: Request, name: str) -> Response:
            def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
                call.key = name
                serving()
                policy = keys.policy(name)
                batch = data.get("batch_input")
                items = len(batch) if isinstance(batch, list) and batch else 1
                call.admit(
                    access.authorise_key_use(
                        call.caller, operation=DECRYPT, policy=policy, items=items
                    )
                )

                def one(raw: Any) -> dict[str, Any]:
                    item = parse_model(DecryptItem, raw)
                    _reject_unsupported(item.nonce)
                    plaintext, version = keys.decrypt(
                        policy, item.ciphertext, self._context(call, item.context)
                    )
                    call.version = version
                    return {"plaintext": base64.b64encode(plaintext).decode()}

                return self._batch(call, data, {"ciphertext", "context"}, one)

            # Root, or a restore credential scoped to this dataset (checked in work).
            return await run(request, "transit.decrypt", work, root_only=False)

        @router.api_route("/rewrap/{name}", methods=["POST", "PUT"])
        async def rewrap(request: Request, name: str) -> Response:
            def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
                call.key = name
                serving()
                policy = keys.policy(name)

                def one(raw: Any) -> dict[str, Any]:
                    item = parse_model(RewrapItem, raw)
                    _reject_unsupported(item.nonce)
                    ciphertext, version = keys.rewrap(
                        policy,
                        item.ciphertext,
                        self._context(call, item.context),
                        item.key_version,
                    )
                    call.version = version
                    return {"ciphertext": ciphertext, "key_version": version}

                return self._batch(call, data, {"ciphertext", "context", "key_version"}, one)

            return await run(request, "transit.rewrap", work)

        @router.api_route("/datakey/{kind}/{name}", methods=["POST", "PUT"])
        async def datakey(request: Request, kind: str, name: str) -> Response:
            def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
                call.key = name
                serving()
                if kind not in ("plaintext", "wrapped"):
                    raise InvalidRequestError("data key type must be 'plaintext' or 'wrapped'")
                body = parse_model(DatakeyRequest, data)
                _reject_unsupported(body.nonce)
                policy = keys.policy(name)
                call.admit(access.authorise_key_use(call.caller, operation=DATAKEY, policy=policy))
                plaintext, ciphertext, version = keys.datakey(
                    policy, self._context(call, body.context), body.bits
                )
                call.version = version
                call.details["plaintext_returned"] = kind == "plaintext"
                result = {"ciphertext": ciphertext, "key_version": version}
                if kind == "plaintext":
                    result["plaintext"] = base64.b64encode(plaintext).decode()
                wipe(plaintext)
                return 200, envelope(call, result)

            # Root, or a backup writer (checked in work).
            return await run(request, "transit.datakey", work, root_only=False)

        async def sign_route(request: Request, name: str, algorithm: str | None) -> Response:
            def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
                call.key = name
                serving()
                options = _sign_options(data, algorithm)
                policy = keys.policy(name)
                call.admit(access.authorise_key_use(call.caller, operation=SIGN, policy=policy))
                version = options.pop("key_version")

                def one(raw: Any) -> dict[str, Any]:
                    item = parse_model(SignItem, raw)
                    message = decode_b64_field(item.input, "input")
                    signature, used = keys.sign(policy, message, version=version, **options)
                    call.version = used
                    return {"signature": signature, "key_version": used}

                return self._batch(call, _strip(data, _SIGN_OPTIONS), {"input"}, one)

            # Root, or a backup writer with a manifest key (checked in work).
            return await run(request, "transit.sign", work, root_only=False)

        async def verify_route(request: Request, name: str, algorithm: str | None) -> Response:
            def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
                call.key = name
                options = _sign_options(data, algorithm)
                options.pop("key_version")
                policy = keys.policy(name)

                def one(raw: Any) -> dict[str, Any]:
                    item = parse_model(VerifyItem, raw)
                    message = decode_b64_field(item.input, "input")
                    return {"valid": keys.verify(policy, message, item.signature, **options)}

                return self._batch(call, _strip(data, _SIGN_OPTIONS), {"input", "signature"}, one)

            return await run(request, "transit.verify", work)

        @router.api_route("/sign/{name}", methods=["POST", "PUT"])
        async def sign(request: Request, name: str) -> Response:
            return await sign_route(request, name, None)

        @router.api_route("/sign/{name}/{algorithm}", methods=["POST", "PUT"])
        async def sign_with(request: Request, name: str, algorithm: str) -> Response:
            return await sign_route(request, name, algorithm)

        @router.api_route("/verify/{name}", methods=["POST", "PUT"])
        async def verify(request: Request, name: str) -> Response:
            return await verify_route(request, name, None)

        @router.api_route("/verify/{name}/{algorithm}", methods=["POST", "PUT"])
        async def verify_with(request: Request, name: str, algorithm: str) -> Response:
            return await verify_route(request, name, algorithm)

        return router


def _strip(data: dict[str, Any], names: set[str]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in names}


def _sign_options(data: dict[str, Any], path_algorithm: str | None) -> dict[str, Any]:
    algorithm = path_algorithm or data.get("hash_algorithm") or HashAlgorithm.SHA2_256.value
    prehashed = data.get("prehashed", False)
    if isinstance(prehashed, str) and prehashed in ("true", "false"):
        prehashed = prehashed == "true"
    if not isinstance(prehashed, bool):
        raise InvalidRequestError("prehashed must be a boolean")
    signature_algorithm = data.get("signature_algorithm")
    if signature_algorithm not in (None, "", "pkcs1v15"):
        raise InvalidRequestError("signature_algorithm applies only to RSA keys")
    version = data.get("key_version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise InvalidRequestError("key_version must be an integer")
    return {
        "hash_algorithm": parse_enum(HashAlgorithm, algorithm, "hash_algorithm"),
        "prehashed": prehashed,
        "marshaling": parse_enum(
            Marshaling, data.get("marshaling_algorithm") or "asn1", "marshaling_algorithm"
        ),
        "key_version": version,
    }
