"""What one ingress replica lets in: requests in flight (in all and per client address) and
decoded pixels in flight. Every refusal is a RequestError in the service's JSON format, given
before the body is read or an image decoded, so that slow or heavy clients cannot hold the
slots and memory that other clients need."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from spatialrl.service.api import RequestError
from spatialrl.service.config import LimitsConfig


class Admission:
    """Requests in flight, counted from their headers to their answer."""

    def __init__(self, limits: LimitsConfig):
        self._limits = limits
        self._per_client: Counter[str] = Counter()

    @property
    def in_flight(self) -> int:
        return self._per_client.total()

    @contextmanager
    def admit(self, client: str) -> Iterator[None]:
        """Hold a slot for one request of `client` (its address); refused at once beyond the
        replica's limit (503) or the client's (429)."""
        limits = self._limits
        if self.in_flight >= limits.max_requests_in_flight:
            raise RequestError(
                503, "overloaded",
                f"{self.in_flight} requests in flight, the most this replica takes; retry later",
            )
        if self._per_client[client] >= limits.max_requests_per_client:
            raise RequestError(
                429, "too_many_requests",
                f"{self._per_client[client]} requests from this client in flight, the most one "
                "client may have; wait for their answers",
            )
        self._per_client[client] += 1
        try:
            yield
        finally:
            self._per_client[client] -= 1
            if not self._per_client[client]:
                del self._per_client[client]  # the counter stays as small as the clients


class PixelBudget:
    """Decoded pixels held by the requests in flight: a request beyond `capacity` waits up to
    `wait_s` for others to finish, then is refused with 429."""

    def __init__(self, capacity: int, wait_s: float):
        self.capacity, self.wait_s, self.held = capacity, wait_s, 0
        self._freed = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        async with self._freed:
            try:
                await asyncio.wait_for(
                    self._freed.wait_for(lambda: self.held + pixels <= self.capacity),
                    self.wait_s,
                )
            except TimeoutError:
                raise RequestError(
                    429, "busy",
                    f"{self.held} decoded pixels in flight; {pixels} more would pass the limit "
                    f"of {self.capacity}; retry later",
                ) from None
            self.held += pixels
        try:
            yield
        finally:
            async with self._freed:
                self.held -= pixels
                self._freed.notify_all()
