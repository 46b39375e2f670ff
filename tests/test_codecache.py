"""The cache of compiled dataclass methods: the same methods as without it, from the file on
a later run, and no trust in a file that is damaged, of another build or not private."""

from __future__ import annotations

import dataclasses
import marshal
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from gateway import codecache
from tests.conftest import ROOT

# dataclasses of every kind the gateway defines: frozen, slotted, defaults and factories,
# keyword-only fields, ordering, a ClassVar, forward references (this module's own future)
_CLASSES = textwrap.dedent(
    """
    from __future__ import annotations
    import dataclasses
    from typing import ClassVar

    @dataclasses.dataclass(frozen=True, slots=True)
    class Frozen:
        '''A record.'''
        a: int
        b: float = 1.5
        c: tuple[str, ...] = ()

    @dataclasses.dataclass
    class Mutable:
        '''A stage.'''
        name: str
        items: list[int] = dataclasses.field(default_factory=list)
        _hidden: dict[str, int] = dataclasses.field(default_factory=dict, repr=False)
        LIMIT: ClassVar[int] = 3

    @dataclasses.dataclass(order=True, kw_only=True)
    class Ordered:
        '''Options.'''
        x: int
        y: int = 0
    """
)


def _define(name: str) -> types.ModuleType:
    mod = types.ModuleType(f"codecache_test_{name}")
    sys.modules[mod.__name__] = mod  # dataclasses reads string annotations in its module
    try:
        exec(compile(_CLASSES, f"<{name}>", "exec"), mod.__dict__)
    finally:
        del sys.modules[mod.__name__]
    return mod


def _methods(mod: types.ModuleType) -> dict[str, tuple[bytes, object, object, object]]:
    """Every generated method: its code, byte for byte, with its annotations and defaults."""
    out = {}
    for cls in (mod.Frozen, mod.Mutable, mod.Ordered):
        for attr, fn in vars(cls).items():
            if isinstance(fn, types.FunctionType):
                out[f"{cls.__name__}.{attr}"] = (
                    marshal.dumps(fn.__code__),
                    fn.__annotations__,
                    fn.__defaults__,
                    fn.__kwdefaults__,
                )
    return out


def _hooked(monkeypatch: pytest.MonkeyPatch, cache: codecache.DataclassCodeCache) -> None:
    monkeypatch.setattr(dataclasses, "exec", cache.exec, raising=False)


def test_methods_made_through_the_cache_are_those_dataclasses_makes(monkeypatch, tmp_path):
    plain = _methods(_define("plain"))
    path = tmp_path / "code" / "dc.marshal"
    first = codecache.DataclassCodeCache(path)
    _hooked(monkeypatch, first)
    compiled = _methods(_define("compiled"))
    assert first.compiled >= 9 and first.save()
    # a later run: every text is in the file, nothing is compiled
    later = codecache.DataclassCodeCache(path)
    _hooked(monkeypatch, later)
    from_file = _methods(_define("from_file"))
    assert later.compiled == 0 and later.used
    assert plain.keys() == compiled.keys() == from_file.keys() and len(plain) >= 9
    for name in plain:
        assert compiled[name] == plain[name], name
        assert from_file[name] == plain[name], name
    # and they work as dataclasses' own
    m = _define("again")
    f = m.Frozen(1)
    assert (f, repr(f), f == m.Frozen(1), hash(f) == hash(m.Frozen(1))) == (
        m.Frozen(1, 1.5, ()),
        "Frozen(a=1, b=1.5, c=())",
        True,
        True,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.a = 2  # type: ignore[misc]
    assert m.Mutable("n").items == [] and m.Ordered(x=1) < m.Ordered(x=2)


def test_the_gateway_started_again_compiles_none_of_its_dataclass_methods(tmp_path):
    # as the console script starts: the hook first, then the replay's modules
    script = (
        "from gateway import codecache; c = codecache.install(); "
        "import gateway.cli, gateway.app, gateway.canbus.replay; "
        "from gateway.settings import Settings; Settings(); print(c.compiled, len(c.used))"
    )
    env = dict(os.environ, GATEWAY_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))

    def run() -> tuple[int, int]:
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        compiled, used = out.stdout.split()
        return int(compiled), int(used)

    compiled, used = run()
    assert compiled == used > 100  # every text new on the first run...
    written = tmp_path / "code"
    (entry,) = written.iterdir()
    assert oct(entry.stat().st_mode & 0o777) == "0o600"
    stamp = entry.stat().st_mtime_ns, entry.stat().st_ino
    assert run() == (0, used)  # ...none on the next, and the file is left as it is
    assert (entry.stat().st_mtime_ns, entry.stat().st_ino) == stamp


