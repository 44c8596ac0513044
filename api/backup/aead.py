"""Tink's streaming AEAD (AES256_GCM_HKDF_1MB) keyed by a data key from the service (ADR 0009).

Tink is imported on first use, so ``ekms`` works without the ``backup`` extra until a backup
command runs. Tink takes its key as a serialized keyset; the data key arrives in a bytearray
that the caller wipes, and the serialized copies made here are dropped at once (Tink's own copy
lives in C++ and is zeroed when the primitive is freed). Python cannot promise more.
"""

from __future__ import annotations

import io
import os
import threading
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from api.backup.archive import DATA_KEY_BYTES, IntegrityError, UsageError

if TYPE_CHECKING:
    from collections.abc import Generator

    from _typeshed import ReadableBuffer

SEGMENT_BYTES = 1 << 20
_TYPE_URL = "type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey"
_registered = threading.Lock()
_state: dict[str, Any] = {}


def _tink() -> dict[str, Any]:
    """The Tink modules, registered once per process."""
    with _registered:
        if not _state:
            try:
                import tink  # noqa: PLC0415 - optional dependency, the backup extra
                from tink import secret_key_access, streaming_aead  # noqa: PLC0415
                from tink.proto import (  # noqa: PLC0415
                    aes_gcm_hkdf_streaming_pb2,
                    common_pb2,
                    tink_pb2,
                )
            except ImportError:
                raise UsageError(
                    "the backup commands need Tink: pip install 'embassy-kms[backup]'"
                ) from None
            streaming_aead.register()
            _state.update(
                tink=tink,
                access=secret_key_access,
                streaming=streaming_aead,
                key_pb2=aes_gcm_hkdf_streaming_pb2,
                common_pb2=common_pb2,
                tink_pb2=tink_pb2,
            )
        return _state


def tink_error() -> type[Exception]:
    return cast("type[Exception]", _tink()["tink"].TinkError)


class StreamCipher:
    """One object's streaming AEAD. Build it, use it for one stream, drop it."""

    def __init__(self, data_key: bytearray) -> None:
        if len(data_key) != DATA_KEY_BYTES:
            raise IntegrityError(f"a data key must be {DATA_KEY_BYTES} bytes")
        t = _tink()
        key = t["key_pb2"].AesGcmHkdfStreamingKey(version=0, key_value=bytes(data_key))
        key.params.ciphertext_segment_size = SEGMENT_BYTES
        key.params.derived_key_size = DATA_KEY_BYTES
        key.params.hkdf_hash_type = t["common_pb2"].SHA256
        pb = t["tink_pb2"]
        keyset = pb.Keyset(
            primary_key_id=1,
            key=[
                pb.Keyset.Key(
                    key_data=pb.KeyData(
                        type_url=_TYPE_URL,
                        value=key.SerializeToString(),
                        key_material_type=pb.KeyData.SYMMETRIC,
                    ),
                    status=pb.ENABLED,
                    key_id=1,
                    output_prefix_type=pb.RAW,
                )
            ],
        )
        handle = t["tink"].proto_keyset_format.parse(keyset.SerializeToString(), t["access"].TOKEN)
        del key, keyset
        self._primitive = handle.primitive(t["streaming"].StreamingAead)

    def __repr__(self) -> str:
        return "StreamCipher(<redacted>)"

    def encrypting(self, destination: BinaryIO, aad: bytes) -> BinaryIO:
        """Writes ciphertext to ``destination``; closing the stream closes it too."""
        return cast("BinaryIO", self._primitive.new_encrypting_stream(destination, aad))

    def decrypting(self, source: BinaryIO, aad: bytes) -> BinaryIO:
        """Reads plaintext; a Tink error on read means the ciphertext is not authentic."""
        return cast("BinaryIO", self._primitive.new_decrypting_stream(source, aad))

    def plaintext(
        self, source: BinaryIO, aad: bytes, chunk: int = SEGMENT_BYTES
    ) -> Generator[bytes, None, None]:
        """The plaintext of ``source`` in pieces of at most ``chunk`` bytes.

        ``source`` is closed at the end, or when the generator is closed part-way.

        Read from Tink's raw decrypting stream, not through the ``io.BufferedReader`` Tink puts
        around it: for reads of a segment that buffer only copies every byte once more, and it
        cost the restore 15% of its CPU (ADR 0009). Give an unbuffered source
        (``buffering=0``): Tink asks for 128 KiB at a time, which a buffer would copy too. A
        Tink error while iterating means the ciphertext is not authentic.
        """
        buffered = self._primitive.new_decrypting_stream(source, aad)
        raw = getattr(buffered, "raw", buffered)  # the reader must stay alive: it closes raw
        with buffered:
            while piece := raw.read(chunk):
                yield piece


class CountingWriter(io.RawIOBase):
    """A file descriptor as Tink's ciphertext destination, counting bytes; close leaves it open.

    Tink closes its destination when the stream closes; the caller still has to fsync.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        self.count += done
        return done
