"""The command line's own parsing: argument types with one-line errors, image scales written
as text, and the examples each sub-command's --help ends with."""
from __future__ import annotations

import argparse
import math
import re

from .._checks import check_image_size, check_scales

EXAMPLES = {
    "extract": "examples:\n  pylandmark extract photos/ --out descriptors.npy --weights model_dir/\n"
               "  pylandmark extract a.jpg b.jpg --out d.npy --weights random --image-size 512",
    "index build": "examples:\n  pylandmark index build landmarks/ --labels-from-folders --out landmarks.plmi "
                   "--weights model_dir/\n"
                   "  pylandmark index build landmarks/ --labels-from-folders --out landmarks.plmi "
                   "--weights model_dir/ --pooling superglobal   # SuperGlobal's pooling; queries follow",
    "index add": "examples:\n  pylandmark index add landmarks.plmi new/*.jpg --label city_hall",
    "index info": "examples:\n  pylandmark index info landmarks.plmi --json",
    "index codes": "examples:\n  pylandmark index codes landmarks.plmi   # once, for a file of index format version 1",
    "search": "examples:\n  pylandmark search landmarks.plmi query.jpg -k 10\n"
              "  pylandmark search landmarks.plmi query.jpg -k 100 --rerank superglobal   # re-rank the top 400",
    "recognize": "examples:\n  pylandmark recognize landmarks.plmi photos/*.jpg --json\n"
                 "  pylandmark recognize landmarks.plmi q.jpg --vote weighted --min-score 0.5\n"
                 "  pylandmark recognize landmarks.plmi q.jpg --rerank superglobal",
    "evaluate": "examples:\n  pylandmark evaluate roxford5k rparis6k --weights model_dir/ --data-root data/\n"
                "  pylandmark evaluate roxford5k --weights model_dir/ --data-root data/ --multiscale --qe 2\n"
                "  pylandmark evaluate roxford5k rparis6k --weights retrievalSfM120k-resnet101-gem "
                "--data-root data/ --multiscale --whitening retrieval-SfM-120k\n"
                "  pylandmark evaluate roxford5k rparis6k --weights gl18-tl-resnet101-gem-w --data-root data/ "
                "--pooling superglobal --scales '1/sqrt(2),1,sqrt(2)' --rerank superglobal",
    "whiten": "examples:\n"
              "  pylandmark whiten landmarks/ --pairs-from-folders --weights model_dir/ --out lw.safetensors\n"
              "  pylandmark index build landmarks/ --labels-from-folders --weights model_dir/ "
              "--whitening lw.safetensors --out landmarks.plmi\n"
              "  pylandmark whiten --pairs sfm120k/ --weights retrievalSfM120k-resnet101-gem --out lw.safetensors "
              "--install lw_model/\n"
              "  pylandmark whiten photos/ --kind pca --dim 512 --weights model_dir/ --out pca512.safetensors",
    "train": "examples:\n  pylandmark train --data-root sfm120k/ --out runs/csp --preset cspdarknet53-gem\n"
             "  pylandmark train --data-root sfm120k/ --out runs/csp --resume\n"
             "  pylandmark train --data-root photos/ --out runs/campus --pretrained runs/csp/model_best  "
             "# photos/<landmark>/<image>\n"
             "  pylandmark train --data-root gldv2/train/ --data-csv gldv2/train.csv --out runs/gld "
             "--preset cspdarknet53-gem-arcface\n"
             "  pylandmark train --data-root images/ --colmap sparse/0 --out runs/city",
    "bench": "examples:\n  pylandmark bench\n  pylandmark bench --n 1000000 --queries 1 64 --k 100 --json",
    "models": "examples:\n  pylandmark models\n  pylandmark models --json\n"
              "  pylandmark evaluate roxford5k rparis6k --weights gl18-tl-resnet101-gem-w --data-root data/ "
              "--scales '1,sqrt(2),1/sqrt(2)'",
    "serve": "examples:\n  pylandmark serve landmarks.plmi                      # http://127.0.0.1:8000/\n"
             "  pylandmark serve landmarks.plmi --port 9000 --workers 2\n"
             "  pylandmark serve landmarks.plmi --rerank superglobal --rerank-m 200\n"
             "  curl -F image=@query.jpg 'http://127.0.0.1:8000/recognize?k=5'",
    "report": "examples:\n  pylandmark recognize landmarks.plmi test/ --json > results.json\n"
              "  pylandmark report results.json --out report.html --truth-from-folders",
}


_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_SCALE = re.compile(rf"\s*(?P<num>{_NUMBER}|sqrt\(\s*{_NUMBER}\s*\))"
                    rf"(?:\s*/\s*(?P<den>{_NUMBER}|sqrt\(\s*{_NUMBER}\s*\)))?\s*")


def parse_scales(text: str) -> tuple[float, ...]:
    """``"1,0.7071,0.5"`` or ``"1, sqrt(2), 1/sqrt(2)"`` -> (1.0, ...): numbers, ``sqrt(x)`` and
    one division per item, nothing else (no evaluation of arbitrary expressions)."""
    def value(token: str) -> float:
        token = token.replace(" ", "")
        return math.sqrt(float(token[5:-1])) if token.startswith("sqrt(") else float(token)

    out = []
    for item in str(text).split(","):
        m = _SCALE.fullmatch(item)
        if m is None:
            raise ValueError(f"--scales: cannot read {item.strip()!r}; give numbers separated by commas, "
                             "e.g. 1,0.7071,0.5 or 1,sqrt(2),1/sqrt(2)")
        den = value(m["den"]) if m["den"] else 1.0
        if den == 0:
            raise ValueError(f"--scales: division by zero in {item.strip()!r}")
        out.append(value(m["num"]) / den)
    return check_scales(out, "--scales")


def format_scales(scales) -> str:
    """(1, 1.41421..., 0.70710...) -> "1,sqrt(2),1/sqrt(2)" (what :func:`parse_scales` reads)."""
    names = {math.sqrt(2): "sqrt(2)", 1 / math.sqrt(2): "1/sqrt(2)"}
    return ",".join(next((v for k, v in names.items() if abs(s - k) < 1e-6), f"{s:g}") for s in scales)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `pylandmark extract: error: ...` and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message.splitlines()[0] if message else 'bad arguments'} "
                     f"(see {self.prog} --help)\n")


def _count(minimum: int):
    """argparse type: an int >= minimum (so --image-size 0 is an error, not the default)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def image_size(text: str) -> int:
    """argparse type of ``--image-size``: :func:`pylandmark._checks.check_image_size`'s rule."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    try:
        return check_image_size(value, "the image size")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


image_size.__name__ = "image size"
