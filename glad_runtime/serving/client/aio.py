"""The asyncio client, :class:`AsyncGladClient`: the shared core (:mod:`~glad_runtime.serving.client.core`) driven by
``await`` on ``tritonclient.grpc.aio``."""

from __future__ import annotations

import asyncio
from typing import Any, Iterable

from glad_runtime.core.detection import Detection
from glad_runtime.serving.client.core import ClientCore, run_async

__all__ = ["AsyncGladClient"]


class AsyncGladClient(ClientCore):
    """The asyncio version of :class:`~glad_runtime.serving.client.GladClient` (``tritonclient.grpc.aio``); same
    arguments, same routing (the same :class:`~glad_runtime.serving.routing.Pool` and retry state machine), same
    requests and errors: both run the same step generators.

    ``await client.detect(images)``, ``await client.health()``, ``await client.metadata()``; use
    ``async with AsyncGladClient(...) as client`` or ``await client.close()``. Many coroutines may share one
    client in one event loop; a cancelled call releases its replica without blaming it.
    """

    _grpc_module = "tritonclient.grpc.aio"
    _keep_retired = 4
    _sleep = staticmethod(asyncio.sleep)

    def _retire(self, client) -> None:
        """A replaced channel, closed later (aio channels close only by ``await``): the oldest beyond four at the
        next replacement, the rest by :meth:`close`."""
        if client is None:
            return
        self._retired.append(client)
        while len(self._retired) > self._keep_retired:
            old = self._retired.pop(0)
            try:
                task = asyncio.get_running_loop().create_task(old.close())
            except RuntimeError:  # no running loop: left to the garbage collector
                continue
            self._closing.add(task)  # a reference until it is done (the loop keeps only weak ones)
            task.add_done_callback(self._closing.discard)

    async def metadata(self) -> dict:
        """See :meth:`GladClient.metadata`."""
        return await run_async(self._metadata_steps())

    async def health(self) -> dict[str, bool]:
        """See :meth:`GladClient.health` (the replicas are checked concurrently)."""
        return self._record_health(await asyncio.gather(*(run_async(self._health_steps(u)) for u in self.urls)))

    async def ready(self) -> bool:
        """See :meth:`GladClient.ready`."""
        return any((await self.health()).values())

    async def model_ready(self, graph: str = "glad") -> bool:
        """See :meth:`GladClient.model_ready`."""
        return await run_async(self._model_ready_steps(graph))

    async def detect(self, images: Iterable[Any], timeout: float | None = None) -> list[Detection]:
        """See :meth:`GladClient.detect`."""
        return await run_async(self._detect_steps(images, timeout))

    async def close(self) -> None:
        """Close the gRPC channels."""
        for c in self._take_channels():
            try:
                await c.close()
            except Exception:
                pass

    async def __aenter__(self) -> "AsyncGladClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
