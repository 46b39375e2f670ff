"""The cache of compiled dataclass methods: the same methods as without it, from the file on
a later run, and no trust in a file that is damaged, of another build or not private."""

from __future__ import annotations

import dataclasses
import hashlib
import marshal
import os
import random
import subprocess
import sys
import textwrap
import types

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
    assert later.compiled == 0 and later.ran and not later.codes  # each run once, then let go
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
        "from gateway.settings import Settings; Settings(); print(c.compiled, len(c.ran))"
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
    assert compiled == used > 100  # every text new on the first run (some met twice)...
    written = tmp_path / "code"
    (entry,) = written.iterdir()
    assert oct(entry.stat().st_mode & 0o777) == "0o600"
    stamp = entry.stat().st_mtime_ns, entry.stat().st_ino
    assert run() == (0, used)  # ...none on the next, and the file is left as it is
    assert (entry.stat().st_mtime_ns, entry.stat().st_ino) == stamp


_TEXT = "def __create_fn__():\n def f(): pass\n return f"
_ENTRY = {codecache._key(_TEXT): marshal.dumps(compile(_TEXT, "<string>", "exec"))}


def _signed(data: bytes) -> bytes:
    return hashlib.sha256(data).digest() + data


@pytest.mark.parametrize(
    "content",
    [
        b"not marshal data, and no digest of it",
        _signed(b"not marshal data"),
        _signed(marshal.dumps(("3.11.0 (another build)", _ENTRY))),
        _signed(marshal.dumps(_ENTRY)),
        _signed(marshal.dumps((codecache._build(), _ENTRY))[:-9]),
        b"",
    ],
    ids=["damaged", "not-marshal", "another-build", "another-format", "cut-short", "empty"],
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


def test_a_file_others_can_write_or_reached_through_a_link_is_not_run(monkeypatch, tmp_path):
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
    # the folder (or the file) swapped for a link to one that would pass: not followed
    linked = tmp_path / "elsewhere"
    linked.symlink_to(path.parent, target_is_directory=True)
    assert codecache.DataclassCodeCache(linked / path.name).codes == {}
    (path.parent / "link.marshal").symlink_to(path)
    assert codecache.DataclassCodeCache(path.parent / "link.marshal").codes == {}
    assert codecache.DataclassCodeCache(path).codes  # the real one still reads
    # entries are code under a text's SHA-256: anything else is not taken, or not run
    key, blob = next(iter(codecache._read(path).items()))
    for entries in ({key: "not bytes"}, {key[:8]: blob}, {"a text": blob}):
        data = marshal.dumps((codecache._build(), entries))
        path.write_bytes(hashlib.sha256(data).digest() + data)
        assert codecache.DataclassCodeCache(path).codes == {}
    data = marshal.dumps((codecache._build(), {key: marshal.dumps("not code")}))
    path.write_bytes(hashlib.sha256(data).digest() + data)
    assert codecache._loads(codecache.DataclassCodeCache(path).codes[key]) is None


def test_one_flipped_bit_anywhere_and_the_file_is_not_read(monkeypatch, tmp_path):
    # marshal reads damaged data as other code, or crashes on it: the digest is checked first
    path = tmp_path / "code" / "dc.marshal"
    cache = codecache.DataclassCodeCache(path)
    _hooked(monkeypatch, cache)
    _define("m")
    assert cache.save()
    whole = path.read_bytes()
    rng = random.Random(7)
    for at in [0, 31, 32, len(whole) - 1, *rng.sample(range(len(whole)), 40)]:
        damaged = bytearray(whole)
        damaged[at] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        assert codecache.DataclassCodeCache(path).codes == {}, at
    path.write_bytes(whole[:-1])  # torn
    assert codecache.DataclassCodeCache(path).codes == {}
    path.write_bytes(whole)
    assert codecache.DataclassCodeCache(path).codes


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
    path = codecache.cache_file()
    assert path is not None and path.parent == tmp_path / "code"
    # texts of classes no longer defined, left in the file by an older version
    old = codecache.DataclassCodeCache(path)
    gone = {codecache._key(f"def f{i}(): pass") for i in range(5)}
    old.new = {k: compile("pass", "<string>", "exec") for k in gone}
    assert old.save() and len(codecache._read(path)) == 5
    cache = codecache.install()
    assert cache is not None and codecache.install() is cache and registered == [cache.save]
    _define("m")
    # kept beside the new ones up to MAX_ENTRIES...
    assert cache.save() and len(codecache._read(path)) == 5 + len(cache.ran)
    # ...then only the texts this process ran
    monkeypatch.setattr(codecache, "MAX_ENTRIES", 4)
    cache.new = {codecache._key("def g(): pass"): compile("pass", "<string>", "exec")}
    cache.ran[codecache._key("def g(): pass")] = None
    assert cache.save()
    kept = codecache._read(path)
    assert set(kept) == set(cache.ran) and not gone & set(kept)


def test_the_console_script_keeps_the_code_and_reads_it_on_the_next_start(tmp_path):
    env = dict(os.environ, GATEWAY_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))

    def start() -> None:
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "--help"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0 and "replay" in out.stdout, out.stderr

    start()
    (entry,) = (tmp_path / "code").iterdir()
    assert oct(entry.stat().st_mode & 0o777) == "0o600" and len(codecache._read(entry)) > 10
    stamp = entry.stat().st_mtime_ns, entry.stat().st_ino
    start()  # nothing new to compile: the file is left as it is
    assert (entry.stat().st_mtime_ns, entry.stat().st_ino) == stamp


def test_python_run_with_optimisation_keeps_a_file_of_its_own(tmp_path):
    # compile() follows -O (asserts and docstrings): code made under one level is not the
    # other's, even where the texts are the same
    env = dict(os.environ, GATEWAY_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    script = "from gateway import codecache; print(codecache.cache_file().name)"
    names = {
        subprocess.run(
            [sys.executable, *flag, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        for flag in ([], ["-O"], ["-OO"])
    }
    assert len(names) == 3


def test_a_cache_that_cannot_be_written_costs_time_only(monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("in the way of the folder")
    cache = codecache.DataclassCodeCache(tmp_path / "a-file" / "code" / "dc.marshal")
    _hooked(monkeypatch, cache)
    m = _define("m")
    assert cache.compiled > 0 and not cache.save()  # said at debug level, nothing raised
    assert m.Frozen(1) == m.Frozen(1)
