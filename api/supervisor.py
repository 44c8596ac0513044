"""Several worker processes per node, one custodian, and no secret on disk.

The supervisor owns the node's ``Custodian``: workers forward unseal, reset, seal, status and
generate-root requests to it over a private pipe. When a quorum is reached the supervisor
derives the keys and sends them down each worker's command pipe; each worker logs into the HSM
itself (a PKCS#11 login is per process). A worker that dies is restarted and, if the node is
unsealed, opened. Workers are spawned, not forked, so no process inherits another's PKCS#11
state.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from api.runtime import create_runtime, prepare_hsm
from hsm.pins import TokenPins
from kms.derivation import RootKeys, wipe
from kms.errors import (
    BackendError,
    ConflictError,
    EkmsError,
    InvalidRequestError,
    InvalidShareError,
    NotInitializedError,
    SealedError,
    StorageError,
)
from kms.ports import SystemClock, SystemRandom
from kms.seal import Custodian, NoToken, SealStatus
from storage.sql_store import SqlStore

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    from api.settings import Settings
    from kms.rekey import RekeyPlan, RekeyStatus
    from kms.root_generation import RootGenerationStatus

log = logging.getLogger("ekms.supervisor")
_SPAWN = multiprocessing.get_context("spawn")
_ACK_TIMEOUT = 60.0
_ERRORS: dict[str, type[EkmsError]] = {
    cls.__name__: cls
    for cls in (
        InvalidShareError,
        ConflictError,
        NotInitializedError,
        InvalidRequestError,
        BackendError,
        StorageError,
        SealedError,
    )
}


@dataclass
class WorkerHandle:
    index: int
    process: BaseProcess
    commands: Connection  # supervisor -> worker: open / close
    rpc: Connection  # worker -> supervisor: custody requests
    lock: threading.Lock
    refusal: str = ""  # why the worker last refused a command (an EkmsError's message)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._workers: list[WorkerHandle] = []
        self._keys: RootKeys | None = None
        self._stopping = threading.Event()
        self._broadcast_lock = threading.Lock()
        self._store: SqlStore | None = None
        self.custodian: Custodian | None = None
        self._socket: socket.socket | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def prepare(self) -> Custodian:
        module = prepare_hsm(self.settings)
        self._store = SqlStore.open(self.settings.database_url)
        self.custodian = Custodian(
            store=self._store,
            clock=SystemClock(),
            opener=self._open_all,
            closer=self._close_all,
            tokens=self._store,
            random=SystemRandom(),
            timeout=self.settings.unseal_timeout,
            rekeys=self._store,
            pins=NoToken()  # a transit site: no PKCS#11 token, no PIN to change
            if self.settings.backend == "transit"
            else TokenPins(
                module=module,
                token_label=self.settings.token_label,
                manage_so_pin=self.settings.manage_so_pin,
            ),
            rekeyed=self._rekey_all,
            allow_single_share=self.settings.dev,
        )
        return self.custodian

    def bind(self) -> socket.socket:
        host, port = self.settings.host_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
        self._socket = sock
        return sock

    def serve(self, on_ready: Any = None) -> int:
        if self.custodian is None:
            self.prepare()
        sock = self._socket or self.bind()
        for index in range(self.settings.workers):
            self._workers.append(self._spawn(index, sock))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stopping.set())
        if on_ready is not None:
            on_ready()
        try:
            while not self._stopping.wait(0.5):
                self._restart_dead(sock)
        finally:
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        self._stopping.set()
        for worker in self._workers:
            if worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + 10
        for worker in self._workers:
            worker.process.join(timeout=max(0.1, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
        if self._keys is not None:
            self._keys.wipe()
            self._keys = None
        if self._socket is not None:
            self._socket.close()
        if self._store is not None:
            self._store.dispose()

    def _spawn(self, index: int, sock: socket.socket) -> WorkerHandle:
        commands, worker_commands = _SPAWN.Pipe()
        rpc, worker_rpc = _SPAWN.Pipe()
        process = _SPAWN.Process(
            target=worker_main,
            args=(self.settings, sock, worker_rpc, worker_commands, index),
            name=f"ekms-worker-{index}",
            daemon=True,
        )
        process.start()
        worker_rpc.close()
        worker_commands.close()
        handle = WorkerHandle(index, process, commands, rpc, threading.Lock())
        threading.Thread(target=self._serve_rpc, args=(handle,), daemon=True).start()
        with self._broadcast_lock:
            if self._keys is not None:
                self._send_open(handle, self._keys)
        return handle

    def _restart_dead(self, sock: socket.socket) -> None:
        for position, worker in enumerate(self._workers):
            if not worker.process.is_alive() and not self._stopping.is_set():
                log.error(
                    "worker %d exited with %s; restarting", worker.index, worker.process.exitcode
                )
                time.sleep(0.5)
                self._workers[position] = self._spawn(worker.index, sock)

    # --- custody broadcast ----------------------------------------------------------------

    def _open_all(self, keys: RootKeys) -> None:
        with self._broadcast_lock:
            self._keys = keys
            failed = [w for w in self._workers if not self._send_open(w, keys)]
            if failed:
                why = next((w.refusal for w in failed if w.refusal), "")
                self._close_locked()
                raise BackendError(
                    f"worker(s) {[w.index for w in failed]} could not open the key backend"
                    f"{f' ({why})' if why else ''}; node stays sealed"
                )

    def _rekey_all(self, keys: RootKeys) -> None:
        """A rekey committed: every worker keeps its HSM login and takes the new set's keys."""
        with self._broadcast_lock:
            old, self._keys = self._keys, keys
            if old is not None:
                old.wipe()
            blob = keys.to_bytes()
            try:
                for worker in self._workers:
                    if not self._command(worker, b"R" + blob):
                        log.error("worker %d did not take the new keys", worker.index)
            finally:
                wipe(blob)

    def _close_all(self) -> None:
        with self._broadcast_lock:
            self._close_locked()

    def _close_locked(self) -> None:
        for worker in self._workers:
            self._command(worker, b"C")
        if self._keys is not None:
            self._keys.wipe()
            self._keys = None

    def _send_open(self, worker: WorkerHandle, keys: RootKeys) -> bool:
        blob = keys.to_bytes()
        try:
            return self._command(worker, b"O" + blob)
        finally:
            wipe(blob)

    def _command(self, worker: WorkerHandle, message: bytes | bytearray) -> bool:
        with worker.lock:
            try:
                worker.commands.send_bytes(message)
                if not worker.commands.poll(_ACK_TIMEOUT):
                    log.error("worker %d did not acknowledge a command", worker.index)
                    return False
                reply = worker.commands.recv_bytes()
            except (OSError, EOFError):
                return not worker.process.is_alive()  # a dead worker is restarted sealed/opened
            if reply != b"K":
                worker.refusal = reply[1:].decode()
                log.error("worker %d refused a command: %s", worker.index, worker.refusal)
                return False
            worker.refusal = ""
            return True

    def _serve_rpc(self, worker: WorkerHandle) -> None:
        custodian = self.custodian
        assert custodian is not None
        while not self._stopping.is_set():
            try:
                request = worker.rpc.recv()
            except (EOFError, OSError):
                return
            try:
                reply: tuple[Any, ...] = ("ok", _custody_call(custodian, request))
            except EkmsError as exc:
                reply = ("error", type(exc).__name__, str(exc))
            except Exception as exc:  # noqa: BLE001 - reported to the worker, logged by type
                log.error("custody request failed: %s", type(exc).__name__)
                reply = ("error", "BackendError", "custody request failed")
            try:
                worker.rpc.send(reply)
            except (OSError, EOFError):
                return


