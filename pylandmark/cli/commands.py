"""The `pylandmark` sub-commands. Each handler takes the parsed arguments and runs one job of
``args.jobs``: :mod:`pylandmark.pipelines.local` in one process, or
:mod:`pylandmark.pipelines.torchrun` (same names and results) under torchrun, chosen once by
:func:`pylandmark.cli.main`."""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import runtime
from .options import format_scales, parse_scales


def _emit(args: argparse.Namespace, payload, text: str) -> None:
    if runtime.launched_rank() != 0:
        return  # under torchrun only rank 0 prints
    print(json.dumps(payload, indent=1, default=str) if getattr(args, "json", False) else text)


def _network(args: argparse.Namespace, index=None):
    """The network of --weights, or else the one the index names
    (:func:`pylandmark.pipelines.local.network_weights`)."""
    from ..models.pretrained import load_network
    from ..pipelines import network_weights

    weights = network_weights(args.weights, index)
    return load_network(weights, device=args.device, progress=not args.quiet), weights


def _opts(args: argparse.Namespace, index=None):
    from ..extraction import DEFAULT_SCALES_MS, ExtractOptions
    from ..models.pooling import Pooling
    from ..pipelines import index_options

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
    pooling = getattr(args, "pooling", None)
    if pooling is not None:
        common["pooling"] = str(Pooling.parse(pooling, "--pooling"))
    if index is not None:
        opts = index_options(index, image_size=args.image_size, scales=scales, whitening=whitening, **common)
    else:
        opts = ExtractOptions(image_size=1024 if args.image_size is None else args.image_size,
                              scales=scales or (1.0,), whitening=whitening, **common)
    opts.whitening = opts.whitening or None
    return opts


def extract(args: argparse.Namespace) -> int:
    from ..pipelines import expand_images

    images = expand_images(args.images)
    net, _ = _network(args)
    res = args.jobs.extract_to_file(net, images, _opts(args), args.out, skip_bad=args.skip_bad)
    ranks, skipped = res.get("ranks"), res["skipped"]
    payload = {"out": str(res["out"]), "paths": str(res["paths"]), "count": res["count"], "dim": res["dim"],
               "skipped": skipped, **({"ranks": ranks} if ranks else {})}
    where = f"paths in {res['paths']}" + (f"; {len(ranks)} ranks" if ranks else "")
    _emit(args, payload, f"wrote {res['count']} x {res['dim']} float16 descriptors to {res['out']} ({where})"
                         f"{'; skipped ' + str(len(skipped)) if skipped and not ranks else ''}")
    return 0


def whiten(args: argparse.Namespace) -> int:
    images, qidxs, pidxs = args.jobs.whitening_inputs(args.images, pairs_from_folders=args.pairs_from_folders,
                                                      pairs=args.pairs)
    net, _ = _network(args)
    res = args.jobs.whiten_to_file(net, images, _opts(args), args.out, qidxs=qidxs, pidxs=pidxs, kind=args.kind,
                                   dim=args.dim, install=args.install, skip_bad=args.skip_bad)
    pairs = "" if res["pairs"] is None else f" ({res['pairs']} pairs)"
    skipped = f"; skipped {len(res['skipped'])} unreadable" if res["skipped"] else ""
    kept = "all" if res["out_dim"] == res["dim"] else str(res["out_dim"])
    installed = f"; installed as the whitening layer of {res['install']}" if res["install"] is not None else ""
    _emit(args, res, f"learned {res['kind']} whitening of {res['dim']}-d descriptors from {res['descriptors']} "
                     f"images{pairs}{skipped}, keeping {kept} dimensions: wrote {res['out']}{installed}")
    return 0


