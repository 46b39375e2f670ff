"""End to end against a real Mosquitto broker: the Kona log replayed beside the demo clip. The
owner gets camera summaries (counts), and no published payload carries image data; the frames
kept on the device are anonymised."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from gateway.camera.detect import FaceDetector
from gateway.egress.schema import unpack
from tests.camera.conftest import DEMO_CLIP
from tests.conftest import KONA_CCAN, KONA_CSV, KONA_PCAN, replay_args, run_gateway

pytestmark = [pytest.mark.broker, pytest.mark.slow]

IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM6", b"\x00\x00\x00\x18ftyp")


def _walk(value, path="$"):
    """Every leaf of a decoded payload with its path."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(value, list | tuple):
        assert len(value) <= 64, f"{path}: a list of {len(value)} items"
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, value


def test_camera_summaries_reach_the_owner_and_no_payload_carries_image_data(
    tmp_path, broker, vin, listen
):
    # GIVEN an owner listening to everything the vehicle publishes
    lst = listen(broker.url, f"vehicles/{vin}/#")
    # WHEN the Kona log is replayed with the demo clip beside it
    proc = run_gateway(
        *replay_args(
            KONA_CSV,
            [f"can0={KONA_PCAN}", f"can1={KONA_CCAN}"],
            broker.url,
            vin,
            tmp_path,
            "--video",
            str(DEMO_CLIP),
            "--fast",
            "--window",
            "2",
            "-q",
        ),
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    messages = lst.settle()
    assert messages
    # THEN camera summaries arrived, with the face and the plate of the clip blurred
    camera = [unpack(m.payload) for m in messages if m.topic.endswith("/owner/camera")]
    assert camera, [m.topic for m in messages]
    assert sum(c["frames_seen"] for c in camera) == 90
    assert all(c["frames_anonymised"] + c["frames_dropped"] == c["frames_seen"] for c in camera)
    assert sum(c["frames_anonymised"] for c in camera) > 0
    assert sum(c["faces_blurred"] for c in camera) > 0
    assert sum(c["plates_blurred"] for c in camera) > 0
    assert {c["camera"] for c in camera} == {"front"}
    # AND no payload carries image data: small, no image magic, no byte strings, no long text
    for m in messages:
        assert len(m.payload) < 4096, (m.topic, len(m.payload))
        for magic in IMAGE_MAGIC:
            assert magic not in m.payload, (m.topic, magic)
        body = unpack(m.payload)
        assert isinstance(body, dict)
        for path, leaf in _walk(body):
            assert not isinstance(leaf, bytes | bytearray), (m.topic, path)
            assert not (isinstance(leaf, str) and len(leaf) > 256), (m.topic, path)
    # AND the frames kept on the device are anonymised: the face is no longer found in them
    stored = sorted(Path(tmp_path / "frames").rglob("*.jpg"))
    assert stored, list(tmp_path.iterdir())
    faces = FaceDetector(score=0.6)
    original = cv2.VideoCapture(str(DEMO_CLIP))
    ok, first = original.read()
    original.release()
    assert ok and faces.detect(first), "the clip's face must be findable before anonymisation"
    for p in stored:
        img = cv2.imread(str(p))
        assert img is not None and img.shape == (360, 640, 3)
        assert faces.detect(img) == [], p.name
    assert not list(tmp_path.rglob("*.part"))
