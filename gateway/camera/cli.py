"""``gateway anonymize INPUT OUTPUT``: the command line only. The work is in
``gateway.camera.batch``, imported when the command runs, so that building the parser (every
``gateway`` invocation) does not load OpenCV."""

from __future__ import annotations

import argparse

from gateway.camera.options import AnonymiserSettings, DetectorSettings, Method

EPILOG = """\
examples:
  gateway anonymize photos/ photos-blurred/          every image, same names and formats
  gateway anonymize street.jpg street-blurred.jpg --method pixelate --margin 0.3
  gateway anonymize drive.mp4 drive-blurred.mp4

Lossless formats (PNG, BMP, TIFF, WebP) stay lossless; JPEG is written at quality 95. In a video,
a frame whose detection fails is written black (fail closed), never unblurred.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    d = DetectorSettings()
    p = sub.add_parser(
        "anonymize",
        help="blur faces and licence plates in an image, a folder of images or a video",
        description="Detect faces (YuNet) and licence plates (clp_det) with the models shipped "
        "in models/ and write anonymised copies. A folder gives a folder: same file names "
        "and formats. Originals are never changed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="an image, a folder of images, or a video")
    p.add_argument("output", metavar="OUTPUT", help="file (image/video) or folder (for a folder)")
    p.add_argument(
        "--method",
        choices=[m.value for m in Method],
        default=Method.GAUSSIAN.value,
        help="how to obscure each region (default gaussian)",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=AnonymiserSettings().margin,
        metavar="SHARE",
        help="extra border around each box, as a share of its size (default %(default)s)",
    )
    p.add_argument(
        "--face-score",
        type=float,
        default=d.face_score,
        metavar="S",
        help="face score threshold; lower finds more (default %(default)s)",
    )
    p.add_argument(
        "--plate-score",
        type=float,
        default=d.plate_score,
        metavar="S",
        help="plate score threshold; lower finds more (default %(default)s)",
    )
    p.add_argument(
        "--face-width",
        type=int,
        default=0,
        metavar="PX",
        help="face detector input width, 160-4096 (per 1280 px of a wider image), or 0: the "
        "image's own up to 2560 (default 0: small faces in large images stay findable; the "
        f"stream uses {d.face_width})",
    )
    p.add_argument(
        "--plate-width",
        type=int,
        default=0,
        metavar="PX",
        help="plate detector input width, 160-4096 (per 1280 px of a wider image), or 0: the "
        f"image's own up to 2560 (default 0; the stream uses {d.plate_width})",
    )
    p.add_argument(
        "--plate-strips",
        type=int,
        default=d.plate_strips,
        metavar="N",
        help="run the plate detector on N overlapping horizontal strips, 1-4; fewer is faster, "
        "more needs less memory (default %(default)s)",
    )
    p.add_argument(
        "--edges",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a second look at each image mirrored at its edges, which finds the faces and "
        "plates the edge cuts (half inside: most were missed); twice the detection time "
        "(default on; the stream: off, [[camera]] edges)",
    )
    p.add_argument(
        "--detect-every",
        type=int,
        default=1,
        metavar="K",
        help="video: detect on every K-th frame, boxes carried between (default 1)",
    )
    p.add_argument(
        "--memory",
        type=int,
        default=AnonymiserSettings().memory,
        metavar="N",
        help="video: apply each box to the next N frames too (default %(default)s)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from gateway.camera.batch import run

    return run(args)
