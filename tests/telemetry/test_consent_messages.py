"""The owner's consent messages: only an explicit true grants; anything else is refused. And
what a grant covers: only what was collected while it held without a break."""

from __future__ import annotations

import pytest

from gateway.telemetry.consent import ConsentRefused, ConsentState, parse_owner_message
from gateway.telemetry.policy import Category

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        # a string "false" was read as a yes: consent given by a message that said no
        (b'{"category": "location", "grant": "false", "days": 1}', "grant must be true or false"),
        (b'{"category": "location", "grant": "false"}', "grant must be true or false"),
        (b'{"category": "location", "grant": 1, "days": 1}', "grant must be true or false"),
        (b'{"persist_across_ignition": "no"}', "persist_across_ignition must be true or false"),
        (b'{"category": "location", "grant": true, "days": true}', "days must be a positive"),
        (b'{"category": "location", "grant": true, "days": -1}', "days must be a positive"),
        (b'{"category": "location", "grant": true, "days": 1e308}', "beyond any policy"),
        (b'{"category": "location", "grant": true, "days": 1' + b"0" * 400 + b"}", "beyond any"),
        (b'{"category": "location", "grant": true, "until": 1' + b"0" * 400 + b"}", "beyond any"),
        (b'{"category": "location", "grant": true, "until": true}', "until must be a Unix time"),
        (b"{}", "grant must be true or false"),  # was: withdraw everything
        (b'{"category": "location", "grant": true, "dayz": 7}', "unknown key 'dayz'"),
        (b'{"category": "telepathy", "grant": false}', "unknown category"),
    ],
)
def test_what_is_not_an_explicit_consent_is_refused_with_a_reason(body, reason):
    with pytest.raises(ConsentRefused, match=reason):
        parse_owner_message("consent/set", body, NOW)


def test_the_documented_messages_still_mean_what_they_say():
    grant = parse_owner_message(
        "consent/set", b'{"category": "location", "grant": true, "days": 7}', NOW
    )
    assert (grant.action, grant.category, grant.until) == (
        "grant",
        Category.LOCATION,
        NOW + 7 * 86400,
    )
    assert parse_owner_message("consent/set", b'{"grant": false}', NOW).action == "withdraw"
    off = parse_owner_message("consent/set", b'{"category": "all", "grant": false}', NOW)
    assert (off.action, off.category) == ("withdraw", None)
    keep = parse_owner_message("consent/set", b'{"persist_across_ignition": false}', NOW)
    assert (keep.action, keep.persist) == ("persist", False)
    stop = parse_owner_message("command", b'{"command": "delete", "category": "location"}', NOW)
    assert (stop.action, stop.category) == ("delete", Category.LOCATION)


def test_a_consent_state_that_cannot_be_saved_leaves_no_partial_file_behind(tmp_path, monkeypatch):
    import os

    from gateway.errors import StorageError
    from gateway.telemetry.consent import ConsentState

    path = tmp_path / "consent-V.json"

    def full(fd):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match="cannot save the consent state: No space left"):
        ConsentState().save(path)
    assert list(tmp_path.iterdir()) == []  # (a 0-byte consent-V.tmp was left)


def test_a_message_nested_past_the_stack_is_refused_with_a_reason():
    """'[' * 100000 raised RecursionError in the JSON parser, past every handler: the command
    was neither answered nor put on the record."""
    for payload in (b"[" * 100_000, b"\x91" * 100_000):
        with pytest.raises(ConsentRefused, match="neither JSON nor msgpack"):
            parse_owner_message("command", payload, 0.0)


def test_a_refusal_quotes_an_owner_value_cut_short():
    """A 60 kB unknown key came back whole on the retained consent topic and in the ledger."""
    with pytest.raises(ConsentRefused) as caught:
        parse_owner_message("consent/set", ('{"' + "k" * 60_000 + '": 1}').encode(), 0.0)
    said = str(caught.value)
    assert said.startswith("unknown key 'kkk") and "..." in said and len(said) < 200
    with pytest.raises(ConsentRefused) as caught:
        parse_owner_message(
            "command", b'{"command": "delete", "category": "' + b"x" * 5000 + b'"}', 0.0
        )
    assert len(str(caught.value)) < 100


def _granted(state, *steps):
    """``state`` after each (action, at) of ``steps``: a cabin grant of a day, a withdrawal,
    or the clock alone passing."""
    for action, at in steps:
        if action == "grant":
            state.grant(Category.CABIN, at + 86400, at, 30)
        elif action == "withdraw":
            state.withdraw(Category.CABIN, at)
    return state


@pytest.mark.parametrize(
    ("steps", "covered"),
    [
        ([("grant", NOW - 10)], True),
        ([("grant", NOW + 10)], False),  # given after the window began
        ([("grant", NOW - 10), ("withdraw", NOW + 5), ("grant", NOW + 10)], False),
        ([("grant", NOW - 10), ("grant", NOW + 10)], True),  # renewed while valid: no break
        ([("grant", NOW - 86400 - 10), ("grant", NOW + 10)], False),  # expired, then given again
        ([("grant", NOW - 10), ("withdraw", NOW + 5)], False),
    ],
    ids=["before", "after", "withdrawn-and-again", "renewed", "expired-and-again", "withdrawn"],
)
def test_a_grant_covers_a_window_only_if_it_held_without_a_break_since_the_window_began(
    steps, covered
):
    state = _granted(ConsentState(), *steps)
    assert state.ok_since(Category.CABIN, NOW, NOW + 60) is covered
    assert state.ok_since(Category.VEHICLE_STATUS, NOW, NOW + 60)  # needs no consent


def test_a_grant_loaded_from_the_file_covers_what_this_process_collects(tmp_path):
    path = tmp_path / "consent.json"
    _granted(ConsentState(), ("grant", NOW)).save(path)
    # (given before this process started, and valid: before anything it collected)
    assert ConsentState.load(path).ok_since(Category.CABIN, NOW - 1000, NOW + 60)
