"""The on-device frame store: only anonymised frames, bounded, with a retention period."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.camera.anonymize import AnonymisedFrame, anonymize
from gateway.camera.store import FrameStore, StoreSettings


def _frame(i: int, t: float) -> AnonymisedFrame:
    return anonymize(np.full((36, 64, 3), i % 255, np.uint8), [], index=i, t=t)


def test_a_raw_image_is_refused(tmp_path):
    store = FrameStore(tmp_path, "front", StoreSettings())
    with pytest.raises(TypeError, match="only accepts anonymised frames"):
        store.put(np.zeros((36, 64, 3), np.uint8), now=0.0)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_the_ring_buffer_keeps_the_newest_max_frames(tmp_path):
    store = FrameStore(tmp_path, "front", StoreSettings(max_frames=3, every_s=0.0))
    for i in range(7):
        store.put(_frame(i, i * 0.1), now=1000.0 + i)
    names = [p.name for p in store.frames()]
    assert len(names) == 3
    assert names[0].startswith("front-000000004-")
    assert not list(tmp_path.glob("*.part"))
    # a new store in the same folder continues the sequence
    again = FrameStore(tmp_path, "front", StoreSettings(max_frames=3, every_s=0.0))
    again.put(_frame(8, 0.0), now=2000.0)
    assert again.frames()[-1].name.startswith("front-000000007-")


def test_frames_older_than_the_retention_period_are_removed(tmp_path):
    store = FrameStore(tmp_path, "front", StoreSettings(retention_s=60, every_s=0.0))
    store.put(_frame(0, 0.0), now=1000.0)
    store.put(_frame(1, 1.0), now=1030.0)
    assert len(store.frames()) == 2
    store.put(_frame(2, 2.0), now=1070.0)
    assert len(store.frames()) == 2  # the first is 70 s old
    assert store.prune(now=5000.0) == 2


def test_at_most_one_frame_per_every_s_of_video_time(tmp_path):
    store = FrameStore(tmp_path, "front", StoreSettings(every_s=1.0))
    kept = [store.put(_frame(i, i / 10), now=0.0) for i in range(25)]
    assert sum(p is not None for p in kept) == 3  # t = 0, 1.0, 2.0


def test_cameras_share_a_folder_without_touching_each_other(tmp_path):
    a = FrameStore(tmp_path, "front", StoreSettings(max_frames=1, every_s=0.0))
    b = FrameStore(tmp_path, "rear", StoreSettings(max_frames=1, every_s=0.0))
    a.put(_frame(0, 0), now=0.0)
    b.put(_frame(0, 0), now=0.0)
    a.put(_frame(1, 1), now=0.0)
    assert len(a.frames()) == 1 and len(b.frames()) == 1
