"""The `pylandmark` command. Each sub-command parses its options and calls one library function."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

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
                "  pylandmark evaluate roxford5k --weights model_dir/ --data-root data/ --multiscale --qe 2",
    "train": "examples:\n  pylandmark train --data-root sfm120k/ --out runs/csp --preset cspdarknet53-gem\n"
             "  pylandmark train --data-root sfm120k/ --out runs/csp --resume",
    "bench": "examples:\n  pylandmark bench\n  pylandmark bench --n 1000000 --queries 1 64 --k 100 --json",
}
MULTISCALE = (1.0, 2 ** -0.5, 0.5)


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


def _network(args: argparse.Namespace, default: str | None = None):
    from .models.pretrained import load_network

    weights = args.weights or default
    if not weights:
        raise ValueError("--weights is required (a directory from `pylandmark train`, a checkpoint file or URL, "
                         "a preset name, or 'random' for a smoke test)")
    return load_network(weights, device=args.device, progress=not args.quiet), weights


def _opts(args: argparse.Namespace, index=None):
    from .pipelines import ExtractOptions, index_options

    scales = MULTISCALE if getattr(args, "multiscale", False) else None
    common = dict(batch_size=args.batch_size, num_workers=args.workers, device=args.device, progress=not args.quiet)
    if index is not None:
        return index_options(index, image_size=args.image_size, scales=scales, **common)
    return ExtractOptions(image_size=args.image_size or 1024, scales=scales or (1.0,), **common)


def _extract(args: argparse.Namespace) -> int:
    from .pipelines import describe, expand_images

    images = expand_images(args.images)
    net, _ = _network(args)
    if _world() > 1:
        from .distributed_jobs import extract_to_file, npy_path

        res = extract_to_file(net, images, _opts(args), args.out, skip_bad=args.skip_bad)
        listing = Path(args.out).with_suffix(".paths.txt")
        payload = {"out": str(args.out), "paths": str(listing), "count": res["count"], "dim": res["dim"],
                   "skipped": res["skipped"], "ranks": res["ranks"]}
        _emit(args, payload, f"wrote {res['count']} x {res['dim']} float16 descriptors to {npy_path(args.out)} "
                             f"(paths in {listing}; {len(res['ranks'])} ranks)")
        return 0
    desc, kept, skipped = describe(net, images, _opts(args), skip_bad=args.skip_bad)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, desc)
    listing = out.with_suffix(".paths.txt")
    listing.write_text("".join(f"{p}\n" for p in kept))
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
    from .retrieval.index import Index
    from .retrieval.manifest import ShardedIndex
    from .pipelines import add_images, check_against_index, expand_images

    index = Index.load(args.index, verify=_world() == 1)
    net, _ = _network(args, index.metadata.get("weights"))
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
    net, _ = _network(args, index.metadata.get("weights"))
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
    return 0


def _recognize(args: argparse.Namespace) -> int:
    from .evaluate import format_confusion
    from .pipelines import check_against_index, expand_images, recognition_summary

    if _world() > 1:  # the same results from a sharded search
        from .distributed_jobs import recognize_images
    else:
        from .pipelines import recognize_images
    index = _open_index(args)
    net, _ = _network(args, index.metadata.get("weights"))
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

    if _world() > 1:  # the same results from shares of the database and a sharded search
        from .distributed_jobs import evaluate_revisited
    else:
        from .pipelines import evaluate_revisited
    net, _ = _network(args)
    results = evaluate_revisited(net, args.datasets, args.data_root, _opts(args), qe_k=args.qe,
                                 qe_alpha=args.qe_alpha, dba_k=args.dba, dba_alpha=args.dba_alpha)
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


def _train(args: argparse.Namespace) -> int:
    from .training import loop as training

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


def build_parser(with_training: bool = True) -> argparse.ArgumentParser:
    """The parser; `with_training=False` skips importing torch for the train options."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or log messages")
    net = argparse.ArgumentParser(add_help=False)
    net.add_argument("--weights", help="network: a directory from `pylandmark train`, a checkpoint file or URL, "
                                       "a preset name, or 'random' (smoke tests; results mean nothing). "
                                       "Index commands default to the index's own")
    net.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    net.add_argument("--image-size", type=int, help="longer image side in pixels (default 1024, or the index's)")
    net.add_argument("--multiscale", action="store_true", help="scales 1, 1/sqrt 2, 1/2 combined by GeM")
    net.add_argument("--batch-size", type=int, default=16)
    net.add_argument("--workers", type=int, default=0, help="image decoding processes (default 0)")
    js = argparse.ArgumentParser(add_help=False)
    js.add_argument("--json", action="store_true", help="print JSON instead of text")

    parser = argparse.ArgumentParser(prog="pylandmark", description="Landmark recognition by image search.")
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
    p.add_argument("-k", type=int, default=5)

    p = add(sub, "recognize", "name the landmark in each query image (top-k vote)", _recognize, (net, js))
    p.add_argument("index")
    p.add_argument("images", nargs="+")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--vote", choices=("majority", "weighted"), default="majority")
    p.add_argument("--min-score", type=float, help="answer 'unknown' when the best similarity is below this")

    p = add(sub, "evaluate", "mAP on revisited Oxford / Paris (Easy, Medium, Hard)", _evaluate, (net, js))
    p.add_argument("datasets", nargs="+", choices=("roxford5k", "rparis6k"))
    p.add_argument("--data-root", required=True, help="folder holding <dataset>/gnd_<dataset>.pkl and jpg/")
    p.add_argument("--qe", type=int, default=0, help="alpha query expansion with this many neighbours")
    p.add_argument("--qe-alpha", type=float, default=3.0)
    p.add_argument("--dba", type=int, default=0, help="database-side augmentation with this many neighbours")
    p.add_argument("--dba-alpha", type=float, default=3.0)
    p.add_argument("--out", help="also write the results as JSON here")

    p = add(sub, "train", "fine-tune on SfM-120k (contrastive loss, hard negatives)", _train)
    if with_training:
        try:
            from .training import loop as training

            training.add_arguments(p)
        except ImportError as err:  # training needs torch; the other commands parse without it
            p.set_defaults(func=lambda a, e=err: _missing(e))

    p = add(sub, "bench", "search speed on this machine next to numpy's", _bench, (js,))
    p.add_argument("--n", type=int, default=200_000, help="database rows (default 200000)")
    p.add_argument("--dim", type=int, default=1024, help="descriptor length (default 1024)")
    p.add_argument("--queries", type=int, nargs="+", default=[1, 64, 1024], help="query batch sizes")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--repeat", type=int, default=5, help="timed runs per size (median reported)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    return parser


def _missing(err: Exception) -> int:
    raise ImportError(f"this command needs torch ({err}); pip install torch")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(with_training=bool(argv) and argv[0] == "train")
    args = parser.parse_args(argv)
    command = args.command + (f" {args.index_command}" if getattr(args, "index_command", None) else "")
    distributed = _world() > 1 and command in DISTRIBUTED
    follower = distributed and os.environ.get("RANK", "0") != "0"
    # under torchrun rank 0 speaks for all: the others log errors only (skipped images of
    # every rank are in rank 0's summary)
    level = logging.ERROR if follower else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
    if distributed:  # launched by torchrun: join the process group, one device per rank
        from .distributed_jobs import join, leave

        args.device = join(getattr(args, "device", "cpu"))
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            if follower:
                warnings.simplefilter("ignore")
            return _run(args)
    finally:
        if distributed:
            leave()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"pylandmark: warning: {message}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except (ValueError, TypeError, KeyError, ImportError, OSError, NotImplementedError) as err:
        name = args.command + (f" {args.index_command}" if getattr(args, "index_command", None) else "")
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"pylandmark {name}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