def index_build(args: argparse.Namespace) -> int:
    net, weights = _network(args)
    res = args.jobs.build_index_file(net, args.folder, _opts(args), args.out,
                                     labels_from_folders=args.labels_from_folders, weights=weights)
    index, skipped, ranks = res["index"], res["skipped"], res.get("ranks")
    if index is None:  # a torchrun rank other than 0
        return 0
    info = {**index.info(), "out": args.out, "skipped": skipped, **({"ranks": ranks} if ranks else {})}
    _emit(args, info, f"indexed {len(index)} images ({info['classes']} classes) into {args.out}"
                      f"{'; skipped ' + str(len(skipped)) if skipped else ''}")
    return 0


def index_add(args: argparse.Namespace) -> int:
    from ..pipelines import check_against_index, expand_images
    from ..retrieval.index import Index

    index = Index.load(args.index, verify=False)  # its network and settings; the job checks every byte
    net, _ = _network(args, index)
    opts = _opts(args, index)
    check_against_index(index, args.weights, opts)
    del index
    res = args.jobs.add_to_index_file(args.index, net, expand_images(args.images), opts, label=args.label,
                                      labels_from_folders=args.labels_from_folders)
    _emit(args, res, f"added {res['added']} images; {args.index} now holds {res['count']}")
    return 0


def index_info(args: argparse.Namespace) -> int:
    from ..retrieval.index import Index

    info = Index.load(args.index, verify=True).info()
    text = "\n".join(f"{k}: {v}" for k, v in info.items())
    _emit(args, info, text)
    return 0


def index_codes(args: argparse.Namespace) -> int:
    res = args.jobs.add_codes_to_index_file(args.index)
    _emit(args, res, f"stored codes for {res['count']} descriptors in {args.index}" if res["updated"]
          else f"{args.index} already holds codes")
    return 0


def search(args: argparse.Namespace) -> int:
    from ..pipelines import check_against_index, expand_images

    index = args.jobs.open_index(args.index, device=args.device)
    net, _ = _network(args, index)
    opts = _opts(args, index)
    check_against_index(index, args.weights, opts)
    results = args.jobs.search_images(index, net, expand_images(args.images), opts, k=args.k,
                                      superglobal=_superglobal(args))
    lines = []
    for r in results:
        lines.append(r["query"])
        lines += [f"  {h['rank']:>3}. {h['score']:.4f}  {h['label'] if h['label'] is not None else '-'}  "
                  f"{h['path'] or h['id']}" for h in r["neighbours"]]
    _emit(args, results, "\n".join(lines))
    _html(args, results)
    return 0


def _superglobal(args: argparse.Namespace) -> dict | None:
    """SuperGlobal's settings from --rerank and its options (None without it)."""
    from .._checks import check_number

    if args.rerank != "superglobal":
        return None
    return {"m": args.rerank_m, "neighbours": args.rerank_neighbours,
            "beta": check_number(args.rerank_beta, "--rerank-beta", minimum=0)}


def _truth(args: argparse.Namespace, results: list) -> list | None:
    """The true labels for a results page: the folder names with --truth-from-folders, else the
    "truth" that recognize put into every result (query photos in class folders), else None."""
    from ..report.results import truth_from_folders

    if args.truth_from_folders:
        return truth_from_folders(results)
    if results and all("truth" in r for r in results):
        return [r["truth"] for r in results]
    return None


def _html(args: argparse.Namespace, results: list) -> None:
    """--html FILE: the results as a self-contained page (thumbnails embedded)."""
    if not getattr(args, "html", None):
        return
    from ..report.results import write_report

    write_report(results, args.html, truth=_truth(args, results), progress=not args.quiet)
    logging.getLogger("pylandmark").info("wrote %s", args.html)


def recognize(args: argparse.Namespace) -> int:
    from ..evaluate import format_confused_pairs, format_confusion
    from ..pipelines import check_against_index, expand_images, recognition_summary

    index = args.jobs.open_index(args.index, device=args.device)
    net, _ = _network(args, index)
    opts = _opts(args, index)
    check_against_index(index, args.weights, opts)
    results = args.jobs.recognize_images(index, net, expand_images(args.images), opts, k=args.k,
                                         vote=args.vote, min_score=args.min_score, superglobal=_superglobal(args))
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
                  *(["confusion (rows: true class, columns: predicted):",
                     format_confusion(summary["classes"], np.asarray(summary["confusion"]))]
                    if summary["confusion"] is not None else
                    [f"most confused ({len(summary['classes'])} classes, too many for a table): count  true -> "
                     "predicted", format_confused_pairs(summary["confused_pairs"])])]
    _emit(args, results, "\n".join(lines))
    _html(args, results)
    return 0