def _custody_call(custodian: Custodian, request: tuple[Any, ...]) -> Any:
    """Run one RPC request from a worker against the node's custodian."""
    op, args = request[0], request[1:]
    calls: dict[str, Any] = {
        "submit": custodian.submit,
        "reset": custodian.reset,
        "seal": custodian.seal,
        "root-status": custodian.root_generation_status,
        "root-start": custodian.start_root_generation,
        "root-update": custodian.submit_root_share,
        "root-cancel": custodian.cancel_root_generation,
        "rekey-status": custodian.rekey_status,
        "rekey-start": custodian.start_rekey,
        "rekey-update": custodian.submit_rekey_share,
        "rekey-verify": custodian.submit_rekey_verification,
        "rekey-verify-reset": custodian.reset_rekey_verification,
        "rekey-cancel": custodian.cancel_rekey,
    }
    return calls.get(op, custodian.status)(*args)


class RemoteSealControl:
    """A worker's view of the node custodian, over the RPC pipe to the supervisor."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()

    def _call(self, *request: Any) -> Any:
        with self._lock:
            self._connection.send(request)
            reply = self._connection.recv()
        if reply[0] == "ok":
            return reply[1]
        kind = _ERRORS.get(reply[1], BackendError)
        if kind is NotInitializedError:
            raise NotInitializedError
        if kind is SealedError:
            raise SealedError
        raise kind(reply[2])

    def status(self) -> SealStatus:
        return cast("SealStatus", self._call("status"))

    def submit(self, mnemonic: str) -> SealStatus:
        return cast("SealStatus", self._call("submit", mnemonic))

    def reset(self) -> SealStatus:
        return cast("SealStatus", self._call("reset"))

    def seal(self) -> SealStatus:
        return cast("SealStatus", self._call("seal"))

    # The share, the nonce and a caller's OTP go to the supervisor; the reconstructed secret
    # never comes back: only the new token, XORed with the OTP.
    def root_generation_status(self) -> RootGenerationStatus:
        return cast("RootGenerationStatus", self._call("root-status"))

    def start_root_generation(self, otp: str | None) -> RootGenerationStatus:
        return cast("RootGenerationStatus", self._call("root-start", otp))

    def submit_root_share(self, mnemonic: str, nonce: str) -> RootGenerationStatus:
        return cast("RootGenerationStatus", self._call("root-update", mnemonic, nonce))

    def cancel_root_generation(self) -> RootGenerationStatus:
        return cast("RootGenerationStatus", self._call("root-cancel"))

    # Rekey: old and new shares go to the supervisor; the new shares come back once (as
    # mnemonics, or JWEs to their holders), no secret or working key ever does.
    def rekey_status(self) -> RekeyStatus:
        return cast("RekeyStatus", self._call("rekey-status"))

    def start_rekey(self, plan: RekeyPlan) -> RekeyStatus:
        return cast("RekeyStatus", self._call("rekey-start", plan))

    def submit_rekey_share(self, mnemonic: str, nonce: str) -> RekeyStatus:
        return cast("RekeyStatus", self._call("rekey-update", mnemonic, nonce))

    def submit_rekey_verification(self, mnemonic: str, nonce: str) -> RekeyStatus:
        return cast("RekeyStatus", self._call("rekey-verify", mnemonic, nonce))

    def reset_rekey_verification(self) -> RekeyStatus:
        return cast("RekeyStatus", self._call("rekey-verify-reset"))

    def cancel_rekey(self) -> RekeyStatus:
        return cast("RekeyStatus", self._call("rekey-cancel"))


def worker_main(
    settings: Settings, sock: socket.socket, rpc: Connection, commands: Connection, index: int
) -> None:
    import uvicorn

    from api.app import create_app
    from api.protocol import uvicorn_config

    logging.basicConfig(level=settings.log_level.upper())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when workers stop
    runtime = create_runtime(settings, run_migrations=False)
    app = create_app(runtime, RemoteSealControl(rpc))
    threading.Thread(
        target=_command_loop, args=(runtime, commands), name="custody-commands", daemon=True
    ).start()
    config = uvicorn_config(
        app,
        log_level=settings.log_level,
        tls_cert_file=settings.tls_cert_file,
        tls_key_file=settings.tls_key_file,
    )
    server = uvicorn.Server(config)
    config.load()
    # What exists now lives as long as the worker. Moving it out of the collector's reach keeps
    # full collections short, and they otherwise set the latency tail (tens of ms).
    gc.collect()
    gc.freeze()
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    runtime.close()
    log.debug("worker %d stopped", index)


def _command_loop(runtime: Any, commands: Connection) -> None:
    while True:
        try:
            message = bytearray(commands.recv_bytes())
        except (EOFError, OSError):
            runtime.seal_process()
            return
        try:
            if message[:1] == b"O":
                runtime.open_barrier(RootKeys.from_bytes(message[1:]))
            elif message[:1] == b"R":
                runtime.replace_keys(RootKeys.from_bytes(message[1:]))
            elif message[:1] == b"C":
                runtime.seal_process()
            commands.send_bytes(b"K")
        except EkmsError as exc:
            commands.send_bytes(b"E" + str(exc).encode())
        except Exception as exc:  # noqa: BLE001 - reported to the supervisor by type only
            commands.send_bytes(b"E" + type(exc).__name__.encode())
        finally:
            wipe(message)
