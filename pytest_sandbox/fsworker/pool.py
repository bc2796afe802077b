"""FsWorkerPool: warm fs workers, bucketed by the exact (root, policy, proxy) they serve.

A worker is lent to one holder at a time. When it comes back (``close()`` on it) it is reset
to a pristine state — a fresh root emptied, the worker pinged — and goes back to its bucket;
a worker that answered an error, ran ``exec``, died, or whose root cannot be reset is stopped
instead — on a background thread, so a test that ran ``exec`` does not wait for its worker to
stop. Buckets are topped up to ``size`` idle workers on background threads as soon as one is
lent, so ``acquire()`` from a warm bucket is a list pop, and an acquire that finds the bucket
empty waits for the refill already under way instead of spawning a second worker beside it.
Usable without pytest; ``close()`` stops every worker it made.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_sandbox.errors import FsWorkerError
from pytest_sandbox.fsworker.client import FsWorker, ProxyLike, _scratch_dir
from pytest_sandbox.fsworker.policy import SandboxPolicy
from pytest_sandbox.runtime.ledger import ResourceTracker
from pytest_sandbox.runtime.run import RunContext

if TYPE_CHECKING:
    from pytest_sandbox.fsworker.zygote import Zygote

BucketKey = tuple[str | None, str, tuple[int, int] | None, str, int | None]


def _empty_dir(root: Path) -> None:
    """Remove everything inside ``root`` (never following a symlink out of it)."""
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


class FsWorkerPool:
    """Warm :class:`FsWorker` processes, ``size`` idle per bucket kept ready in the background.

    ``acquire(root=None, policy=None, proxy=None)`` lends a worker; ``root=None`` means a
    fresh, empty root. Buckets are keyed by the exact root, policy (JSON), proxy, kernel mode
    and uid. Buckets with a proxy are not prewarmed (proxies are short-lived); their workers
    are still reused while the proxy lives.
    """

    def __init__(
        self,
        *,
        size: int = 2,
        kernel: str = "auto",
        user: int | None = None,
        tracker: ResourceTracker | None = None,
        run: RunContext | None = None,
        worker_options: dict[str, Any] | None = None,
        zygote: bool = True,
    ) -> None:
        self.size = size
        #: Fork workers from a fork server (:mod:`.zygote`) instead of starting interpreters.
        self.use_zygote = zygote
        self._zygote: Zygote | None = None
        self._zygote_lock = threading.Lock()
        self._zygote_failed: str | None = None
        self.kernel = kernel
        self.user = user
        self._tracker = tracker
        self._run = run
        self._options = dict(worker_options or {})
        self._idle: dict[BucketKey, list[FsWorker]] = defaultdict(list)
        self._lent: set[int] = set()
        self._all: dict[int, FsWorker] = {}
        self._pending: dict[BucketKey, int] = defaultdict(int)
        self._lock = threading.Lock()
        #: Notified whenever a refill ends (a worker went idle, or the spawn failed).
        self._refilled = threading.Condition(self._lock)
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fsworker-pool")
        # stopping discarded workers must not hold up refills: a pool of its own
        self._stopper = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fsworker-stop")
        self._futures: list[Future[None]] = []
        self._closed = False
        self._root_state: dict[int, tuple[int, int, int]] = {}
        #: Counters for docs/benchmarks: spawned, reused, reset, discarded.
        self.stats: dict[str, int] = defaultdict(int)

    # --- keys and spawning ----------------------------------------------------------------

    def _key(
        self,
        root: str | os.PathLike[str] | None,
        policy: SandboxPolicy | None,
        proxy: ProxyLike | None,
        kernel: str | None,
        user: int | None,
    ) -> BucketKey:
        policy = policy if policy is not None else SandboxPolicy()
        return (
            None if root is None else os.path.realpath(root),
            policy.to_json(),
            None if proxy is None else (id(proxy), proxy.port),
            kernel or self.kernel,
            user,
        )

    def zygote(self) -> Zygote | None:
        """The pool's fork server, started on first use; None when off or it cannot start."""
        if not self.use_zygote or self._zygote_failed is not None:
            return None
        with self._zygote_lock:
            if self._zygote is None and self._zygote_failed is None and not self._closed:
                from pytest_sandbox.fsworker.zygote import Zygote

                if self._run is not None:
                    log_path = self._run.new_log_path("fszygote")
                else:
                    log_path = _scratch_dir() / f"zygote-{os.getpid()}-{id(self):x}.log"
                zygote = Zygote(log_path=log_path, tracker=self._tracker)
                try:
                    self._zygote = zygote.start()
                except FsWorkerError as exc:
                    # workers are still started, as plain interpreters: slower, same result
                    self._zygote_failed = str(exc)
            return self._zygote

    def _spawn(self, key: BucketKey, proxy: ProxyLike | None) -> FsWorker:
        root, policy_json, _, kernel, user = key
        options = dict(self._options)
        options.setdefault("zygote", self.zygote())
        if self._run is not None:
            options.setdefault("socket_path", self._run.new_socket_path("fs"))
            options.setdefault("log_path", self._run.new_log_path("fsworker"))
        worker = FsWorker(
            root,
            SandboxPolicy.from_json(policy_json),
            proxy=proxy,
            kernel=kernel,
            user=user,
            tracker=self._tracker,
            **options,
        )
        worker.start()
        worker._pool_key = key
        with self._lock:
            self._all[id(worker)] = worker
            self.stats["spawned"] += 1
        root_path = worker.root
        info = root_path.stat()
        self._root_state[id(worker)] = (info.st_uid, info.st_gid, info.st_mode)
        return worker

    def _refill(self, key: BucketKey) -> None:
        worker: FsWorker | None = None
        try:
            if not self._closed:
                worker = self._spawn(key, None)
        finally:
            with self._lock:
                self._pending[key] -= 1
                if worker is not None and not self._closed:
                    self._idle[key].append(worker)
                    worker = None
                self._refilled.notify_all()
        if worker is not None:
            worker.terminate()

    def _schedule_refill(self, key: BucketKey) -> None:
        """Top up a bucket without a proxy to ``size`` idle workers (called under the lock)."""
        if key[2] is not None or self._closed:
            return
        missing = self.size - len(self._idle[key]) - self._pending[key]
        for _ in range(max(0, missing)):
            self._pending[key] += 1
            self._futures.append(self._executor.submit(self._refill, key))

    # --- lending ----------------------------------------------------------------------------

    def acquire(
        self,
        root: str | os.PathLike[str] | None = None,
        policy: SandboxPolicy | None = None,
        proxy: ProxyLike | None = None,
        *,
        kernel: str | None = None,
        user: int | None = None,
    ) -> FsWorker:
        """Lend a worker for ``(root, policy, proxy)``: a warm one if the bucket has one."""
        if self._closed:
            raise FsWorkerError("the fs worker pool is closed; no worker can be lent")
        key = self._key(root, policy, proxy, kernel, user if user is not None else self.user)
        with self._lock:
            idle = self._idle[key]
            # a refill is under way: wait for it rather than spawn a second worker beside it
            while not idle and self._pending[key] > 0 and not self._closed:
                self._refilled.wait()
            worker = idle.pop() if idle else None
            self._schedule_refill(key)
        if worker is None:
            worker = self._spawn(key, proxy)
        else:
            self.stats["reused"] += 1
        worker._pool = self
        with self._lock:
            self._lent.add(id(worker))
        return worker

    def prewarm(
        self,
        root: str | os.PathLike[str] | None = None,
        policy: SandboxPolicy | None = None,
        *,
        wait: bool = False,
    ) -> None:
        """Start filling a bucket now (``wait=True`` blocks until it is full)."""
        key = self._key(root, policy, None, None, self.user)
        with self._lock:
            self._schedule_refill(key)
            futures = list(self._futures)
        if wait:
            for future in futures:
                future.result()

    def give_back(self, worker: FsWorker) -> None:
        """Called by ``worker.close()``: reset and reuse it, or stop it."""
        with self._lock:
            self._lent.discard(id(worker))
        fresh = worker.handover()
        with self._lock:
            self._all.pop(id(worker), None)
            self._all[id(fresh)] = fresh
            self._root_state[id(fresh)] = self._root_state.pop(id(worker), (0, 0, 0))
            closed = self._closed
        if closed:
            self._discard(fresh)
        else:
            # synchronous: costs the returning test about a millisecond, and the next acquire
            # finds the worker warm instead of racing a background reset
            self._reset(fresh)

    def forget(self, worker: FsWorker) -> None:
        """Called by ``worker.keep()``: the pool lets go of it (it is kept running)."""
        with self._lock:
            self._lent.discard(id(worker))
            self._all.pop(id(worker), None)

    def _reset(self, worker: FsWorker) -> None:
        key: BucketKey = worker._pool_key
        reason = self._unusable(worker)
        if reason is None and worker._fresh_root:
            try:
                _empty_dir(worker.root)
                info = worker.root.stat()
                if (info.st_uid, info.st_gid, info.st_mode) != self._root_state.get(id(worker)):
                    reason = "its root changed owner or mode"
            except OSError as exc:
                reason = f"its root could not be emptied: {exc}"
        if reason is None:
            try:
                worker.ping()
            except FsWorkerError as exc:
                reason = f"it did not answer a ping: {exc}"
        if reason is not None:
            self._discard(worker)
            return
        with self._lock:
            if not self._closed and len(self._idle[key]) < 2 * max(self.size, 1):
                self._idle[key].append(worker)
                self.stats["reset"] += 1
                return
        self._discard(worker)

    @staticmethod
    def _unusable(worker: FsWorker) -> str | None:
        if worker.tainted:
            return "it answered an error or ran exec"
        if not worker.alive:
            return "it is not running"
        proxy = worker.proxy
        if proxy is not None and getattr(proxy, "_server", True) is None:
            return "its egress proxy is closed"
        return None

    def _discard(self, worker: FsWorker) -> None:
        """Stop ``worker`` in the background (``close()`` stops what is still queued)."""
        with self._lock:
            self._root_state.pop(id(worker), None)
            self.stats["discarded"] += 1
            if not self._closed:
                with contextlib.suppress(RuntimeError):  # the stopper is shutting down
                    self._futures.append(self._stopper.submit(self._stop, worker))
                    return
            self._all.pop(id(worker), None)
        worker.terminate()

    def _stop(self, worker: FsWorker) -> None:
        try:
            worker.terminate()
        finally:
            with self._lock:
                self._all.pop(id(worker), None)

    # --- introspection and teardown ---------------------------------------------------------

    def idle_count(self, root: str | None = None, policy: SandboxPolicy | None = None) -> int:
        key = self._key(root, policy, None, None, self.user)
        with self._lock:
            return len(self._idle.get(key, []))

    def drain(self) -> None:
        """Wait for every pending reset and refill."""
        while True:
            with self._lock:
                futures = [f for f in self._futures if not f.done()]
                self._futures = futures
            if not futures:
                return
            for future in futures:
                with contextlib.suppress(Exception):
                    future.result()

    def close(self) -> None:
        """Stop every worker this pool made (idle and lent). Idempotent."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
            self._refilled.notify_all()
        self._executor.shutdown(wait=True, cancel_futures=True)
        # queued stops not yet started are cancelled: their workers are still in _all
        self._stopper.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            workers = list(self._all.values())
            self._all.clear()
            self._idle.clear()
            self._lent.clear()
        errors: list[Exception] = []
        for worker in workers:
            worker._pool = None
            try:
                worker.terminate()
            except Exception as exc:
                errors.append(exc)
        with self._zygote_lock:
            zygote, self._zygote = self._zygote, None
        if zygote is not None:
            try:
                zygote.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise ExceptionGroup("stopping pooled fs workers failed", errors)

    def __enter__(self) -> FsWorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


WorkerFactory = Callable[..., FsWorker]
