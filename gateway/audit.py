"""``gateway audit verify``: the hash chain, then every entry against the policy it names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gateway.egress.ledger import GENESIS, read_entries, verify_chain
from gateway.egress.schema import SCHEMAS
from gateway.errors import AuditError, ConfigError
from gateway.telemetry.policy import Category, Policy, load_policy


@dataclass
class VerifyResult:
    """A verified ledger: entries, chain head, entries per kind, and how many egress entries
    were re-checked against their policies."""

    path: str
    entries: int
    head: str
    kinds: dict[str, int]
    rechecked: int = 0
    policies: list[str] = field(default_factory=list)
    unchecked: int = 0
    notes: list[str] = field(default_factory=list)  # runs without a stop entry
    missing: list[str] = field(default_factory=list)  # policies named by runs, not at hand
    given: str | None = None  # the policy file given (``--policy``), by name
    digests: int = 0  # the owner's digests the ledger matched
    unused: list[str] = field(default_factory=list)  # files given that no run used

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items()))
        text = (
            f"ledger OK: {self.path}: {self.entries} entries ({kinds}); head {self.head[:16]}; "
            f"{self.rechecked} egress entries re-checked against {', '.join(self.policies) or 'no policy'}"
        )
        if self.digests:
            text += f"; holds the {self.digests} digest(s) the owner was sent"
        if self.unchecked:
            theirs = ", ".join(self.missing) or "theirs"
            text += f"; {self.unchecked} not re-checked: their policy ({theirs}) " + (
                f"is not among the files given ({self.given})"
                if self.given
                else "was not given (--policy FILE)"
            )
        return "\n".join([text, *(f"note: {n}" for n in self.notes)])


def _candidates(policy_paths: Sequence[str]) -> list[Policy]:
    """The files given, then the bundled policy."""
    out = []
    for path in policy_paths:
        try:
            out.append(load_policy(path))
        except ConfigError as exc:
            raise AuditError(str(exc)) from exc
    return [*out, load_policy(None)]


# summaries released under a policy switch rather than a per-signal rule
_STREAM_RULES = {
    "camera": lambda p: p.camera_summaries,
    "trips": lambda p: p.trips.enabled,
}


def verify_ledger(
    path: str | Path,
    policy_path: str | Sequence[str] | None = None,
    digests: Sequence[tuple[int, str]] = (),
) -> VerifyResult:
    """``digests``: (entries, head) pairs the owner received (``gateway.ledger`` messages).
    A chain cut short at its end is still a valid chain; only such a digest, kept outside the
    vehicle, shows that lines were removed from the end."""
    chain = verify_chain(path)
    result = VerifyResult(str(path), chain.entries, chain.head, chain.kinds)
    for entries, head in digests:
        if entries > chain.entries:
            raise AuditError(
                f"{path}: the owner was sent a digest of {entries} entries (head {head[:16]}), "
                f"but the ledger has {chain.entries}: its last {entries - chain.entries} "
                "line(s) were removed"
            )
        if entries == 0 and not GENESIS.startswith(head):
            raise AuditError(f"{path}: a digest of 0 entries whose head is not the genesis hash")
    wanted: dict[int, list[str]] = {}  # entry number -> the heads the owner was sent for it
    for entries, head in digests:
        if entries:
            wanted.setdefault(entries - 1, []).append(head)
        else:
            result.digests += 1  # of 0 entries: held by any ledger
    paths = [policy_path] if isinstance(policy_path, str) else list(policy_path or ())
    candidates = _candidates(paths)
    given = candidates[: len(paths)]
    policies = {p.digest: p for p in reversed(candidates)}  # a file given before the bundled
    if given:
        result.given = ", ".join(f"{p.ident} sha256 {p.digest[:12]}" for p in given)
    current: Policy | None = None
    used: set[str] = set()  # the policies' SHA-256 the runs name
    open_run: int | None = None  # line of the start entry of a run not stopped yet
    for n, entry, _raw in read_entries(path):
        assert entry is not None  # verify_chain passed
        for head in wanted.get(entry["i"], ()):
            if not str(entry["hash"]).startswith(head):
                raise AuditError(
                    f"{path}:{n}: entry {entry['i']} is not the one the owner was sent a digest "
                    f"of (head {head[:16]}): the ledger was rewritten from this line on, or "
                    "before it"
                )
            result.digests += 1
        kind = entry.get("kind")
        if kind == "stop":
            open_run = None
        if kind == "start":
            if open_run is not None:
                result.notes.append(
                    f"the run started at line {open_run} has no stop entry: it was killed or "
                    "lost power"
                )
            open_run = n
            used.add(str(entry.get("policy_sha256")))
            current = policies.get(str(entry.get("policy_sha256")))
            if current is not None and current.ident not in result.policies:
                result.policies.append(current.ident)
            named = f"{entry.get('policy')} sha256 {str(entry.get('policy_sha256'))[:12]}"
            if current is None and named not in result.missing:
                result.missing.append(named)
            continue
        if kind != "egress":
            continue
        schema = SCHEMAS.get(str(entry.get("schema")))
        if schema is None:
            raise AuditError(f"{path}:{n}: egress of undeclared schema {entry.get('schema')!r}")
        if current is None:
            result.unchecked += 1
            continue
        rules = {r.rule_id: r for r in current.rules.values()}
        at = float(entry.get("at", 0))
        consent = entry.get("consent") or {}
        for rule_id in entry.get("rules", []):
            rule = rules.get(rule_id)
            if rule is None and rule_id in _STREAM_RULES:
                if not _STREAM_RULES[rule_id](current):
                    raise AuditError(
                        f"{path}:{n}: {rule_id} summaries left, but policy {current.ident} "
                        f"does not permit them"
                    )
                continue
            if rule is None:
                raise AuditError(
                    f"{path}:{n}: egress under rule {rule_id!r}, which policy "
                    f"{current.ident} does not have"
                )
            if rule.category.sensitive:
                until = consent.get(rule.category.value)
                if until is None or float(until) <= at:
                    raise AuditError(
                        f"{path}:{n}: {rule.category.value} data left without valid consent"
                    )
        if (
            schema.name == "gateway.location"
            and not float(consent.get(Category.LOCATION.value, 0)) > at
        ):
            raise AuditError(f"{path}:{n}: a position left without valid location consent")
        result.rechecked += 1
    if open_run is not None:
        result.notes.append(
            f"the last run (started at line {open_run}) has no stop entry: the gateway is still "
            "running, was killed, or the end of the ledger was cut off"
        )
    for p in given:
        if p.digest not in used:
            result.unused.append(f"{p.ident} sha256 {p.digest[:12]}")
            result.notes.append(
                f"the file given ({p.ident} sha256 {p.digest[:12]}) is the policy of no run in "
                "this ledger: nothing was re-checked against it"
            )
    return result
