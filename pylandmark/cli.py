"""The `pylandmark` command. Each sub-command parses its options and calls one library function."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .devices import DEVICE_HELP

EXAMPLES = {
    "extract": "examples:\n  pylandmark extract photos/ --out descriptors.npy --weights model_dir/\n"
               "  pylandmark extract a.jpg b.jpg --out d.npy --weights random --image-size 512",
    "index build": "examples:\n  pylandmark index build landmarks/ --labels-from-folders --out landmarks.plmi "
                   "--weights model_dir/",
    "index add": "examples:\n  pylandmark index add landmarks.plmi new/*.jpg --label city_hall",
    "index info": "examples:\n  pylandmark index info landmarks.plmi --json",
    "search": "examples:\n  pylandmark search landmarks.plmi query.jpg -k 10",
    "recognize": "examples:\n  pylandmark recognize landmarks.plmi photos/*.jpg --json\n"
                 "  pylandmark recognize landmarks.plmi q.jpg --vote weighted --min-score 0.5",
    "evaluate": "examples:\n  pylandmark evaluate roxford5k rparis6k --weights model_dir/ --data-root data/\n"
                "  pylandmark evaluate roxford5k --weights model_dir/ --data-root data/ --multiscale --qe 2\n"
                "  pylandmark evaluate roxford5k rparis6k --weights retrievalSfM120k-resnet101-gem "
                "--data-root data/ --multiscale --whitening retrieval-SfM-120k",
    "train": "examples:\n  pylandmark train --data-root sfm120k/ --out runs/csp --preset cspdarknet53-gem\n"
             "  pylandmark train --data-root sfm120k/ --out runs/csp --resume",
    "bench": "examples:\n  pylandmark bench\n  pylandmark bench --n 1000000 --queries 1 64 --k 100 --json",
    "models": "examples:\n  pylandmark models\n  pylandmark models --json\n"
              "  pylandmark evaluate roxford5k rparis6k --weights gl18-tl-resnet101-gem-w --data-root data/ "
              "--scales '1,sqrt(2),1/sqrt(2)'",
    "serve": "examples:\n  pylandmark serve landmarks.plmi                      # http://127.0.0.1:8000/\n"
             "  pylandmark serve landmarks.plmi --port 9000 --workers 2\n"
             "  curl -F image=@query.jpg 'http://127.0.0.1:8000/recognize?k=5'",
    "report": "examples:\n  pylandmark recognize landmarks.plmi test/ --json > results.json\n"
              "  pylandmark report results.json --out report.html --truth-from-folders",
}


# commands that split their work across torchrun ranks (see distributed_jobs.py)
DISTRIBUTED = {"extract", "index build", "index add", "search", "recognize", "evaluate"}


def _world() -> int:
    """Ranks of the torchrun launch running this process (WORLD_SIZE; 1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _emit(args: argparse.Namespace, payload, text: str) -> None:
    if _world() > 1 and os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 prints
    print(json.dumps(payload, indent=1, default=str) if getattr(args, "json", False) else text)


def _network(args: argparse.Namespace, index=None):
    """The network of --weights, or else the one the index names (a preset or a local path: a URL
    in an index file someone sent is never fetched without an explicit --weights)."""
    from .models.pretrained import load_network

    weights = args.weights or (_index_weights(index) if index is not None else None)
    if not weights:
        raise ValueError("--weights is required (a directory from `pylandmark train`, a checkpoint file or URL, "
                         "a preset name, or 'random' for a smoke test)")
    return load_network(weights, device=args.device, progress=not args.quiet), weights


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
    if not all(0 < s <= 4 for s in out):
        raise ValueError(f"--scales: every scale must be in (0, 4], got {text!r}")
    return tuple(out)


def format_scales(scales) -> str:
    """(1, 1.41421..., 0.70710...) -> "1,sqrt(2),1/sqrt(2)" (what :func:`parse_scales` reads)."""
    names = {math.sqrt(2): "sqrt(2)", 1 / math.sqrt(2): "1/sqrt(2)"}
    return ",".join(next((v for k, v in names.items() if abs(s - k) < 1e-6), f"{s:g}") for s in scales)


def _index_weights(index) -> str | None:
    value = index.metadata.get("weights")
    if not isinstance(value, str) or not value:
        return None
    if "://" in value:
        raise ValueError(f"the index names its network by URL ({value[:200]}); an index never makes pylandmark "
                         "download anything: pass --weights (that URL, if you trust it, or a local copy)")
    return value


def _opts(args: argparse.Namespace, index=None):
    from .extraction import DEFAULT_SCALES_MS
    from .pipelines import ExtractOptions, index_options

    scales = None
    if getattr(args, "scales", None) is not None:
        if getattr(args, "multiscale", False):
            raise ValueError("--multiscale and --scales both given; --multiscale means --scales 1,1/sqrt(2),1/2: "
                             "pass one of them")
        scales = parse_scales(args.scales)
    elif getattr(args, "multiscale", False):
        scales = DEFAULT_SCALES_MS
    whitening = getattr(args, "whitening", None)
    if whitening is not None and whitening.lower() == "none":
        whitening = ""  # explicitly none, also over an index's recorded whitening
    common = dict(batch_size=args.batch_size, num_workers=args.workers, device=args.device, progress=not args.quiet)
    if index is not None:
        opts = index_options(index, image_size=args.image_size, scales=scales, whitening=whitening, **common)
    else:
        opts = ExtractOptions(image_size=1024 if args.image_size is None else args.image_size,
                              scales=scales or (1.0,), whitening=whitening, **common)
    opts.whitening = opts.whitening or None
    return opts


def _extract(args: argparse.Namespace) -> int:
    from .pipelines import describe, expand_images, save_descriptors

    images = expand_images(args.images)
    net, _ = _network(args)
    if _world() > 1:
        from .distributed_jobs import extract_to_file

        res = extract_to_file(net, images, _opts(args), args.out, skip_bad=args.skip_bad)
        payload = {"out": str(res["out"]), "paths": str(res["paths"]), "count": res["count"], "dim": res["dim"],
                   "skipped": res["skipped"], "ranks": res["ranks"]}
        _emit(args, payload, f"wrote {res['count']} x {res['dim']} float16 descriptors to {res['out']} "
                             f"(paths in {res['paths']}; {len(res['ranks'])} ranks)")
        return 0
    desc, kept, skipped = describe(net, images, _opts(args), skip_bad=args.skip_bad)
    out, listing = save_descriptors(args.out, desc, kept)
    payload = {"out": str(out), "paths": str(listing), "count": len(kept), "dim": int(desc.shape[1]),
               "skipped": skipped}
    _emit(args, payload, f"wrote {len(kept)} x {desc.shape[1]} float16 descriptors to {out} "
                         f"(paths in {listing}){'; skipped ' + str(len(skipped)) if skipped else ''}")
    return 0


def _index_build(args: argparse.Namespace) -> int:
    from .pipelines import build_index
    from .retrieval.manifest import remove_stale_shards

    net, weights = _network(args)
    ranks = None
    if _world() > 1:  # one shard per rank plus a manifest (distributed_jobs.py says why)
        from . import distributed_jobs

        res = distributed_jobs.build_index(net, args.folder, _opts(args), args.out,
                                           labels_from_folders=args.labels_from_folders, weights=weights)
        index, skipped, ranks = res["index"], res["skipped"], res["ranks"]
        if index is None:
            return 0
    else:
        index, skipped = build_index(net, args.folder, _opts(args), labels_from_folders=args.labels_from_folders,
                                     weights=weights)
        index.save(args.out)
        remove_stale_shards(args.out)  # shards of an earlier distributed build at this path
    info = {**index.info(), "out": args.out, "skipped": skipped, **({"ranks": ranks} if ranks else {})}
    _emit(args, info, f"indexed {len(index)} images ({info['classes']} classes) into {args.out}"
                      f"{'; skipped ' + str(len(skipped)) if skipped else ''}")
    return 0


def _index_add(args: argparse.Namespace) -> int:
    from .pipelines import add_images, check_against_index, expand_images
    from .retrieval.index import Index
    from .retrieval.manifest import ShardedIndex

    index = Index.load(args.index, mmap=False, verify=_world() == 1)
    net, _ = _network(args, index)
    opts = _opts(args, index)
    check_against_index(index, args.weights, opts)
    if _world() > 1 or isinstance(index, ShardedIndex):  # new rows become new shards
        from . import distributed_jobs

        del index
        res = distributed_jobs.add_images(args.index, net, expand_images(args.images), opts, label=args.label,
                                          labels_from_folders=args.labels_from_folders)
        _emit(args, res, f"added {res['added']} images; {args.index} now holds {res['count']}")
        return 0
    ids, skipped = add_images(index, net, expand_images(args.images), opts, label=args.label,
                              labels_from_folders=args.labels_from_folders)
    index.save(args.index)
    _emit(args, {"added": len(ids), "count": len(index), "skipped": skipped},
          f"added {len(ids)} images; {args.index} now holds {len(index)}")
    return 0


def _index_info(args: argparse.Namespace) -> int:
    from .retrieval.index import Index

    info = Index.load(args.index, verify=True).info()
    text = "\n".join(f"{k}: {v}" for k, v in info.items())
    _emit(args, info, text)
    return 0


def _search(args: argparse.Namespace) -> int:
    from .pipelines import check_against_index, expand_images, search_images

    index = _open_index(args)
    net, _ = _network(args, index)
    opts = _opts(args, index)
    check_against_index(index, args.weights, opts)
    if _world() > 1:
        from . import distributed_jobs

        results = distributed_jobs.search_images(index, net, expand_images(args.images), opts, k=args.k)
    else:
        results = search_images(index, net, expand_images(args.images), opts, k=args.k)
    lines = []
    for r in results:
        lines.append(r["query"])
        lines += [f"  {h['rank']:>3}. {h['score']:.4f}  {h['label'] if h['label'] is not None else '-'}  "
                  f"{h['path'] or h['id']}" for h in r["neighbours"]]
    _emit(args, results, "\n".join(lines))
    _html(args, results)
    return 0


def _truth(args: argparse.Namespace, results: list) -> list | None:
    """The true labels for a results page: the folder names with --truth-from-folders, else the
    "truth" that recognize put into every result (query photos in class folders), else None."""
    from .report.results import truth_from_folders

    if args.truth_from_folders:
        return truth_from_folders(results)
    if results and all("truth" in r for r in results):
        return [r["truth"] for r in results]
    return None


def _html(args: argparse.Namespace, results: list) -> None:
    """--html FILE: the results as a self-contained page (thumbnails embedded)."""
    if not getattr(args, "html", None):
        return
    from .report.results import write_report

    write_report(results, args.html, truth=_truth(args, results), progress=not args.quiet)
    logging.getLogger("pylandmark").info("wrote %s", args.html)


def _recognize(args: argparse.Namespace) -> int:
    from .evaluate import format_confusion
    from .pipelines import check_against_index, expand_images, recognition_summary

    if _world() > 1:  # the same results from a sharded search
        from .distributed_jobs import recognize_images
    else:
        from .pipelines import recognize_images
    index = _open_index(args)
    net, _ = _network(args, index)
    opts = _opts(args, index)
    check_against_index(index, args.weights, opts)
    results = recognize_images(index, net, expand_images(args.images), opts, k=args.k,
                               vote=args.vote, min_score=args.min_score)
    lines = []
    for r in results:
        verdict = "" if "truth" not in r else ("  [right]" if r["label"] == r["truth"] else f"  [wrong: {r['truth']}]")
        lines.append(f"{r['query']}: {r['label']} (confidence {r['confidence']:.2f}, "
                     f"{r['votes']}/{len(r['neighbours'])} votes){verdict}")
        lines += [f"    {h['score']:.4f}  {h['label']}  {h['path'] or h['id']}" for h in r["neighbours"]]
    summary = recognition_summary(results)
    if summary is not None:
        lines += ["", f"recognised {summary['right']} of {summary['queries']} query images "
                      f"(accuracy {100 * summary['accuracy']:.1f}%; true class = the query's folder)",
                  "confusion (rows: true class, columns: predicted):",
                  format_confusion(summary["classes"], np.asarray(summary["confusion"]))]
    _emit(args, results, "\n".join(lines))
    _html(args, results)
    return 0



def _open_index(args: argparse.Namespace):
    """The index to search: all of it in one process; this rank's rows under torchrun."""
    from .retrieval.index import Index

    if _world() > 1:
        from .retrieval.sharded import DistributedIndex

        return DistributedIndex.open(args.index, device=args.device)
    return Index.load(args.index)


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import format_table

    if args.plots:
        from .report.plots import require_matplotlib

        require_matplotlib()  # before the long evaluation, not after it
    if _world() > 1:  # the same results from shares of the database and a sharded search
        from .distributed_jobs import evaluate_revisited
    else:
        from .pipelines import evaluate_revisited
    net, _ = _network(args)
    results = evaluate_revisited(net, args.datasets, args.data_root, _opts(args), qe_k=args.qe,
                                 qe_alpha=args.qe_alpha, dba_k=args.dba, dba_alpha=args.dba_alpha,
                                 keep_ranks=bool(args.plots))
    if args.plots:
        from .data.revisited import RevisitedDataset
        from .report.plots import write_evaluation_plots

        for name, res in results.items():
            files = write_evaluation_plots(res, RevisitedDataset(name, Path(args.data_root) / name), args.plots,
                                           progress=not args.quiet)
            res["plots"] = [str(f) for f in files]
            del res["ranks"]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=_jsonable))
    text = "\n\n".join(format_table(res, title=name) for name, res in results.items())
    _emit(args, results, text)
    return 0


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return [None if isinstance(x, float) and x != x else x for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


def _models(args: argparse.Namespace) -> int:
    from .models.presets import WEIGHT_PRESETS

    rows = [p.summary() for p in WEIGHT_PRESETS.values()]
    lines = []
    for r in rows:
        acc = ", ".join(f"{k} {v:g}" for k, v in r["accuracy"].items())
        ev = r["eval"]
        setting = (f"--image-size {ev['image_size']} --scales '{format_scales(ev['scales'])}'"
                   + (f" --whitening {ev['whitening']}" if ev["whitening"] else ""))
        lines += [f"{r['name']}  [{'cached' if r['cached'] else 'not cached'}]",
                  f"    {r['architecture']}, {r['dim']}-d, whitening: {r['whitening']}; "
                  f"trained on {r['training_data']}",
                  f"    published: {acc or '-'} ({r['accuracy_source']})",
                  f"    evaluate with: {setting}",
                  f"    {r['url']}" + (f" -> {r['path']}" if r["cached"] else "")]
    _emit(args, rows, "\n".join(lines))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .training import cli as training

    return training.run(args)


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, format_rows, run_bench
    from .ops import set_num_threads

    if args.threads is not None:
        set_num_threads(args.threads)
    cfg = BenchConfig(n=args.n, dim=args.dim, queries=tuple(args.queries), k=args.k, repeat=args.repeat)
    rows = run_bench(cfg, progress=not args.quiet)
    _emit(args, {"config": asdict(cfg), "rows": [asdict(r) for r in rows]}, format_rows(cfg, rows))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve import ServeConfig, require_extras, serve

    require_extras()
    config = ServeConfig(index=args.index, weights=args.weights, device=args.device, image_size=args.image_size,
                         multiscale=args.multiscale, host=args.host, port=args.port, workers=args.workers,
                         threads=args.threads, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                         max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels, max_images=args.max_images,
                         max_k=args.max_k, quiet=args.quiet)
    return serve(config)


def _report(args: argparse.Namespace) -> int:
    from .report.results import load_results, write_report

    results = load_results(args.results)
    out = write_report(results, args.out, truth=_truth(args, results), title=args.title, thumb_size=args.thumb_size,
                       bases=[Path(args.results).resolve().parent], progress=not args.quiet)
    _emit(args, {"out": str(out), "queries": len(results)}, f"wrote {out} ({len(results)} queries)")
    return 0


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


def build_parser(with_training: bool = True) -> argparse.ArgumentParser:
    """The parser; `with_training=False` skips importing torch for the train options."""
    common = _Parser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or log messages")
    net = _Parser(add_help=False)
    net.add_argument("--weights", help="network: a preset name (`pylandmark models` lists them), a directory from "
                                       "`pylandmark train`, a checkpoint file or URL (cirtorch retrieval network "
                                       "or backbone), or 'random' (smoke tests; results mean nothing). "
                                       "Index commands default to the index's own")
    net.add_argument("--device", default="cpu", help=f"{DEVICE_HELP} (default cpu)")
    net.add_argument("--image-size", type=_count(1), help="longer image side in pixels (default 1024, or the index's)")
    net.add_argument("--multiscale", action="store_true", help="scales 1, 1/sqrt 2, 1/2 combined by GeM")
    net.add_argument("--scales", help="image scales, comma-separated, e.g. 1,0.7071,0.5 or 1,sqrt(2),1/sqrt(2) "
                                      "(combined by GeM with the network's p, or averaged with a whitening layer)")
    net.add_argument("--whitening", help="post-hoc whitening: the name of one the network holds (e.g. "
                                         "retrieval-SfM-120k for the cirtorch Lw; ss or ms by the number of scales), "
                                         "a file written by Whitening.save(), or 'none'. Index commands default "
                                         "to the index's own")
    net.add_argument("--batch-size", type=_count(1), default=16)
    net.add_argument("--workers", type=_count(0), default=0, help="image decoding processes (default 0)")
    js = _Parser(add_help=False)
    js.add_argument("--json", action="store_true", help="print JSON instead of text")

    parser = _Parser(prog="pylandmark", description="Landmark recognition by image search.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(container, name: str, help: str, func, parents=(), key: str | None = None):
        p = container.add_parser(name, help=help, parents=[common, *parents], epilog=EXAMPLES.get(key or name),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add(sub, "extract", "describe images, write an (N, D) float16 .npy", _extract, (net, js))
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output .npy (paths go to <out>.paths.txt)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of failing")

    idx = sub.add_parser("index", help="build, grow and inspect an index file").add_subparsers(
        dest="index_command", required=True)
    p = add(idx, "build", "index every image under a folder", _index_build, (net, js), "index build")
    p.add_argument("folder")
    p.add_argument("--out", required=True, help="index file to write (e.g. landmarks.plmi)")
    p.add_argument("--labels-from-folders", action="store_true", help="label = the class folder: DIR/<label>/*.jpg")
    p = add(idx, "add", "add images to an index", _index_add, (net, js), "index add")
    p.add_argument("index")
    p.add_argument("images", nargs="+")
    p.add_argument("--label", help="one label for all added images")
    p.add_argument("--labels-from-folders", action="store_true", help="label = each image's parent folder")
    p = add(idx, "info", "show what an index holds", _index_info, (js,), "index info")
    p.add_argument("index")

    p = add(sub, "search", "the k most similar indexed images for each query image", _search, (net, js))
    p.add_argument("index")
    p.add_argument("images", nargs="+")
    p.add_argument("-k", type=_count(1), default=5)
    p.add_argument("--html", metavar="FILE", help="also write the results as a self-contained HTML page")
    p.add_argument("--truth-from-folders", action="store_true",
                   help="with --html: each query's true label is its folder's name (green/red frames, accuracy)")

    p = add(sub, "recognize", "name the landmark in each query image (top-k vote)", _recognize, (net, js))
    p.add_argument("index")
    p.add_argument("images", nargs="+")
    p.add_argument("-k", type=_count(1), default=5)
    p.add_argument("--vote", choices=("majority", "weighted"), default="majority")
    p.add_argument("--min-score", type=float, help="answer 'unknown' when the best similarity is below this")
    p.add_argument("--html", metavar="FILE", help="also write the results as a self-contained HTML page")
    p.add_argument("--truth-from-folders", action="store_true",
                   help="with --html: each query's true label is its folder's name (green/red frames, accuracy)")

    p = add(sub, "evaluate", "mAP on revisited Oxford / Paris (Easy, Medium, Hard)", _evaluate, (net, js))
    p.add_argument("datasets", nargs="+", choices=("roxford5k", "rparis6k"))
    p.add_argument("--data-root", required=True, help="folder holding <dataset>/gnd_<dataset>.pkl and jpg/")
    p.add_argument("--qe", type=_count(0), default=0, help="alpha query expansion with this many neighbours")
    p.add_argument("--qe-alpha", type=float, default=3.0)
    p.add_argument("--dba", type=_count(0), default=0, help="database-side augmentation with this many neighbours")
    p.add_argument("--dba-alpha", type=float, default=3.0)
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--plots", metavar="DIR", help="also write figures (per-query AP, precision-recall) and a page of "
                                                  "the worst queries here (needs pip install \"pylandmark[plots]\")")

    p = add(sub, "train", "fine-tune on SfM-120k (contrastive loss, hard negatives)", _train)
    if with_training:
        try:
            from .training import cli as training

            training.add_arguments(p)
        except ImportError as err:  # training needs torch; the other commands parse without it
            p.set_defaults(func=lambda a, e=err: _missing(e))

    add(sub, "models", "list the pretrained networks (architecture, accuracy, cache, URL)", _models, (js,))

    p = add(sub, "serve", "answer recognition and search requests over HTTP, with a web page", _serve)
    p.add_argument("index", help="the index file to serve (memory-mapped, shared by the workers)")
    p.add_argument("--weights", help="the network (default: the one the index was built with)")
    p.add_argument("--device", default="cpu", help="cpu or cuda for the network (default cpu)")
    p.add_argument("--image-size", type=int, help="longer image side in pixels (default: the index's)")
    p.add_argument("--multiscale", action="store_true", help="scales 1, 1/sqrt 2, 1/2 combined by GeM")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own network (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: the cores / workers)")
    p.add_argument("--max-batch", type=int, default=16, help="most photos per network call when requests overlap")
    p.add_argument("--batch-wait-ms", type=float, help="wait this long for batch mates (default 2 on cuda, 0 on cpu)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body (default 20 MB)")
    p.add_argument("--max-pixels", type=int, default=64_000_000, help="largest image in pixels (default 64M)")
    p.add_argument("--max-images", type=int, default=16, help="most photos per request (default 16)")
    p.add_argument("--max-k", type=int, default=100, help="largest k a request may ask for (default 100)")

    p = add(sub, "report", "an HTML page of recognize/search results (self-contained)", _report, (js,))
    p.add_argument("results", help="a JSON file written by `pylandmark recognize/search --json`")
    p.add_argument("--out", required=True, help="the .html file to write")
    p.add_argument("--truth-from-folders", action="store_true",
                   help="each query's true label is its folder's name (green/red frames, accuracy, confusion)")
    p.add_argument("--title", help="page title")
    p.add_argument("--thumb-size", type=int, default=160, help="thumbnail size in pixels (default 160)")

    p = add(sub, "bench", "search speed on this machine next to numpy's", _bench, (js,))
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
    distributed = _world() > 1 and command in DISTRIBUTED
    follower = distributed and os.environ.get("RANK", "0") != "0"
    # under torchrun rank 0 speaks for all: the others log errors only (skipped images of
    # every rank are in rank 0's summary)
    logging.basicConfig(level=logging.ERROR if follower or args.quiet else logging.INFO, format="%(message)s")
    if distributed:  # launched by torchrun: join the process group, one device per rank
        from .distributed_jobs import join, leave

        args.device = join(getattr(args, "device", "cpu"))
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            if follower:
                warnings.simplefilter("ignore")
            elif args.quiet:
                from .extraction import SkippedImages  # the per-call report of unreadable images

                warnings.simplefilter("ignore", SkippedImages)
            return _run(args)
    finally:
        if distributed:
            leave()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"pylandmark: warning: {str(message).splitlines()[0] if str(message) else category.__name__}",
          file=sys.stderr)


#: what a user's mistake raises: one line and exit code 2
USER_ERRORS = (ValueError, TypeError, KeyError, ImportError, OSError, NotImplementedError)


def _run(args: argparse.Namespace) -> int:
    name = args.command + (f" {args.index_command}" if getattr(args, "index_command", None) else "")
    try:
        if getattr(args, "device", None) is not None:  # one parser for every command, train included
            from .devices import resolve_device

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


if __name__ == "__main__":
    sys.exit(main())
