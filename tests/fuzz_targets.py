"""Coverage-guided fuzz targets (atheris) for the parsers of files from elsewhere: index files and
shard manifests (``Index.load``, which picks the kind by magic), the restricted unpickler
(``data.safe_pickle.loads``) and the image opener (``data.decode.decode_image``). Each input must
end in a result or in the parser's documented one-line error, never another exception, a crash
or a hang (libFuzzer's -timeout).

    python tests/fuzz_targets.py index [CORPUS_DIR ...] -atheris_runs=2000     # the suite's run
    python tests/fuzz_targets.py pickle CORPUS -max_total_time=600              # longer: benchmarks/fuzz.sh
    python tests/fuzz_targets.py seed index CORPUS                              # the seed inputs

``tests/test_fuzz.py`` runs each target for a bounded number of inputs from seeds it writes
(a real index, a manifest, real gnd pickles, small images)."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

from pylandmark.data import safe_pickle  # noqa: E402
from pylandmark.data.decode import decode_image  # noqa: E402
from pylandmark.data.images import ImageLoadError  # noqa: E402
from pylandmark.retrieval.format import IndexFormatError  # noqa: E402
from pylandmark.retrieval.index import Index  # noqa: E402

_WORK = Path(tempfile.mkdtemp(prefix="plm-fuzz-"))
_FILE = _WORK / "fuzz.plmi"


def index_target(data: bytes) -> None:
    _FILE.write_bytes(data)
    for mmap in (True, False):
        try:
            index = Index.load(_FILE, mmap=mmap, verify=True)
        except IndexFormatError:
            return
        except FileNotFoundError as err:  # a manifest naming a shard that is not there
            assert "shard" in str(err) or "no index file" in str(err), err
            return
        # what loaded is whole: every column has one entry per row
        n = len(index)
        assert index.descriptors.shape[0] == n and index.ids.shape == (n,)
        assert index.labels is None or len(index.labels) == n
        assert index.paths is None or len(index.paths) == n


def pickle_target(data: bytes) -> None:
    try:
        safe_pickle.loads(data, "fuzz input", numpy=True)
    except safe_pickle.PickleRefused:
        pass


def image_target(data: bytes) -> None:
    try:
        image = decode_image(data, max_pixels=1 << 20, name="fuzz input")
    except (ImageLoadError, ValueError):
        return
    assert image.mode == "RGB" and image.width * image.height <= 1 << 20


def _instrument_pylandmark() -> None:
    """Coverage instrumentation for pylandmark's own functions only (instrumenting numpy, torch
    and Pillow too makes each input a hundred times slower; atheris's import hook misses an
    editable install's finder, so the loaded functions are instrumented in place)."""
    import inspect

    seen: set[int] = set()
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "pylandmark" or name.startswith("pylandmark.")):
            continue
        for obj in vars(module).values():
            members = list(vars(obj).values()) if inspect.isclass(obj) else [obj]
            for member in members:
                for func in (getattr(member, "__func__", member), getattr(member, "fget", None)):
                    if (inspect.isfunction(func) and id(func) not in seen
                            and (func.__module__ or "").startswith("pylandmark")):
                        seen.add(id(func))
                        atheris.instrument_func(func)


def write_seeds(target: str, folder: Path) -> None:
    """Real inputs the fuzzer grows from: an index file and a manifest, ground-truth-like and
    numpy pickles, a small image in every format read on purpose."""
    import io
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    if target == "index":
        from pylandmark.retrieval.index import Index
        from pylandmark.retrieval.manifest import write_manifest

        index = Index(6)
        index.add(rng.standard_normal((3, 6)), labels=["a", "b", "a"], paths=["/x/1.jpg", "/x/2.jpg", "/y/3.jpg"])
        with tempfile.TemporaryDirectory() as tmp:
            seed = Path(tmp) / "seed.plmi"
            (folder / "index").write_bytes(index.save(seed).read_bytes())
            shard = Path(tmp) / "seed.plmi.shards" / "base-00000000.plmi"
            shard.parent.mkdir()
            index.save(shard)
            write_manifest(seed, dim=6, metric="cosine", metadata={},
                           shards=[{"file": shard.name, "count": 3, "id_offset": 0, "header_crc": 0}])
            (folder / "manifest").write_bytes(seed.read_bytes())
    elif target == "pickle":
        gnd = {"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [], "junk": [1],
                                                               "bbx": [0.0, 1.0, 2.0, 3.0]}]}
        (folder / "gnd").write_bytes(pickle.dumps(gnd, protocol=2))
        (folder / "numpy").write_bytes(pickle.dumps({"x": np.arange(6, dtype=np.int64).reshape(2, 3)}))
        (folder / "nested").write_bytes(pickle.dumps([[{"k": (1, 2.5, "s")}]] * 3, protocol=4))
    else:
        from PIL import Image

        pixels = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
        for fmt in ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM"):
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format=fmt)
            (folder / fmt.lower()).write_bytes(buf.getvalue())


TARGETS = {"index": index_target, "pickle": pickle_target, "image": image_target}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "seed" and sys.argv[2] in TARGETS:
        write_seeds(sys.argv[2], Path(sys.argv[3]))
        return
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [corpus dirs] [libFuzzer flags]\n"
                 f"       {sys.argv[0]} seed TARGET DIR   (writes the seed inputs)")
    target = TARGETS[sys.argv.pop(1)]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _instrument_pylandmark()
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
