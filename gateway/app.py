"""The only module that knows the whole graph: sources -> decode -> aggregate / location /
trips -> policy -> guard -> ledger -> outbox -> MQTT, the owner's inbound commands, periodic
health and ledger digests, and a bounded shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gateway import __version__
from gateway.canbus.dbc import ChannelDbcs
from gateway.egress.guard import EgressGuard, Outgoing, Released, categories_of
from gateway.egress.ledger import Ledger, egress_hashes, last_stop, last_vin, unfinished_egress
from gateway.egress.mqtt import MqttPublisher
from gateway.egress.outbox import Outbox, Pending
from gateway.egress.schema import SCHEMAS, Topics, unpack
from gateway.errors import ConfigError, GatewayError, StorageError, make_folder
from gateway.health import HealthMonitor
from gateway.records import (
    Decoder,
    DecodeStats,
    FrameBatch,
    ReadStats,
    SignalSeries,
    WindowSummary,
)
from gateway.settings import Settings
from gateway.telemetry.aggregate import WindowAggregator
from gateway.telemetry.consent import ConsentRefused, ConsentState, parse_owner_message
from gateway.telemetry.location import (
    LocationLimiter,
    LocationStage,
    coarsen,
    parse_geofences,
)
from gateway.telemetry.policy import (
    Category,
    LocationAxis,
    Policy,
    load_policy,
    permitted_signals,
    quantize,
)
from gateway.telemetry.trips import Trip, TripDetector

log = logging.getLogger(__name__)


class Source(Protocol):
    """Where frames come from. A source whose ``unpaced`` attribute is true (a replay with
    ``--fast``) never awaits between batches: the gateway yields to the event loop itself,
    between the group commits that span several of its batches. A live source (see
    ``canbus.source``) also has ``now()``, this moment on its clock, by which the empty
    batches it sends while the bus is silent close the windows that ended, and a
    ``clock_steps`` count: when it grows, the windows open before the step are closed."""

    def batches(self) -> AsyncIterator[FrameBatch]: ...


# An unpaced source's batches share one egress group (one ledger fsync, one outbox commit)
# until this much wall time has passed; then the group commits and the other tasks (publisher,
# owner commands, camera) get the event loop. Nothing else runs inside a group.
UNPACED_GROUP_SECONDS = 0.1
# the categories whose consent a waiting message still needs when it is sent: the sensitive
# ones but the camera's (its summaries are counts, let out by ``camera_summaries``)
_CONSENT_AT_SENDING = frozenset(
    c.value for c in Category if c.sensitive and c is not Category.EXTERIOR_CAMERA
)
# a live bus's window closes this long after its end on the bus's clock when no later frame
# came (a frame is handed on within ~0.1 s of its time; one this late counts as late)
LIVE_GRACE_SECONDS = 2.0
# an unpaced replay whose summaries wait, more than this many, for a connected broker waits
# for the publisher until half as many wait: a fast --loop replay sent ~8 summaries a second
# while it made thousands, and its outbox reached its bound and dropped them. A broker away
# does not hold a replay (the outbox keeps them); a stop cancels the wait
UNPACED_BACKLOG = 2000
# once the broker answered (a CONNACK), a run waits this long at most for the subscriptions to
# the owner's commands before it reads a frame (see Gateway._until_listening)
LISTEN_WAIT_SECONDS = 3.0


def say_missing(policy: Policy, dbcs: ChannelDbcs, *, thorough: bool = False) -> None:
    """Policy signals that no DBC defines never leave. One policy may serve several vehicles, so
    each is said with -v; that none at all is defined (the wrong DBC, or a typo everywhere) is
    a warning, and so is a signal whose message a DBC has but not the signal itself (a typo in
    the signal's name, or another version of the DBC). ``thorough`` (``gateway config``): a
    message name close to one of the DBCs' is a warning too (a typo in the message's name). A
    signal only ``[trips]`` names never leaves anyway: trips are computed without it."""
    wanted = policy.wanted_signals()
    missing = dbcs.missing(wanted)
    trips_only = policy.trips.signals - set(policy.rules)
    for name in missing:
        # a close message name is looked for only when it is said (-v, or a check of the
        # config): ~1 ms a signal, at every start
        has_message, close = dbcs.near(
            name, other_messages=thorough or log.isEnabledFor(logging.INFO)
        )
        hint = f" (did you mean {close}?)" if close else ""
        effect = (
            "trips are computed without it (without gear and speed, there are none)"
            if name in trips_only
            else "it is never published"
        )
        if has_message:
            msg, _, sig = name.partition(".")
            log.warning(
                "policy: message %s of the DBCs has no signal %s%s: %s", msg, sig, hint, effect
            )
        else:
            (log.warning if thorough and close else log.info)(
                "policy: signal %s is in none of the DBCs given%s: %s", name, hint, effect
            )
    if missing and len(missing) == len(wanted):
        log.warning(
            "policy: none of its %d signals is in the DBCs given (%s%s): nothing but health "
            "and consent will be published",
            len(wanted),
            ", ".join(missing[:3]),
            ", ..." if len(missing) > 3 else "",
        )


def check_vehicle_files(
    ledger: str, outbox_path: str, vin: str, outbox: Outbox, topics: Topics
) -> None:
    """A ledger or outbox of another vehicle (two gateways configured with the same files, a
    VIN changed) is refused: its waiting summaries would leave under this vehicle's login
    (dropped by the broker: lost) or reach the wrong owner, and two vehicles' records would
    interleave in one hash chain."""
    other = outbox.foreign_topic(topics.base)
    if other is not None:
        theirs = other.rsplit("/owner/", 1)[0]
        raise ConfigError(
            f"{outbox_path}: holds summaries for {theirs}, not "
            f"{topics.base.rsplit('/owner', 1)[0]}: if these are that vehicle's files, give "
            f"--vin {theirs.rsplit('/', 1)[-1]}; else each vehicle its own --outbox and "
            "--ledger ([gateway].outbox, .ledger)"
        )
    last = last_vin(ledger)
    if last is not None and last != vin:
        raise ConfigError(
            f"{ledger}: the audit ledger of vehicle {last}, not {vin}: if these are that "
            f"vehicle's files, give --vin {last}; else each vehicle its own --ledger and "
            "--outbox ([gateway].ledger, .outbox)"
        )


def make_decoder(settings: Settings, dbcs: ChannelDbcs, wanted: set[str]) -> Decoder:
    if settings.gateway.decoder == "vector":
        from gateway.canbus.fastdecode import VectorDecoder

        return VectorDecoder(dbcs, wanted=wanted)
    from gateway.canbus.decode import CantoolsDecoder  # cantools itself: imported only here

    return CantoolsDecoder(dbcs, wanted=wanted)


def _latest(batch: FrameBatch, before: float) -> float:
    """The latest finite frame time of ``batch`` (``before`` if it has none)."""
    t = float(batch.timestamp.max())
    if math.isfinite(t):
        return t
    finite = batch.timestamp[np.isfinite(batch.timestamp)]
    return float(finite.max()) if finite.size else before


@dataclass
class RunReport:
    """What one run did: frames read and decoded, summaries released, blocked and sent, and
    what is left in the outbox."""

    frames: int = 0
    raw_bytes: int = 0
    decode: DecodeStats = field(default_factory=DecodeStats)
    read: list[ReadStats] = field(default_factory=list)
    windows: int = 0
    released: int = 0
    blocked: int = 0
    bytes_released: int = 0
    sent: int = 0
    outbox_left: int = 0  # waiting in the outbox file, sent on the next run
    # sent in this run, but their rows stay in the outbox file, which could not be written
    # (read-only): the next run that can write it sends them again (the owner drops repeats)
    outbox_sent_kept: int = 0
    outbox_lost: int = 0  # left waiting by the last run in an outbox file that is gone
    outbox_deleted: int = 0  # waiting in an outbox file deleted while this run ran
    stopped_by: str = ""  # the signal that stopped the run (SIGINT, SIGTERM), if one did
    # held in memory only (the outbox file could not be written) when the run ended: lost,
    # and recorded in the ledger as dropped
    lost_in_memory: int = 0
    # dropped by the outbox's bounds (its size, the policy's retention): never sent, recorded
    dropped: int = 0
    # not sent, their rows changed or damaged in the outbox file while the run ran (recorded)
    changed_in_outbox: int = 0
    late_samples: int = 0  # older than a window already published (time went backwards)
    frames_while_stopped: int = 0  # read while the owner had stopped collection: not decoded
    invalid_samples: int = 0  # NaN, infinity, a 'not available' state, a time outside any window
    channels: dict[str, int] = field(default_factory=dict)  # frames per channel name
    positions_withheld: int = 0  # without location consent
    positions_in_geofence: int = 0
    positions_no_fix: int = 0  # a coordinate that is not a finite number
    # fixes held back inside each fence of the policy, by name (with location consent: the
    # fences are not looked at without it)
    positions_by_fence: dict[str, int] = field(default_factory=dict)
    positions_limited: int = 0  # too soon after the one before, or too close to it
    # window values of sensitive signals withheld for lack of consent, by category
    withheld: dict[str, int] = field(default_factory=dict)
    camera_summaries: bool = True  # whether the policy lets the camera's counts leave
    drain_cut: str | None = None  # what ended the wait to send the rest, the broker being up
    trips: int = 0
    broker_error: str | None = None
    camera: list[Any] = field(default_factory=list)

    @property
    def bad_lines(self) -> int:
        return sum(s.bad_lines for s in self.read)


def _apply_config_consent(
    consent: ConsentState,
    specs: Sequence[str],
    policy: Policy,
    now: float,
    name: str = "consent",
) -> None:
    """The consents ``specs`` gives (``[gateway].consent``); ``name`` begins each error:
    ``gateway.toml: [gateway].consent``, ``--consent``."""
    for spec in specs:
        cat, colon, days = spec.partition(":")
        if not colon:
            raise ConfigError(f"{name} {spec!r}: expected CATEGORY:DAYS, e.g. location:7")
        try:
            category = Category(cat.strip())
        except ValueError:
            import difflib

            names = [c.value for c in Category if c.sensitive]
            close = difflib.get_close_matches(cat.strip(), names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (one of {', '.join(names)})"
            raise ConfigError(f"{name} {spec!r}: no category {cat.strip()!r}{hint}") from None
        try:
            until = now + float(days) * 86400
        except ValueError:
            raise ConfigError(f"{name} {spec!r}: expected CATEGORY:DAYS, e.g. location:7") from None
        try:
            consent.grant(category, until, now, policy.max_consent_days, source="config")
        except ConsentRefused as exc:
            raise ConfigError(f"{name} {spec!r} refused: {exc}") from None


@dataclass
class _Held:
    """What one CAN loop holds in memory and has not sent: its open windows, the location
    stage (its last exact position), the running trip (and the frame time it started at,
    with whether location consent was valid then), and the trips a stop ended, which leave
    once collection is on again."""

    agg: WindowAggregator
    loc: LocationStage | None
    trips: TripDetector | None
    started: tuple[float | None, bool] = (None, False)
    held: list[tuple[Trip, bool]] = field(default_factory=list)


class Gateway:
    def __init__(
        self,
        settings: Settings,
        sources: Sequence[Source],
        *,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.time,
        cameras: Sequence[Any] = (),
        on_batch: Callable[[FrameBatch], None] | None = None,
    ) -> None:
        g = settings.gateway
        self.settings = settings
        self.sources = list(sources)
        self.cameras = list(cameras)
        self.clock = clock
        self.on_batch = on_batch
        self.policy = policy or load_policy(g.policy or None)
        self.dbcs = ChannelDbcs.from_specs(settings.dbc)
        wanted = self.policy.wanted_signals()
        self.decoder = make_decoder(settings, self.dbcs, wanted)
        say_missing(self.policy, self.dbcs)
        self.topics = Topics(settings.broker.topic_prefix, g.vin)
        self.state_dir = g.state_path
        make_folder(self.state_dir, "gateway's state folder")
        self.consent_path = g.consent_file
        now = clock()
        self.consent = ConsentState.load(self.consent_path)
        self.consent.new_ignition_cycle(now)
        _apply_config_consent(
            self.consent, g.consent, self.policy, now, f"{settings.source_file}: [gateway].consent"
        )
        new_ledger = not Path(g.ledger).exists()
        self.ledger = Ledger(g.ledger)
        try:
            self.outbox = Outbox(
                g.outbox,
                on_drop=self._record_drop,
                max_age_s=self.policy.location_retention_days * 86400,
            )
        except BaseException:  # a damaged or busy outbox: the ledger's lock is not held on to
            with contextlib.suppress(OSError):  # nor an empty ledger made for nothing left
                if new_ledger and Path(g.ledger).stat().st_size == 0:
                    Path(g.ledger).unlink()  # while its lock is held: no other opened it
            self.ledger.close()
            raise
        try:
            check_vehicle_files(g.ledger, g.outbox, g.vin, self.outbox, self.topics)
        except BaseException:
            self.outbox.close()
            self.ledger.close()
            raise
        self._reconcile()
        self._outbox_lost = 0
        try:
            self._check_waiting()
        except BaseException:
            self.outbox.close()
            self.ledger.close()
            raise
        self.outbox.reserve_seq(self.ledger.max_seq + 1)
        self.guard = EgressGuard(
            self.policy,
            self.topics,
            consent_ok=lambda c: self.consent.ok(c, self.clock()),
            consent_snapshot=lambda: self.consent.snapshot(self.clock()),
            next_seq=self.outbox.next_seq,
            give_back=self.outbox.give_back,
            on_block=self._record_block,
        )
        self.publisher = MqttPublisher(
            settings.broker,
            self.outbox,
            identifier=settings.broker.client_id or f"gateway-{g.vin}",
            status=self._status,
            inbound_topics=(self.topics.consent_set, self.topics.command),
            on_inbound=self.handle_owner_message,
            may_send=self._still_consented,
            on_withheld=lambda items: self._record_drop(
                items, f"{self._lapsed(items)} consent no longer valid when it was to be sent"
            ),
            on_changed=self._changed_in_outbox,
            will_status=lambda: self._status("offline", "connection lost", record=False),
            on_will_sent=self._ledger_egress,
            # the first connection's consent state is published by run(); a reconnection may
            # be to a broker that restarted and lost the retained one
            on_connected=lambda n: self._consent_again() if n > 1 else None,
        )
        self.health = HealthMonitor()
        for source in self.sources:  # a live bus that never sends a frame shows at 0 frames/s
            for label in getattr(source, "labels", ()):
                self.health.per_channel.setdefault(label, 0)
        self.report = RunReport(camera_summaries=self.policy.camera_summaries)
        self.report.outbox_lost = self._outbox_lost
        self._group: list[Released] | None = None  # messages of an open egress_group()
        self._drain_stop = asyncio.Event()  # see stop_draining()
        self.ledger.append(
            "start",
            gateway=__version__,
            vin=g.vin,
            policy=self.policy.ident,
            policy_sha256=self.policy.digest,
            policy_source=self.policy.source,
            consent=self.consent.snapshot(now),
            outbox=self._outbox_named(),
        )
        self._digest_sent_at = time.monotonic()
        # the categories granted in the consent state the owner last saw
        self._grants_published = set(self.consent.snapshot(now))
        # what each running CAN loop holds in memory, unsent (an owner's delete reaches it)
        self._held: list[_Held] = []
        # retained messages on the owner's topics refused in this run: (topic, sha256)
        self._refused_retained: set[tuple[str, str]] = set()

    def _reconcile(self) -> None:
        """A run killed between the fsync of its ledger lines and the commit of the same
        summaries to the outbox left egress entries for summaries that never reached the
        outbox file (its next number says so), and so never leave: on the record as such."""
        stored = self.outbox.stored_seq
        if stored is None or self.ledger.max_seq < stored:
            return
        lost = unfinished_egress(self.ledger.path, stored)
        if lost:
            self.ledger.append(
                "dropped",
                reason="the last run stopped (killed, or power lost) after these were written "
                "to the ledger and before they reached the outbox file: not sent from it",
                seqs=[q for q, _ in lost],
                sha256=[h for _, h in lost],
            )

    def _check_waiting(self) -> None:
        """What waits in the outbox is what the ledger recorded: each summary has its egress
        line, with the same sha256. Else nothing is sent: a summary changed in the outbox file
        would leave with bytes no ledger line holds, and a ledger that lost its end (cut, or
        restored from a backup) would let summaries leave without any. Numbers the outbox
        handed out above the ledger's highest, none waiting, are lines the ledger lost:
        recorded, and said."""
        waiting = self.outbox.digests()
        # from here on, what the publisher sends must be bytes on record (a row changed in the
        # file while the gateway runs is not sent either): what waits, checked below, and
        # what is put later
        self.outbox.expect(waiting)
        seqs = {q for q, _ in waiting if q is not None}
        loose = {h for q, h in waiting if q is None}
        if waiting:
            by_seq, found = egress_hashes(self.ledger.path, seqs, loose)
            missing = sorted(seqs - by_seq.keys())
            changed = [q for q, h in waiting if q in by_seq and by_seq[q] != h]
            where = f"{self.outbox.path}: "
            if changed:
                raise StorageError(
                    f"{where}{len(changed)} summary(ies) waiting in it (first seq {changed[0]}) "
                    f"differ from what the audit ledger {self.ledger.path} recorded of them: "
                    "the outbox was changed after they were written. Nothing was sent; move it "
                    "aside to start with an empty one"
                )
            if missing or loose - found:
                span = f" (seq {missing[0]}..{missing[-1]})" if missing else ""
                raise StorageError(
                    f"{where}{len(missing) + len(loose - found)} summary(ies) waiting in it"
                    f"{span} have no line in the audit ledger {self.ledger.path}: the ledger "
                    "lost its end (cut, or restored from a backup?), or the outbox is another "
                    "ledger's. Nothing was sent; put the ledger back, or move the outbox aside"
                )
        stored = self.outbox.stored_seq
        if stored is None and self.outbox.path is not None:
            self._check_outbox_kept()
        if stored is not None and stored - 1 > self.ledger.max_seq:
            first, last = self.ledger.max_seq + 1, stored - 1
            log.warning(
                "%s ends at seq %d, but the outbox %s numbered summaries up to %d: the ledger "
                "lost the lines of seq %d..%d (recorded as unrecorded)",
                self.ledger.path, self.ledger.max_seq, self.outbox.path, last, first, last,
            )  # fmt: skip
            self.ledger.append(
                "unrecorded",
                seqs=[first, last],
                reason="numbered by the outbox, not in this ledger: lines it lost (cut, or "
                "restored from a backup); whether those summaries left is not on record",
            )

    def _check_outbox_kept(self) -> None:
        """No outbox file to read (or an empty one), though the last run left summaries
        waiting in it: the file was deleted or replaced since (or while that run ran). They
        are lost: recorded, and said, not passed over as a first run."""
        if self.outbox.storage_error is not None:
            return  # (a file that cannot be opened is not a file that is gone)
        stop, run = last_stop(self.ledger.path)
        if run is None or run.get("outbox") != self._outbox_named():
            # the last run used another outbox file (or a gateway that did not name it): what
            # it left there is not this one's to judge
            return
        if stop is None and self.ledger.max_seq >= 0:
            # the last run was killed (no stop entry): what it left waiting is not known
            log.warning(
                "%s: the last run in %s has no stop entry (killed?), and this outbox is gone "
                "(deleted or emptied): whatever it left waiting is lost (their egress lines "
                "are in the ledger)",
                self.outbox.path, self.ledger.path,
            )  # fmt: skip
            self.ledger.append(
                "dropped",
                reason="the outbox file of a run that was killed is gone (deleted or emptied): "
                "whatever that run left waiting in it was never sent from it; how many is "
                "not known",
            )
            return
        left = stop.get("outbox_left") if stop is not None else None
        if not isinstance(left, int) or left <= 0:
            return
        log.error(
            "%s: the last run left %d summary(ies) waiting in this outbox, and it is gone "
            "(deleted or replaced by an empty file): they will never be sent (recorded as "
            "dropped in %s)",
            self.outbox.path, left, self.ledger.path,
        )  # fmt: skip
        self._outbox_lost = left
        self.ledger.append(
            "dropped",
            count=left,
            reason="the outbox file that held them was deleted or replaced since the last run "
            "(or during it): never sent from it",
        )

    # -- egress ----------------------------------------------------------------------------
    def emit(self, out: Outgoing) -> Released | None:
        """Guard, ledger, outbox: the one path by which anything may leave."""
        msg = self.guard.release(out)
        if msg is None:
            return None
        try:
            self._ledger_egress(msg)
        except StorageError:
            self.outbox.give_back(msg.seq)  # it never leaves: its number is not lost
            raise
        if self._group is not None:
            self._group.append(msg)
        else:
            self.outbox.put(msg)
        self.report.released += 1
        self.report.bytes_released += len(msg.payload)
        return msg

    @contextlib.contextmanager
    def egress_group(self) -> Iterator[None]:
        """A group commit: what is emitted inside reaches the outbox when the block ends, after
        one fsync of all its ledger lines, in one transaction. Until then nothing of it can be
        sent, so the ledger still holds every message before the network does. A fast replay
        closes many windows per batch of frames, and holds one group over the batches of
        ``UNPACED_GROUP_SECONDS``: one fsync per window was most of its egress time, and one
        per batch still ~100 fsyncs per million Model 3 frames (slow on an SD card)."""
        if self._group is not None:
            yield
            return
        group: list[Released] = []
        self._group = group
        try:
            with self.ledger.group():
                yield
        finally:
            self._group = None
            if group and self.ledger.durable:
                self.outbox.put_many(group)
            elif group:  # the ledger could not take its lines (cut off again): none leaves
                self.report.released -= len(group)
                self.report.bytes_released -= sum(len(m.payload) for m in group)
                self.outbox.give_back(
                    min((m.seq for m in group if m.seq is not None), default=None)
                )

    def _ledger_egress(self, msg: Released) -> None:
        self.ledger.append(
            "egress",
            topic=msg.topic,
            seq=msg.seq,
            schema=msg.schema,
            sha256=msg.sha256,
            bytes=len(msg.payload),
            rules=list(msg.rules),
            consent=dict(msg.consent),
        )

    def _record_block(self, out: Outgoing, reason: str) -> None:
        self.report.blocked += 1
        self.ledger.append("blocked", schema=out.schema, reason=reason, rules=list(out.rules))

    def _still_consented(self, item: Pending) -> bool:
        """Whether a waiting message may still leave: data of a category that needs consent
        (a position, a trip with its areas, a summary with a cabin or biometric signal) only
        while that consent is valid now, not only when it was queued. (A camera summary, its
        counts, leaves without consent, as the guard let it out: ``camera_summaries``.)"""
        needs = [c for c in self._categories_of(item).split() if c in _CONSENT_AT_SENDING]
        now = self.clock() if needs else 0.0
        return all(self.consent.ok(Category(c), now) for c in needs)

    def _categories_of(self, item: Pending) -> str:
        """A waiting message's categories; for one an older version queued without them, read
        off its body as the guard does (a summary's signals by the policy in force)."""
        if item.categories is not None:
            return item.categories
        schema = SCHEMAS.get(item.schema)
        if schema is None:
            return ""
        try:
            body = unpack(item.payload)
        except Exception:  # noqa: BLE001 - ours, so not expected; held back to be safe
            return " ".join(sorted(_CONSENT_AT_SENDING))
        if not isinstance(body, dict):
            return " ".join(sorted(_CONSENT_AT_SENDING))
        return " ".join(categories_of(self.policy, schema, body))

    def _lapsed(self, items: list[Pending]) -> str:
        """The categories whose consent kept ``items`` back (``_still_consented``)."""
        now = self.clock()
        found = {
            c
            for item in items
            for c in self._categories_of(item).split()
            if c in _CONSENT_AT_SENDING and not self.consent.ok(Category(c), now)
        }
        return " and ".join(sorted(found)) or "location"

    def _changed_in_outbox(self, item: Pending) -> None:
        """A waiting message whose bytes are not what the ledger recorded, or whose row is
        damaged (its row in the outbox file was changed while the gateway ran): not sent,
        removed, on the record, and counted (the exit status says it was never delivered)."""
        damaged = f" ({item.damaged})" if item.damaged else ""
        log.error(
            "%s: a waiting message (seq %s, %s) was changed in the file after its egress line "
            "was written%s: not sent, removed (recorded in the ledger)",
            self.outbox.path, item.seq, item.schema, damaged,
        )  # fmt: skip
        self.report.changed_in_outbox += 1
        self._record_drop(
            [item],
            f"changed in the outbox file after its egress line was written{damaged}: not sent",
        )

    def _record_drop(self, items: list[Pending], why: str) -> None:
        self.ledger.append(
            "dropped",
            reason=why,
            seqs=[i.seq for i in items],
            sha256=[hashlib.sha256(i.payload).hexdigest() for i in items],
        )

    def _record_stop(self, outbox_left: int, **more: Any) -> None:
        """The ledger's stop entry of this run: what was released, blocked and left."""
        self.ledger.append(
            "stop",
            released=self.report.released,
            blocked=self.report.blocked,
            outbox_left=outbox_left,
            outbox=self._outbox_named(),
            **more,
        )

    def _outbox_named(self) -> str | None:
        """The outbox file as the ledger names it (its absolute path; None: in memory)."""
        return None if self.outbox.path is None else str(Path(self.outbox.path).resolve())

    def _status(self, state: str, reason: str, record: bool = True) -> Released | None:
        msg = self.guard.release(
            Outgoing(
                "gateway.status",
                {
                    "state": state,
                    "at": round(self.clock(), 3),
                    "reason": reason,
                    "collection": self.consent.collection.value,
                },
            )
        )
        if msg is not None and record:
            self._ledger_egress(msg)
        return msg

    def _consent_again(self) -> None:
        """The retained consent state once more, as it is (nothing changed: not saved again)."""
        self.emit(Outgoing("gateway.consent", self.consent.public(round(self.clock(), 3))))

    def publish_consent_state(self) -> None:
        now = self.clock()
        self.consent.save(self.consent_path)
        self._grants_published = set(self.consent.snapshot(now))
        self.emit(Outgoing("gateway.consent", self.consent.public(round(now, 3))))

    def publish_digest(self) -> None:
        self._digest_sent_at = time.monotonic()
        self.emit(
            Outgoing(
                "gateway.ledger",
                {
                    "at": round(self.clock(), 3),
                    "entries": self.ledger.count,
                    "head": self.ledger.head,
                },
            )
        )

    def publish_health(self) -> None:
        self.emit(
            Outgoing(
                "gateway.health",
                self.health.snapshot(
                    bad_frames=sum(s.bad_lines for s in self._read_stats()),
                    decode_errors=sum(self.report.decode.errors.values()),
                    unknown_ids=len(self.report.decode.unknown_id),
                    dropped_frames=sum(getattr(c, "dropped", 0) for c in self.cameras),
                    outbox_depth=self.outbox.depth(),
                    reconnects=self.publisher.reconnects,
                    blocked=self.report.blocked,
                    storage=self.outbox.storage,
                ),
            )
        )

    def _read_stats(self) -> list[ReadStats]:
        return [st for s in self.sources for st in getattr(s, "stats", [])]

    # -- inbound: the owner's consent and commands -----------------------------------------
    async def handle_owner_message(
        self, topic: str, payload: bytes, retained: bool = False
    ) -> None:
        kind = "command" if topic == self.topics.command else "consent/set"
        now = self.clock()
        deleted: dict[str, Any] = {}  # the waiting messages a delete removed, on the record
        if not payload:  # what clears a retained message (mosquitto_pub -r -n): no command
            log.info("an empty message on %s (it clears a retained one) is ignored", topic)
            return
        digest = hashlib.sha256(payload).hexdigest()
        if retained and (topic, digest) in self._refused_retained:
            # refused and on the record already: the broker hands it over again at each
            # reconnection (a flaky uplink would otherwise add a ledger line each time)
            log.debug("the retained message on %s, refused before, is ignored", topic)
            return
        try:
            if retained:
                # the broker delivers a retained message again at every connection: a grant
                # the owner withdrew since would be granted again at each restart, a delete
                # or stop done again. A command is taken when it is sent (MQTT 3.1.1 marks a
                # message delivered to a subscriber as it is published as not retained)
                raise ConsentRefused(
                    f"a retained message on {topic} is not a command (the broker would give it "
                    "again at every connection); send commands without retain, and clear this "
                    f"one: mosquitto_pub -r -n -t '{topic}'"
                )
            cmd = parse_owner_message(kind, payload, now)
            if cmd.action == "grant":
                assert cmd.category is not None
                self.consent.grant(cmd.category, cmd.until, now, self.policy.max_consent_days)
            elif cmd.action == "withdraw":
                self.consent.withdraw(cmd.category, now)
            elif cmd.action == "persist":
                self.consent.persist_across_ignition = bool(cmd.persist)
                self.consent.last_change = {
                    "at": now,
                    "action": "persist",
                    "value": bool(cmd.persist),
                    "by": "owner",
                }
            elif cmd.action in ("stop", "resume"):
                if cmd.action == "stop":
                    self.consent.stop(now)
                else:
                    self.consent.resume(now)
                # the retained status says whether the gateway collects, as its docs say
                self.emit(
                    Outgoing(
                        "gateway.status",
                        {
                            "state": "online",
                            "at": round(now, 3),
                            "reason": "collection "
                            + ("stopped" if cmd.action == "stop" else "resumed")
                            + " by the owner",
                            "collection": self.consent.collection.value,
                        },
                    )
                )
            elif cmd.action == "delete":
                from gateway.datarights import delete_category, delete_frames, on_record

                # those of the batch being sent that were already handed to the client may
                # leave: said as such, apart (their egress lines stand)
                doomed = delete_category(self.outbox, cmd.category)
                flying = doomed.in_flight
                n = len(doomed) - len(flying)
                deleted = {"deleted": on_record(doomed)} if doomed else {}
                # and what is held in memory, not yet sent (open windows, trips): it would
                # leave later, after a resume even
                held = self._forget_held(cmd.category)
                frames, stuck = delete_frames(self.settings.gateway.frames_path, cmd.category)
                if stuck:
                    log.error(
                        "%d stored camera frame(s) in %s could not be deleted",
                        stuck,
                        self.settings.gateway.frames_path,
                    )
                if cmd.category is None:  # all: the consent grants too
                    self.consent.withdraw(None, now)
                self.consent.last_change = {
                    "at": now,
                    "action": "delete",
                    "by": "owner",
                    "category": cmd.category.value if cmd.category else "all",
                    "removed": n,
                    **({"in_flight": len(flying)} if flying else {}),
                    "discarded": held,
                    "frames_removed": frames,
                    **({"frames_failed": stuck} if stuck else {}),
                }
        except ConsentRefused as exc:
            self.consent.last_change = {
                "at": now,
                "action": "refused",
                "reason": str(exc),
                "by": "owner",
            }
        # the command this state answers: `gateway consent` waits for its own
        self.consent.last_change = {**self.consent.last_change, "command_sha256": digest}
        self.ledger.append(
            "consent",
            topic=topic,
            sha256=digest,
            result=dict(self.consent.last_change),
            state=self.consent.snapshot(now),
            collection=self.consent.collection.value,
            **deleted,
        )
        if retained:  # on the record: not recorded again at the next reconnection
            self._refused_retained.add((topic, digest))
        self.publish_consent_state()

    # -- CAN path --------------------------------------------------------------------------
    def publish_window(self, w: WindowSummary) -> None:
        self.report.windows += 1
        # a sensitive signal's values leave only under a consent that held, without a break,
        # since the window began collecting (on this clock: consent is wall time), not only
        # now: a grant given midway would let out the values collected before it
        now = self.clock()
        signals, used, withheld = permitted_signals(
            self.policy, w, lambda c: self.consent.ok_since(c, w.opened, now)
        )
        for rule_id in withheld:  # "signal:Message.Signal"
            cat = self.policy.rules[rule_id.partition(":")[2]].category.value
            self.report.withheld[cat] = self.report.withheld.get(cat, 0) + 1
        if not signals:
            return
        self.emit(
            Outgoing(
                "gateway.signals",
                {
                    "window": [round(w.start, 3), round(w.end, 3)],
                    "policy": self.policy.ident,
                    "signals": signals,
                },
                tuple(used),
            )
        )

    def _location_stage(self) -> LocationStage | None:
        rules = self.policy.location_rules()
        if LocationAxis.LATITUDE not in rules or LocationAxis.LONGITUDE not in rules:
            return None
        self._loc_rules = (
            rules[LocationAxis.LATITUDE].rule_id,
            rules[LocationAxis.LONGITUDE].rule_id,
        )
        return LocationStage(
            rules[LocationAxis.LATITUDE].signal,
            rules[LocationAxis.LONGITUDE].signal,
            self.policy.location_grid_m,
            self.settings.gateway.window,
            parse_geofences(self.policy.geofences, self.policy.source),
            LocationLimiter(self.policy.location_min_interval_s, self.policy.location_min_change_m),
        )

    def publish_positions(self, stage: LocationStage, series: Sequence[SignalSeries]) -> None:
        ok = self.consent.ok(Category.LOCATION, self.clock())
        before = stage.withheld
        for start, lat, lon in stage.feed(series, ok):
            self.emit(
                Outgoing(
                    "gateway.location",
                    {
                        "window": [round(start, 3), round(start + self.settings.gateway.window, 3)],
                        "policy": self.policy.ident,
                        "lat": lat,
                        "lon": lon,
                        "grid_m": self.policy.location_grid_m,
                        "consent_until": self.consent.grants.get(Category.LOCATION, 0.0),
                    },
                    self._loc_rules,
                )
            )
        self.report.positions_withheld += stage.withheld - before
        self.report.positions_in_geofence = stage.in_geofence
        self.report.positions_no_fix = stage.no_fix
        if stage.fence_checked:  # (the stage's own counts, not a copy made per batch)
            self.report.positions_by_fence = stage.by_fence
        self.report.positions_limited = stage.limited

    def publish_trip(self, trip: Trip, start_ok: bool = True) -> None:
        """A trip's summary; its start area only if location consent was also valid when the
        trip started (``start_ok``), its end area if it is valid now."""
        self.report.trips += 1
        # to the minute; a trip under half a minute is not 0 s long (its distance and energy
        # are not 0), and its end is its start plus its duration, as published
        start = quantize(trip.start, 60)
        duration = max(60.0, quantize(trip.duration_s, 60)) if trip.duration_s > 0 else 0.0
        body: dict[str, Any] = {
            "window": [round(trip.start, 3), round(trip.end, 3)],
            "policy": self.policy.ident,
            "start": start,
            "end": start + duration,
            "duration_s": duration,
            "distance_km": quantize(trip.distance_km, 0.1),
            "avg_speed_kph": quantize(trip.avg_speed_kph, 1),
        }
        if trip.energy_kwh is not None:  # without a state of charge: no energy, not 0 kWh
            body["energy_kwh"] = quantize(trip.energy_kwh, 0.1)
        body["window"] = [body["start"], body["end"]]
        if self.consent.ok(Category.LOCATION, self.clock()):
            grid = self.policy.location_grid_m
            fences = parse_geofences(self.policy.geofences, self.policy.source)
            areas = (
                ("start_area", trip.start_pos if start_ok else None),
                ("end_area", trip.end_pos),
            )
            for key, pos in areas:
                if pos is not None and not any(f.contains(*pos) for f in fences):
                    lat, lon = coarsen(pos[0], pos[1], grid)
                    body[key] = {"lat": lat, "lon": lon}
        self.emit(Outgoing("gateway.trip", body, ("trips",)))

    async def _can_loop(self, source: Source) -> None:
        # what this loop holds in memory is in ``c``, where the owner's delete reaches it
        # (``_forget_held``, from the MQTT task, between two batches): never in locals
        c = _Held(
            WindowAggregator(self.settings.gateway.window),
            self._location_stage(),
            TripDetector(self.policy.trips) if self.policy.trips.enabled else None,
        )
        self._held.append(c)
        stops_seen = self.consent.stops
        last_t = 0.0
        # a paced or live source: one group per batch. An unpaced one: one group for the
        # batches of UNPACED_GROUP_SECONDS, with no await inside (see Source)
        unpaced = bool(getattr(source, "unpaced", False))
        now = getattr(source, "now", None)  # a live source's clock
        steps_seen = getattr(source, "clock_steps", 0)
        group = contextlib.ExitStack()
        since = time.monotonic()
        try:
            async for batch in source.batches():
                steps = getattr(source, "clock_steps", 0)
                if steps != steps_seen:  # the bus's clock was stepped: what is open is closed
                    steps_seen = steps
                    with self.egress_group():
                        collecting = self.consent.collecting()
                        for w in c.agg.flush():
                            if collecting:
                                self.publish_window(w)
                        if c.trips is not None:
                            c.held += [(t, c.started[1]) for t in c.trips.flush(last_t)]
                            c.trips, c.started = TripDetector(self.policy.trips), (None, False)
                    self.report.late_samples += c.agg.late_samples
                    self.report.invalid_samples += c.agg.invalid_samples
                    c.agg = WindowAggregator(self.settings.gateway.window)
                if len(batch):
                    self.report.frames += len(batch)
                    self.report.raw_bytes += batch.raw_bytes
                    if self.consent.collecting():  # a stop hides the bus's activity too
                        self.health.on_batch(batch)
                    if self.on_batch is not None:
                        self.on_batch(batch)
                if c.trips is not None and self.consent.stops != stops_seen:
                    # the owner stopped collection since the last batch: the running trip ends
                    # at its last moving moment before the stop (its summary must not span
                    # the stop: the odometer's distance over it), and leaves once collection
                    # is on again, as the windows open at the stop do
                    stops_seen = self.consent.stops
                    c.held += [(t, c.started[1]) for t in c.trips.flush(last_t)]
                    c.trips, c.started = TripDetector(self.policy.trips), (None, False)
                if len(batch) and not self.consent.collecting():
                    self.report.frames_while_stopped += len(batch)  # not decoded
                elif len(batch):
                    taken = self.clock()  # when these samples were taken in (see publish_window)
                    if self._group is None:
                        group.enter_context(self.egress_group())
                    for trip, ok in c.held:
                        self.publish_trip(trip, ok)
                    c.held = []
                    decoded = self.decoder.decode(batch)
                    self.report.decode.merge(decoded.stats)
                    last_t = _latest(batch, last_t)
                    if c.loc is not None:
                        self.publish_positions(c.loc, decoded.series)
                    if c.trips is not None:
                        ok = self.consent.ok(Category.LOCATION, taken)
                        started = c.started
                        for trip in c.trips.feed(decoded.series):
                            # a trip that started in an earlier batch: consent as it was then
                            self.publish_trip(trip, ok if trip.start != started[0] else started[1])
                        if c.trips.running_since not in (None, started[0]):
                            c.started = (c.trips.running_since, ok)
                    c.agg.add(decoded.series, taken)
                    # a live bus's window closes LIVE_GRACE_SECONDS after its end: the frames
                    # of another bus, read in another thread, may still be on their way
                    closing = last_t - (0.0 if now is None else LIVE_GRACE_SECONDS)
                    for w in c.agg.advance(closing):
                        self.publish_window(w)
                elif now is not None and self.consent.collecting():
                    t = now()  # a silent live bus: the windows that ended on its clock close
                    if t is not None:
                        closed = c.agg.advance(t - LIVE_GRACE_SECONDS)
                        if closed:
                            with self.egress_group():
                                for w in closed:
                                    self.publish_window(w)
                if not unpaced:
                    group.close()
                elif time.monotonic() - since >= UNPACED_GROUP_SECONDS:
                    group.close()
                    # one turn of the event loop for the other tasks. Enough for an owner's
                    # command to be answered within a second or two (the answer, a retained
                    # state, goes before the summaries queued: Outbox.peek); a longer turn, 2 ms
                    # while summaries wait, let the publisher keep up with a fast --loop
                    # replay, but cost a 1M-frame replay 45 ms (paired, 8 of 10 rounds): its
                    # sending then competed with the parse child for the second core
                    await asyncio.sleep(0)
                    await self._backpressure()
                    since = time.monotonic()
        finally:
            group.close()
            self._held.remove(c)
            if self.consent.collecting():
                with self.egress_group():
                    for w in c.agg.flush():
                        self.publish_window(w)
                    for trip, ok in c.held:
                        self.publish_trip(trip, ok)
                    if c.trips is not None:
                        for trip in c.trips.flush(last_t):
                            self.publish_trip(trip, trip.start != c.started[0] or c.started[1])
            self.report.late_samples += c.agg.late_samples
            self.report.invalid_samples += c.agg.invalid_samples

    def _forget_held(self, category: Category | None) -> dict[str, int]:
        """The owner's delete of ``category`` (all when None), in what the CAN loops hold in
        memory and have not sent: the category's signals in the open windows (every open
        window for all), the trips a stop holds back and the running one (for all and
        driving_behaviour; for location their start and end positions, and the last exact
        position the location stage keeps). What was discarded, for the reply and the record.
        It runs between two batches (the MQTT task's turn), when no egress group is open."""
        found = {"windows": 0, "values": 0, "trips": 0, "trip_areas": 0}
        names: set[str] | None = None
        if category is not None:
            names = {n for n, r in self.policy.rules.items() if r.category is category}
            tc = self.policy.trips
            if category is Category.DRIVING_BEHAVIOUR:  # what trips alone are computed from
                names |= tc.signals - set(self.policy.rules)
            elif category is Category.LOCATION:
                names |= {tc.latitude, tc.longitude} - {""}
        for c in self._held:
            if names is None or names:
                windows, values = c.agg.discard(names)
                found["windows"] += windows
                found["values"] += values
            if category in (None, Category.DRIVING_BEHAVIOUR):
                running = c.trips is not None and c.trips.running_since is not None
                found["trips"] += len(c.held) + running
                c.held = []
                if c.trips is not None:
                    c.trips, c.started = TripDetector(self.policy.trips), (None, False)
            elif category is Category.LOCATION:
                areas = [t for t, _ in c.held if (t.start_pos, t.end_pos) != (None, None)]
                c.held = [
                    (dataclasses.replace(t, start_pos=None, end_pos=None), ok) for t, ok in c.held
                ]
                found["trip_areas"] += len(areas)
                if c.trips is not None:
                    running = c.trips.running_since is not None
                    found["trip_areas"] += c.trips.forget_positions() and running
                    c.started = (c.started[0], False)
            if category in (None, Category.LOCATION) and c.loc is not None:
                c.loc.limiter.forget_position()
        return found

    async def _backpressure(self) -> None:
        """An unpaced replay waits for a connected publisher while more than UNPACED_BACKLOG
        summaries wait (see there), however slow the uplink: a stop cancels the CAN loop, and
        with it this wait."""
        pub = self.publisher
        if not pub.connected.is_set() or self.outbox.depth() <= UNPACED_BACKLOG:
            return
        while pub.connected.is_set() and self.outbox.depth() > UNPACED_BACKLOG // 2:
            pub.acked.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(pub.acked.wait(), timeout=0.05)

    async def _periodic(self, stop: asyncio.Event) -> None:
        g = self.settings.gateway
        next_health = (
            time.monotonic() + g.health_interval if g.health_interval > 0 else float("inf")
        )
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            # a grant expired since the state was last published (not one an owner withdrew:
            # that was published as it happened): the owner sees it on the retained topic
            if set(self.consent.snapshot(self.clock())) < self._grants_published:
                self.publish_consent_state()
            now = time.monotonic()
            if now >= next_health:
                next_health = now + g.health_interval
                self.publish_health()
            if g.digest_interval > 0 and now - self._digest_sent_at >= g.digest_interval:
                self.publish_digest()

    def stop_draining(self) -> None:
        """End the wait for the broker at the end of ``run()`` now (a second Ctrl-C): what is
        not delivered stays in the outbox."""
        self._drain_stop.set()

    # -- the whole run ---------------------------------------------------------------------
    async def run(
        self,
        stop: asyncio.Event | None = None,
        *,
        require_broker: bool = True,
        drain_timeout: float = 30.0,
    ) -> RunReport:
        stop = stop or asyncio.Event()
        pub_stop = asyncio.Event()
        pub_task = asyncio.create_task(
            self.publisher.run(pub_stop, first_must_connect=require_broker), name="mqtt"
        )
        if require_broker:
            try:
                await self._until_listening(stop, pub_task)
            except BaseException as exc:  # the run never started: its start entry gets a stop
                if not pub_task.done():
                    pub_task.cancel()
                    await asyncio.wait({pub_task})  # (its CancelledError stays in it)
                with contextlib.suppress(GatewayError):
                    self._record_stop(self.outbox.depth(), reason=str(exc) or type(exc).__name__)
                self.ledger.close()
                self.outbox.close()
                raise
        periodic_stop = asyncio.Event()
        periodic = asyncio.create_task(self._periodic(periodic_stop), name="periodic")
        self.publish_consent_state()
        failed = False
        said: set[str] = set()  # errors said (or raised) already: not said again
        try:
            await self._run_sources(stop)
            periodic_stop.set()
            await periodic
            if self.settings.gateway.health_interval > 0:
                self.publish_health()
            self.publish_digest()
            # flush: wait (bounded) for the outbox to drain while the publisher reconnects; a
            # stop asked for meanwhile (a first one after the sources ended, or stop_draining)
            # ends the wait: what is left stays in the outbox for the next run
            deadline = time.monotonic() + drain_timeout
            stopped_before = stop.is_set()
            while (
                self.outbox.depth()
                and time.monotonic() < deadline
                and not pub_task.done()
                and not self._drain_stop.is_set()
                and (stopped_before or not stop.is_set())
            ):
                self.publisher.acked.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.publisher.acked.wait(), timeout=0.05)
            if self.outbox.depth() and self.publisher.connected.is_set():
                # what ended the wait, if not the broker (said with what is left)
                if self._drain_stop.is_set():
                    self.report.drain_cut = "a second stop signal cut the wait to send them short"
                elif time.monotonic() >= deadline:
                    self.report.drain_cut = (
                        f"not all sent within the drain timeout of {drain_timeout:g} s"
                    )
                elif stop.is_set() and not stopped_before:
                    self.report.drain_cut = "a stop signal came while they were being sent"
        except BaseException as exc:
            failed = True
            said.add(str(exc))
            raise
        finally:
            periodic_stop.set()
            pub_stop.set()
            first: GatewayError | None = None

            @contextlib.contextmanager
            def step() -> Iterator[None]:
                # a full disk fails these steps too: the first error is the one raised
                nonlocal first
                try:
                    yield
                except GatewayError as exc:
                    if str(exc) in said:
                        pass  # (a deleted ledger fails each step the same way: said once)
                    elif failed or first is not None:
                        said.add(str(exc))
                        log.error("while stopping: %s", exc)
                    else:
                        first = exc
                        said.add(str(exc))

            if self.outbox.depth():
                # the wait to drain is over (its timeout, a second stop, an error) with
                # summaries left: the publisher stops now, not after a PUBACK or a connection
                # it may wait 10 s for; what was not acknowledged stays in the outbox
                pub_task.cancel()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError), step():
                await asyncio.wait_for(pub_task, timeout=10)
            self.report.sent = self.publisher.sent
            self.report.dropped = self.outbox.dropped
            self.report.outbox_sent_kept = self.outbox.sent_kept
            self.report.outbox_left = self.outbox.depth()
            if self.report.outbox_left and self.outbox.file_gone():
                # deleted (or replaced) while the gateway ran: no next run will send them
                gone = [p for p in self.outbox.waiting_items() if p.key[0] == "db"]
                self.report.outbox_left -= len(gone)
                self.report.outbox_deleted = len(gone)
                log.error(
                    "%s was deleted or replaced while the gateway ran: the %d summary(ies) "
                    "waiting in it are lost (recorded as dropped)",
                    self.outbox.path, len(gone),
                )  # fmt: skip
                with step():
                    self._record_drop(gone, "in an outbox file deleted while the gateway ran")
            lost = self.outbox.memory_only()
            if lost:  # ends with this process: on the record, not said to wait
                self.report.outbox_left -= len(lost)
                self.report.lost_in_memory = len(lost)
                with step():
                    self._record_drop(
                        lost,
                        "held in memory only (the outbox file could not be written) when the "
                        "gateway stopped",
                    )
            self.report.broker_error = self.publisher.last_error
            self.report.read = self._read_stats()
            self.report.channels = dict(self.health.per_channel)
            with step():
                self.consent.save(self.consent_path)
            with step():
                # (outbox_left: not delivered; the file holds those sent_kept too: not empty)
                kept = self.report.outbox_sent_kept
                self._record_stop(
                    self.report.outbox_left,
                    lost_in_memory=self.report.lost_in_memory,
                    **({"outbox_sent_kept": kept} if kept else {}),
                )
            self.ledger.close()
            self.outbox.close()
            if first is not None:
                raise first
        return self.report

    async def _until_listening(self, stop: asyncio.Event, pub_task: asyncio.Task[None]) -> None:
        """Waits until the broker took the publisher's subscriptions to the owner's commands,
        before any frame is read: a fast replay holds the event loop 0.1 s at a time, and the
        connection used to be made beside it, in 3-4 s, so that a command sent meanwhile (the
        owner's stop) was lost, a subscription not being retroactive. The publisher's first
        connection also checks the broker (``BrokerError`` if it fails: nothing read, nothing
        sent). A stop (Ctrl-C) before the broker answered ends the wait at once: then
        KeyboardInterrupt, nothing read; after, the run starts and stops as usual."""
        pub = self.publisher
        halt = asyncio.ensure_future(stop.wait())
        answered = asyncio.ensure_future(pub.answered.wait())
        listening = asyncio.ensure_future(pub.listening.wait())
        try:
            await asyncio.wait({halt, answered, pub_task}, return_when=asyncio.FIRST_COMPLETED)
            if pub_task.done():
                pub_task.result()  # the first connection failed: its BrokerError
            if not pub.answered.is_set():
                raise KeyboardInterrupt  # a stop signal while the broker was awaited
            # the broker answered; one that loses the connection before it acknowledges the
            # subscriptions (or never does) holds the run LISTEN_WAIT_SECONDS at most
            await asyncio.wait(
                {halt, listening, pub_task},
                timeout=LISTEN_WAIT_SECONDS,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if pub_task.done():
                pub_task.result()  # the publisher failed after the CONNACK (its ledger): raised
            if not pub.listening.is_set() and not stop.is_set():
                log.warning(
                    "the broker did not take the subscriptions to the owner's commands within "
                    "%g s: the run starts, and a command sent before they are taken is lost",
                    LISTEN_WAIT_SECONDS,
                )
        finally:
            for w in (halt, answered, listening):
                w.cancel()

    async def _run_sources(self, stop: asyncio.Event) -> None:
        work = [asyncio.create_task(self._can_loop(s), name="can") for s in self.sources]
        work += [
            asyncio.create_task(self._camera_loop(c, stop), name="camera") for c in self.cameras
        ]
        stopper = asyncio.create_task(stop.wait())
        pending = set(work)
        try:
            while pending:
                done, _ = await asyncio.wait(
                    pending | {stopper}, return_when=asyncio.FIRST_COMPLETED
                )
                pending -= done
                for t in done & set(work):
                    if t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                if stopper in done:
                    break
        finally:
            stopper.cancel()
            for p in pending:
                p.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _camera_loop(self, camera: Any, stop: asyncio.Event) -> None:
        async def emit(summary: Any) -> None:
            self.report.camera.append(summary)
            self.emit(
                Outgoing(
                    "gateway.camera",
                    {
                        "window": [round(summary.start, 3), round(summary.end, 3)],
                        "policy": self.policy.ident,
                        "camera": summary.camera,
                        "frames_seen": summary.frames_seen,
                        "frames_anonymised": summary.frames_anonymised,
                        "frames_dropped": summary.frames_dropped,
                        "faces_blurred": summary.faces_blurred,
                        "plates_blurred": summary.plates_blurred,
                        "fps": quantize(summary.fps, 0.1),
                        "health": summary.health,
                    },
                    ("camera",),
                )
            )

        # the owner's one-touch stop halts the camera's collection too: no frame is detected,
        # stored or counted while it holds
        camera.collecting = self.consent.collecting
        await camera.run(emit, stop)
