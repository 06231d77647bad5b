"""Client: the blocking face of AsyncClient, for plain scripts and for many threads at once.

Calls block the calling thread; the work runs on a private event loop in one background thread
that owns the AsyncClient and its connection pool, so any number of threads share the pooled
keep-alive connections. Safe to use from inside another event loop's thread (it never touches
the caller's loop). A Client that is never closed is closed when it is collected or, at the
latest, at interpreter exit (a weakref finalizer), so aiohttp never warns of an unclosed session.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import numpy as np

from client.async_client import AsyncClient
from client.endpoints import Resolver, system_resolver
from client.inputs import Inputs
from client.model_info import ModelInfo
from client.prediction import Prediction
from client.retry import RetryPolicy

T = TypeVar("T")


class Client:
    """A blocking client; use it as `with Client(url) as client:`. Arguments as AsyncClient's.

    One instance may be shared by any number of threads: each call is one coroutine on the
    client's own loop thread, and the calls of different threads run concurrently.
    """

    def __init__(
        self,
        url: str | Sequence[str] = "http://127.0.0.1:8000",
        *,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 - frozen, so safely shared
        max_connections: int = 64,
        resolve_every_s: float | None = None,
        resolver: Resolver = system_resolver,
        token: str | None = None,
    ) -> None:
        self._client = AsyncClient(
            url,
            timeout_s=timeout_s,
            retry=retry,
            max_connections=max_connections,
            resolve_every_s=resolve_every_s,
            resolver=resolver,
            token=token,
        )
        self.url = url
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="microbatch-client", daemon=True
        )
        self._thread.start()
        # Guards submission against close(): nothing is submitted once the loop is stopping.
        self._lock = threading.Lock()
        self._closed = False
        # Holds no reference to self, so that an unclosed Client can still be collected; runs
        # once, from close(), from the collector or at interpreter exit (while the daemon loop
        # thread still runs), whichever comes first.
        self._finalizer = weakref.finalize(
            self, _close_blocking, self._client, self._loop, self._thread
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and stop the loop thread; calls still running are cancelled."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._finalizer()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a Client cannot be called from its own loop thread")
        with self._lock:
            if self._closed:
                coro.close()
                raise RuntimeError("the client is closed")
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            # No wait limit here: the coroutine enforces the call's own deadline.
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: stop the request on the loop too
            raise

    def health(self, *, timeout_s: float | None = None) -> bool:
        """See AsyncClient.health."""
        return self._run(self._client.health(timeout_s=timeout_s))

    def ready(self, *, timeout_s: float | None = None) -> bool:
        """See AsyncClient.ready."""
        return self._run(self._client.ready(timeout_s=timeout_s))

    def models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        """See AsyncClient.models."""
        return self._run(self._client.models(timeout_s=timeout_s))

    @overload
    def predict(
        self,
        model: str,
        x: np.ndarray,
        *,
        timeout_s: float | None = None,
        request_id: str | None = None,
        return_info: Literal[False] = False,
    ) -> np.ndarray: ...

    @overload
    def predict(
        self,
        model: str,
        x: Mapping[str, np.ndarray],
        *,
        timeout_s: float | None = None,
        request_id: str | None = None,
        return_info: Literal[False] = False,
    ) -> dict[str, np.ndarray]: ...

    @overload
    def predict(
        self,
        model: str,
        x: Inputs,
        *,
        timeout_s: float | None = None,
        request_id: str | None = None,
        return_info: Literal[True],
    ) -> Prediction: ...

    def predict(
        self,
        model: str,
        x: Inputs,
        *,
        timeout_s: float | None = None,
        request_id: str | None = None,
        return_info: bool = False,
    ) -> np.ndarray | dict[str, np.ndarray] | Prediction:
        """See AsyncClient.predict."""
        return self._run(self._client._predict_shaped(model, x, timeout_s, request_id, return_info))

    @overload
    def predict_many(
        self,
        model: str,
        arrays: Iterable[np.ndarray],
        *,
        concurrency: int = 8,
        timeout_s: float | None = None,
        return_info: Literal[False] = False,
    ) -> list[np.ndarray]: ...

    @overload
    def predict_many(
        self,
        model: str,
        arrays: Iterable[Mapping[str, np.ndarray]],
        *,
        concurrency: int = 8,
        timeout_s: float | None = None,
        return_info: Literal[False] = False,
    ) -> list[dict[str, np.ndarray]]: ...

    @overload
    def predict_many(
        self,
        model: str,
        arrays: Iterable[Inputs],
        *,
        concurrency: int = 8,
        timeout_s: float | None = None,
        return_info: Literal[True],
    ) -> list[Prediction]: ...

    def predict_many(
        self,
        model: str,
        arrays: Iterable[Inputs],
        *,
        concurrency: int = 8,
        timeout_s: float | None = None,
        return_info: bool = False,
    ) -> list[np.ndarray] | list[dict[str, np.ndarray]] | list[Prediction]:
        """See AsyncClient.predict_many."""
        items = list(arrays)  # consumed on the calling thread, not on the loop thread
        return self._run(
            self._client._predict_many_shaped(model, items, concurrency, timeout_s, return_info)
        )


def _close_blocking(
    client: AsyncClient, loop: asyncio.AbstractEventLoop, thread: threading.Thread
) -> None:
    """Close the client's connections on its loop, then stop the loop and its thread."""
    if threading.current_thread() is thread:
        # Collected on its own loop thread, which cannot wait for itself: close, then stop.
        loop.create_task(_shutdown(client)).add_done_callback(lambda _: loop.stop())
        return
    asyncio.run_coroutine_threadsafe(_shutdown(client), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


async def _shutdown(client: AsyncClient) -> None:
    await client.close()
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