_TEXT = "def __create_fn__():\n def f(): pass\n return f"
_ENTRY = {_TEXT: compile(_TEXT, "<string>", "exec", dont_inherit=True)}


@pytest.mark.parametrize(
    "content",
    [
        b"not marshal data",
        marshal.dumps(("3.11.0 (another build)", _ENTRY)),
        marshal.dumps(_ENTRY),
        marshal.dumps((sys.version, _ENTRY))[:-9],
        b"",
    ],
    ids=["damaged", "another-build", "another-format", "cut-short", "empty"],
)
def test_a_file_that_cannot_be_trusted_to_be_ours_is_ignored_and_written_again(
    monkeypatch, tmp_path, content
):
    path = tmp_path / "code" / "dc.marshal"
    path.parent.mkdir(mode=0o700)
    path.write_bytes(content)
    path.chmod(0o600)
    cache = codecache.DataclassCodeCache(path)
    assert cache.codes == {}
    _hooked(monkeypatch, cache)
    _define("m")
    compiled = cache.compiled
    assert compiled > 0 and cache.save()
    assert len(codecache.DataclassCodeCache(path).codes) == compiled


def test_a_file_others_can_write_is_not_run(monkeypatch, tmp_path):
    path = tmp_path / "code" / "dc.marshal"
    good = codecache.DataclassCodeCache(path)
    _hooked(monkeypatch, good)
    _define("m")
    assert good.save() and codecache.DataclassCodeCache(path).codes
    path.chmod(0o666)  # anybody could have put code there
    assert codecache.DataclassCodeCache(path).codes == {}
    path.chmod(0o600)
    path.parent.chmod(0o777)
    assert codecache.DataclassCodeCache(path).codes == {}
    path.parent.chmod(0o700)
    # a code object under a text it was not compiled from would run in its place: only what
    # the user's own gateway wrote is read (see above), and only code objects are taken
    text = next(iter(good.codes))
    path.write_bytes(marshal.dumps((sys.version, {text: "not code", 3: good.codes[text]})))
    path.chmod(0o600)
    assert codecache.DataclassCodeCache(path).codes == {}


def test_a_forked_child_or_a_process_that_compiled_nothing_does_not_write(monkeypatch, tmp_path):
    path = tmp_path / "code" / "dc.marshal"
    cache = codecache.DataclassCodeCache(path)
    assert not cache.save()  # nothing compiled
    _hooked(monkeypatch, cache)
    _define("m")
    monkeypatch.setattr(os, "getpid", lambda: cache.pid + 1)
    assert not cache.save() and not path.exists()


def test_off_leaves_dataclasses_as_they_are(monkeypatch):
    monkeypatch.setenv("GATEWAY_CACHE_DIR", "off")
    monkeypatch.delattr(dataclasses, "exec", raising=False)
    assert codecache.install() is None
    assert "exec" not in vars(dataclasses)


def test_installed_once_and_old_texts_dropped_past_the_limit(monkeypatch, tmp_path):
    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path))
    monkeypatch.delattr(dataclasses, "exec", raising=False)
    registered: list[object] = []
    monkeypatch.setattr(codecache.atexit, "register", registered.append)
    cache = codecache.install()
    assert cache is not None and codecache.install() is cache and registered == [cache.save]
    assert cache.path == tmp_path / "code" / Path(cache.path).name
    # texts of classes no longer defined are kept up to MAX_ENTRIES, then only those used
    cache.codes = {f"def f{i}(): pass": compile("pass", "<string>", "exec") for i in range(5)}
    monkeypatch.setattr(codecache, "MAX_ENTRIES", 4)
    _define("m")
    assert cache.save()
    kept = codecache.DataclassCodeCache(cache.path).codes
    assert set(kept) == cache.used and not any(t.startswith("def f") for t in kept)
