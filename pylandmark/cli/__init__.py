"""The `pylandmark` command: the parser (:func:`build_parser`), :func:`main`, and the one choice
between running a job in this process and splitting it over a torchrun launch."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from ..runtime import DEVICE_HELP, launched_rank, launched_world_size, resolve_device
from . import commands as c
from .options import EXAMPLES, _count, _Parser, format_scales, image_size, parse_scales

__all__ = ["main", "build_parser", "parse_scales", "format_scales", "DISTRIBUTED"]

# commands that split their work across torchrun ranks (pylandmark.pipelines.torchrun)
DISTRIBUTED = {"extract", "index build", "index add", "search", "recognize", "evaluate"}


def build_parser(with_training: bool = True) -> argparse.ArgumentParser:
    """The parser; `with_training=False` skips importing torch for the train options."""
    common = _Parser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or log messages")
    network = _Parser(add_help=False)  # the network and how it describes images
    network.add_argument("--weights", help="network: a preset name (`pylandmark models` lists them), a directory "
                                           "from `pylandmark train`, a checkpoint file or URL (cirtorch retrieval "
                                           "network or backbone), or 'random' (smoke tests; results mean nothing). "
                                           "Index commands default to the index's own")
    network.add_argument("--device", default="cpu", help=f"{DEVICE_HELP} (default cpu)")
    network.add_argument("--image-size", type=image_size,
                         help="longer image side in pixels (default 1024, or the index's)")
    network.add_argument("--multiscale", action="store_true", help="scales 1, 1/sqrt 2, 1/2 combined by GeM")
    network.add_argument("--scales", help="image scales, comma-separated, e.g. 1,0.7071,0.5 or 1,sqrt(2),1/sqrt(2) "
                                          "(combined by GeM with the network's p, or averaged with a whitening "
                                          "layer)")
    network.add_argument("--pooling", help="how the network pools its feature map: gem (its own GeM, the default), "
                                           "superglobal (regional GeM, GeM+ p=4.6 and the maximum over scales: "
                                           "SuperGlobal's, no retraining), or parts of it: gem+, rgem, sgem, "
                                           "comma-separated, each name[:value] (e.g. gem+:5,rgem:2.5:5). Index "
                                           "commands default to the index's own")
    network.add_argument("--batch-size", type=_count(1), default=16)
    network.add_argument("--workers", type=_count(0), default=0, help="image decoding processes (default 0)")
    net = _Parser(add_help=False, parents=[network])
    net.add_argument("--whitening", help="post-hoc whitening: the name of one the network holds (e.g. "
                                         "retrieval-SfM-120k for the cirtorch Lw; ss or ms by the number of scales), "
                                         "a file written by Whitening.save(), or 'none'. Index commands default "
                                         "to the index's own")
    js = _Parser(add_help=False)
    js.add_argument("--json", action="store_true", help="print JSON instead of text")
    rr = _Parser(add_help=False)  # SuperGlobal's re-ranking of the top M (search, recognize, evaluate, serve)
    rr.add_argument("--rerank", choices=("none", "superglobal"), default="none",
                    help="superglobal: re-rank each query's top --rerank-m from their descriptors alone "
                         "(Shao et al., ICCV 2023; no retraining); results beyond them keep their order")
    rr.add_argument("--rerank-m", type=_count(1), default=400, help="rows re-ranked per query (default 400)")
    rr.add_argument("--rerank-neighbours", type=_count(0), default=9,
                    help="neighbours of each re-ranked row, and rows of the query expansion, besides itself "
                         "(default 9)")
    rr.add_argument("--rerank-beta", type=float, default=0.15, help="the neighbours' weight (default 0.15)")

    parser = _Parser(prog="pylandmark", description="Landmark recognition by image search.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(container, name: str, help: str, func, parents=(), key: str | None = None):
        p = container.add_parser(name, help=help, parents=[common, *parents], epilog=EXAMPLES.get(key or name),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add(sub, "extract", "describe images, write an (N, D) float16 .npy", c.extract, (net, js))
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output .npy (paths go to <out>.paths.txt)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of failing")

    idx = sub.add_parser("index", help="build, grow and inspect an index file").add_subparsers(
        dest="index_command", required=True)
    p = add(idx, "build", "index every image under a folder", c.index_build, (net, js), "index build")
    p.add_argument("folder")
    p.add_argument("--out", required=True, help="index file to write (e.g. landmarks.plmi)")
    p.add_argument("--labels-from-folders", action="store_true", help="label = the class folder: DIR/<label>/*.jpg")
    p = add(idx, "add", "add images to an index", c.index_add, (net, js), "index add")
    p.add_argument("index")
    p.add_argument("images", nargs="+")
    p.add_argument("--label", help="one label for all added images")
    p.add_argument("--labels-from-folders", action="store_true", help="label = each image's parent folder")
    p = add(idx, "info", "show what an index holds", c.index_info, (js,), "index info")
    p.add_argument("index")
    p = add(idx, "codes", "store the compact codes of faster exact search in an older index file", c.index_codes,
            (js,), "index codes")
    p.add_argument("index")

    p = add(sub, "search", "the k most similar indexed images for each query image", c.search, (net, js, rr))
    p.add_argument("index")
    p.add_argument("images", nargs="+")
    p.add_argument("-k", type=_count(1), default=5)
    p.add_argument("--html", metavar="FILE", help="also write the results as a self-contained HTML page")
    p.add_argument("--truth-from-folders", action="store_true",
                   help="with --html: each query's true label is its folder's name (green/red frames, accuracy)")

    p = add(sub, "recognize", "name the landmark in each query image (top-k vote)", c.recognize, (net, js, rr))
    p.add_argument("index")
    p.add_argument("images", nargs="+")
    p.add_argument("-k", type=_count(1), default=5)
    p.add_argument("--vote", choices=("majority", "weighted"), default="majority")
    p.add_argument("--min-score", type=float, help="answer 'unknown' when the best similarity is below this")
    p.add_argument("--html", metavar="FILE", help="also write the results as a self-contained HTML page")
    p.add_argument("--truth-from-folders", action="store_true",
                   help="with --html: each query's true label is its folder's name (green/red frames, accuracy)")

    p = add(sub, "evaluate", "mAP on revisited Oxford / Paris (Easy, Medium, Hard; with --rerank, plain and "
            "re-ranked side by side)", c.evaluate, (net, js, rr))
    p.add_argument("datasets", nargs="+", choices=("roxford5k", "rparis6k"))
    p.add_argument("--data-root", required=True, help="folder holding <dataset>/gnd_<dataset>.pkl and jpg/")
    p.add_argument("--qe", type=_count(0), default=0, help="alpha query expansion with this many neighbours")
    p.add_argument("--qe-alpha", type=float, default=3.0)
    p.add_argument("--dba", type=_count(0), default=0, help="database-side augmentation with this many neighbours")
    p.add_argument("--dba-alpha", type=float, default=3.0)
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--plots", metavar="DIR", help="also write figures (per-query AP, precision-recall) and a page of "
                                                  "the worst queries here (needs pip install \"pylandmark[plots]\")")

    p = add(sub, "whiten", "learn a whitening of a network's descriptors (Lw from matching pairs, or PCA)", c.whiten,
            (network, js))
    p.add_argument("images", nargs="*", metavar="IMAGES",
                   help="image files and/or folders (searched recursively); with --pairs-from-folders one folder "
                        "of landmark folders; none with --pairs")
    p.add_argument("--out", required=True, help="the whitening file to write (e.g. lw.safetensors): what "
                                                "--whitening FILE of extract, index, search, recognize and evaluate "
                                                "applies with the same --weights")
    pairs = p.add_mutually_exclusive_group()
    pairs.add_argument("--pairs-from-folders", action="store_true",
                       help="matching pairs from landmark folders: IMAGES is one folder, FOLDER/<landmark>/<image>; "
                            "each image is paired with up to 5 others of its landmark")
    pairs.add_argument("--pairs", metavar="DIR", help="SfM-120k matching pairs: DIR holds "
                                                      "retrieval-SfM-120k-whiten.pkl (or -30k) and the ims/ it names")
    p.add_argument("--kind", choices=("lw", "pca"), help="lw: learned whitening (Radenovic et al.) from the matching "
                                                         "pairs, the default with pairs; pca: PCA whitening of the "
                                                         "images, the default without")
    p.add_argument("--dim", type=_count(1), help="keep this many whitened dimensions (default: all, the "
                                                 "descriptor size)")
    p.add_argument("--install", metavar="NEW_DIR",
                   help="also write a new model directory: the --weights network with this whitening as its "
                        "whitening layer (use it as --weights NEW_DIR, without --whitening). A whitening layer the "
                        "network has is replaced, and the whitening is then learned from the descriptors before "
                        "it. NEW_DIR must not exist (or be empty); --weights is never changed")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (and their pairs) instead of "
                                                           "failing")

    p = add(sub, "train", "fine-tune on SfM-120k, your labelled photos or a COLMAP model", c.train)
    if with_training:
        try:
            from ..training import cli as training

            training.add_arguments(p)
        except ImportError as err:  # training needs torch; the other commands parse without it
            p.set_defaults(func=lambda a, e=err: _missing(e))

    add(sub, "models", "list the pretrained networks (architecture, accuracy, cache, URL)", c.models, (js,))

    p = add(sub, "serve", "answer recognition and search requests over HTTP, with a web page", c.serve, (rr,))
    p.add_argument("index", help="the index file to serve (memory-mapped, shared by the workers)")
    p.add_argument("--weights", help="the network (default: the one the index was built with)")
    p.add_argument("--device", default="cpu", help="cpu or cuda for the network (default cpu)")
    p.add_argument("--image-size", type=image_size, help="longer image side in pixels (default: the index's)")
    p.add_argument("--multiscale", action="store_true", help="scales 1, 1/sqrt 2, 1/2 combined by GeM")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable; '*': any). By default only "
                        "the --host address and this machine's loopback names (and, for 0.0.0.0, its own names "
                        "and addresses) are answered, which keeps DNS-rebinding web pages out")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own network (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: the cores / workers)")
    p.add_argument("--max-batch", type=int, default=16, help="most photos per network call when requests overlap")
    p.add_argument("--batch-wait-ms", type=float, help="wait this long for batch mates (default 2 on cuda, 0 on cpu)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body (default 20 MB)")
    p.add_argument("--max-pixels", type=int, default=64_000_000, help="largest image in pixels (default 64M)")
    p.add_argument("--max-images", type=int, default=16, help="most photos per request (default 16)")
    p.add_argument("--max-k", type=int, default=100, help="largest k a request may ask for (default 100)")

    p = add(sub, "report", "an HTML page of recognize/search results (self-contained)", c.report, (js,))
    p.add_argument("results", help="a JSON file written by `pylandmark recognize/search --json`")
    p.add_argument("--out", required=True, help="the .html file to write")
    p.add_argument("--truth-from-folders", action="store_true",
                   help="each query's true label is its folder's name (green/red frames, accuracy, confusion)")
    p.add_argument("--title", help="page title")
    p.add_argument("--thumb-size", type=int, default=160, help="thumbnail size in pixels (default 160)")

    p = add(sub, "bench", "search speed on this machine next to numpy's", c.bench, (js,))
    p.add_argument("--n", type=_count(1), default=200_000, help="database rows (default 200000)")
    p.add_argument("--dim", type=_count(1), default=1024, help="descriptor length (default 1024)")
    p.add_argument("--queries", type=_count(1), nargs="+", default=[1, 64, 1024], help="query batch sizes")
    p.add_argument("--k", type=_count(1), default=5)
    p.add_argument("--repeat", type=_count(1), default=5, help="timed runs per size (median reported)")
    p.add_argument("--threads", type=_count(0), help="CPU threads (default: all cores)")
    return parser


def _missing(err: Exception) -> int:
    raise ImportError(f"this command needs torch ({err}); pip install torch")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(with_training=bool(argv) and argv[0] == "train")
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a one-line argument error (exit code 2)
        return stop.code if isinstance(stop.code, int) else 2
    command = args.command + (f" {args.index_command}" if getattr(args, "index_command", None) else "")
    distributed = launched_world_size() > 1 and command in DISTRIBUTED
    follower = distributed and launched_rank() != 0
    # under torchrun rank 0 speaks for all: the others log errors only (skipped images of
    # every rank are in rank 0's summary)
    logging.basicConfig(level=logging.ERROR if follower or args.quiet else logging.INFO, format="%(message)s")
    if command in DISTRIBUTED:  # the one choice: these jobs in this process, or split over the ranks
        if distributed:
            from ..pipelines import torchrun as jobs

            args.device = jobs.join(getattr(args, "device", "cpu"))  # one device per rank
        else:
            from ..pipelines import local as jobs  # type: ignore[no-redef]
        args.jobs = jobs
    else:  # the other commands' jobs run in this process (imported on first use: bench needs no torch)
        args.jobs = _LocalJobs()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            if follower:
                warnings.simplefilter("ignore")
            elif args.quiet:
                from ..extraction import SkippedImages  # the per-call report of unreadable images

                warnings.simplefilter("ignore", SkippedImages)
            return _run(args)
    finally:
        if distributed:
            args.jobs.leave()


class _LocalJobs:
    """:mod:`pylandmark.pipelines.local`, imported when a job is first looked up."""

    def __getattr__(self, name: str):
        from ..pipelines import local

        return getattr(local, name)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"pylandmark: warning: {str(message).splitlines()[0] if str(message) else category.__name__}",
          file=sys.stderr)


#: what a user's mistake raises: one line and exit code 2
USER_ERRORS = (ValueError, TypeError, KeyError, ImportError, OSError, NotImplementedError)


def _run(args: argparse.Namespace) -> int:
    name = args.command + (f" {args.index_command}" if getattr(args, "index_command", None) else "")
    try:
        if getattr(args, "device", None) is not None:  # one parser for every command, train included
            args.device = str(resolve_device(args.device))
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except USER_ERRORS as err:
        print(f"pylandmark {name}: error: {_first_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - no traceback reaches the user
        if os.environ.get("PYLANDMARK_DEBUG"):
            raise
        print(f"pylandmark {name}: error: {type(err).__name__}: {_first_line(err)} (PYLANDMARK_DEBUG=1 shows "
              "the traceback)", file=sys.stderr)
        return 1


def _first_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0].strip() if lines else type(err).__name__
