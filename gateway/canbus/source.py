"""A live CAN bus through any python-can interface (socketcan can0/vcan0 on a Pi, virtual in
tests), read with python-can's ``Notifier`` + ``AsyncBufferedReader`` on the event loop and
handed on in small batches."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import can

from gateway.canbus.messages import channel_name
from gateway.errors import InputError
from gateway.records import FrameBatch, FrameBatchBuilder


@dataclass
class LiveBusSource:
    """A live CAN bus read through any python-can interface, as chunks of frames."""

    interface: str
    channel: str
    bitrate: int = 0
    name: str = ""
    max_batch: int = 512
    max_wait: float = 0.05
    stop: asyncio.Event | None = None

    def open(self) -> can.BusABC:
        kwargs: dict[str, Any] = {"bitrate": self.bitrate} if self.bitrate else {}
        try:
            return can.Bus(interface=self.interface, channel=self.channel, **kwargs)
        except (can.CanError, OSError, ValueError, ImportError, NotImplementedError) as exc:
            raise InputError(
                f"CAN bus {self.interface}:{self.channel}: cannot open: {exc}"
            ) from exc

    async def batches(self) -> AsyncIterator[FrameBatch]:
        bus = self.open()
        reader = can.AsyncBufferedReader()
        notifier = can.Notifier(bus, [reader], loop=asyncio.get_running_loop())
        builder = FrameBatchBuilder()
        label = self.name or self.channel
        stop = self.stop or asyncio.Event()
        try:
            while not stop.is_set():
                try:
                    msg = await asyncio.wait_for(reader.get_message(), timeout=self.max_wait)
                except TimeoutError:
                    msg = None
                if msg is not None:
                    self._add(builder, msg, label)
                    # take whatever else is already buffered, without waiting
                    while len(builder) < self.max_batch and not reader.buffer.empty():
                        self._add(builder, reader.buffer.get_nowait(), label)
                if len(builder) and (msg is None or len(builder) >= self.max_batch) or len(builder):
                    yield builder.build()
        finally:
            notifier.stop()
            with contextlib.suppress(Exception):
                bus.shutdown()

    @staticmethod
    def _add(builder: FrameBatchBuilder, msg: can.Message, label: str) -> None:
        builder.add(
            float(msg.timestamp),
            label or channel_name(msg.channel),
            msg.arbitration_id,
            bytes(msg.data),
            is_extended=msg.is_extended_id,
            is_remote=msg.is_remote_frame,
            is_error=msg.is_error_frame,
            is_fd=msg.is_fd,
        )
