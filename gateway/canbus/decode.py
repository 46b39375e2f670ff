"""Decoding with cantools, frame by frame: the reference every faster decoder must equal."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cantools.database
import numpy as np

from gateway.canbus.dbc import ChannelDbcs
from gateway.canbus.signalplan import Meta, as_float, signal_meta
from gateway.records import DecodedBatch, Decoder, DecodeStats, FrameBatch, SignalSeries

__all__ = ["CantoolsDecoder", "Decoder"]

_DECODE_ERRORS = (cantools.database.DecodeError, ValueError, KeyError, IndexError)


@dataclass
class _Acc:
    """Samples of one signal gathered frame by frame."""

    unit: str
    choices: dict[float, str] | None
    ts: list[float] = field(default_factory=list)
    vals: list[float] = field(default_factory=list)


class CantoolsDecoder:
    """Decodes each frame with ``Message.decode``: truncated frames decode what fits
    (``allow_truncated``), enum signals stay numeric (their names travel in ``choices``),
    unknown ids and decode errors are counted per id, never raised.

    ``wanted``, when given, limits the output to those ``Msg.Sig`` names: the policy's
    default-deny starts here, since a signal nobody may receive need not be decoded at all.
    """

    def __init__(self, dbcs: ChannelDbcs, wanted: set[str] | None = None) -> None:
        self._dbcs = dbcs
        self._wanted = wanted
        self._lookup: dict[tuple[str, int], cantools.database.can.Message | None] = {}
        for _ in dbcs.all_databases():  # cantools' models now, of the files as they are now
            pass

    def _message(self, channel: str, frame_id: int) -> cantools.database.can.Message | None:
        key = (channel, frame_id)
        try:
            return self._lookup[key]
        except KeyError:
            pass
        found = None
        for db in self._dbcs.for_channel(channel):
            try:
                found = db.get_message_by_frame_id(frame_id)
                break
            except KeyError:
                continue
        self._lookup[key] = found
        return found

    def decode(self, batch: FrameBatch) -> DecodedBatch:
        stats = DecodeStats(frames=len(batch))
        accs: dict[str, _Acc] = {}
        meta_cache: dict[int, Meta] = {}
        special = batch.is_error | batch.is_remote
        stats.skipped_special = int(special.sum())
        ids = batch.arbitration_id.tolist()
        ext = batch.is_extended.tolist()
        chans = batch.channel.tolist()
        dlcs = batch.dlc.tolist()
        tss = batch.timestamp.tolist()
        data = batch.data
        wanted = self._wanted
        values: dict[str, Any]  # a plain message's (no container): signal -> number
        for i in np.flatnonzero(~special).tolist():
            fid = ids[i]
            # an extended frame is looked up as extended (bit 31, as cantools keys extended
            # messages): an extended 0x100 is not the standard 0x100
            msg = self._message(batch.channels[chans[i]], fid | 0x80000000 if ext[i] else fid)
            if msg is None:
                stats.unknown_id[fid] = stats.unknown_id.get(fid, 0) + 1
                continue
            try:
                values = msg.decode(  # type: ignore[assignment]
                    bytes(data[i, : dlcs[i]]),
                    decode_choices=False,
                    scaling=True,
                    allow_truncated=True,
                    allow_excess=True,
                )
            except _DECODE_ERRORS:
                stats.errors[fid] = stats.errors.get(fid, 0) + 1
                continue
            stats.decoded += 1
            meta = meta_cache.get(id(msg))
            if meta is None:
                meta = meta_cache[id(msg)] = signal_meta(msg)
            ts = tss[i]
            prefix = msg.name + "."
            for sig, val in values.items():
                name = prefix + sig
                if wanted is not None and name not in wanted:
                    continue
                acc = accs.get(name)
                if acc is None:
                    unit, choices = meta[name]
                    acc = accs[name] = _Acc(unit, choices)
                acc.ts.append(ts)
                acc.vals.append(as_float(val))
        series = [
            SignalSeries(
                name, np.array(a.ts, np.float64), np.array(a.vals, np.float64), a.unit, a.choices
            )
            for name, a in accs.items()
        ]
        return DecodedBatch(series, stats)