def evaluate(args: argparse.Namespace) -> int:

    if args.plots:
        from ..report.plots import require_matplotlib

        require_matplotlib()  # before the long evaluation, not after it
    net, _ = _network(args)
    results = args.jobs.evaluate_revisited(net, args.datasets, args.data_root, _opts(args), qe_k=args.qe,
                                 qe_alpha=args.qe_alpha, dba_k=args.dba, dba_alpha=args.dba_alpha,
                                 superglobal=_superglobal(args),
                                 keep_ranks=bool(args.plots))
    if args.plots:
        from ..data.revisited import RevisitedDataset
        from ..report.plots import write_evaluation_plots

        for name, res in results.items():
            files = write_evaluation_plots(res, RevisitedDataset(name, args.data_root), args.plots,
                                           progress=not args.quiet)
            res["plots"] = [str(f) for f in files]
            del res["ranks"]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=_jsonable))
    text = "\n\n".join(_evaluation_text(name, res, args.rerank_m) for name, res in results.items())
    _emit(args, results, text)
    return 0


def _evaluation_text(name: str, res: dict, m: int) -> str:
    """A dataset's E/M/H table; with a re-ranking, its table and the two side by side."""
    from ..evaluate import format_comparison, format_table

    text = format_table(res, title=name)
    if "superglobal" in res:
        sg = res["superglobal"]
        text += (f"\n\n{format_table(sg, title=f'{name}, SuperGlobal re-ranking of the top {m}')}"
                 f"\n\n{format_comparison({'plain search': res, f'SuperGlobal M={m}': sg}, title=f'{name}: mAP')}")
    return text


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return [None if isinstance(x, float) and x != x else x for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


def models(args: argparse.Namespace) -> int:
    from ..models.presets import WEIGHT_PRESETS

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


def train(args: argparse.Namespace) -> int:
    from ..training import cli as training

    return training.run(args)


def bench(args: argparse.Namespace) -> int:
    from ..ops import set_num_threads
    from ..retrieval.bench import BenchConfig, format_rows, run_bench

    if args.threads is not None:
        set_num_threads(args.threads)
    cfg = BenchConfig(n=args.n, dim=args.dim, queries=tuple(args.queries), k=args.k, repeat=args.repeat)
    rows = run_bench(cfg, progress=not args.quiet)
    _emit(args, {"config": asdict(cfg), "rows": [asdict(r) for r in rows]}, format_rows(cfg, rows))
    return 0


def serve(args: argparse.Namespace) -> int:
    from ..serve import ServeConfig, require_extras, serve

    require_extras()
    config = ServeConfig(index=args.index, weights=args.weights, device=args.device, image_size=args.image_size,
                         multiscale=args.multiscale, host=args.host, port=args.port, workers=args.workers,
                         threads=args.threads, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                         max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels, max_images=args.max_images,
                         max_k=args.max_k, quiet=args.quiet, allowed_hosts=tuple(args.allowed_host),
                         rerank=args.rerank, rerank_m=args.rerank_m, rerank_neighbours=args.rerank_neighbours,
                         rerank_beta=args.rerank_beta)
    return serve(config)


def report(args: argparse.Namespace) -> int:
    from ..report.results import load_results, write_report

    results = load_results(args.results)
    out = write_report(results, args.out, truth=_truth(args, results), title=args.title, thumb_size=args.thumb_size,
                       bases=[Path(args.results).resolve().parent], progress=not args.quiet)
    _emit(args, {"out": str(out), "queries": len(results)}, f"wrote {out} ({len(results)} queries)")
    return 0
