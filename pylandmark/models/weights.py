"""Loading pretrained backbone weights from timm, torchvision or cirtorch checkpoints."""
from __future__ import annotations

import hashlib
import logging
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import download
from ..data.download import URL_SCHEMES, digest_mismatch, sha256sum
from .landmarknet import LandmarkNet
from .presets import checkpoints_dir, hub_hash
from .serialization import read_state_dict

__all__ = ["load_backbone_weights", "LoadReport", "sha256sum", "url_cache_path"]

logger = logging.getLogger(__name__)

#: prefixes that wrap a whole model (DataParallel, torch.compile, our LandmarkNet, detection
#: frameworks); stripped until a key matches the model
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.", "encoder.", "body.", "net.")
#: keys of classifiers and retrieval heads that a backbone does not hold
_HEAD_PREFIXES = ("head.", "fc.", "classifier.", "last_linear.", "pool.", "whiten.", "lwhiten.",
                  "norm.", "meta.")
#: where trainers nest the state dict inside a checkpoint dict
_NESTED = ("state_dict", "model", "state_dict_ema", "model_state", "model_state_dict", "net")


@dataclass
class LoadReport:
    """What :func:`load_backbone_weights` did.

    Attributes:
        source: the file, URL or "<dict>" the weights came from.
        loaded: model keys that received a tensor.
        missing: model keys with no tensor in the checkpoint (BatchNorm ``num_batches_tracked``
            excepted: it keeps its value).
        unexpected: checkpoint keys (as written there) that match no model key.
        mismatched: ``(model key, checkpoint shape, model shape)`` for keys with the wrong shape.
        dropped: checkpoint keys of classifiers / retrieval heads, left out on purpose.
        renamed: number of checkpoint keys whose prefix was rewritten to match the model.
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    renamed: int = 0

    @property
    def ok(self) -> bool:
        """True when every model key was loaded and nothing unexpected was found."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        def some(keys: list[Any], n: int = 8) -> str:
            s = ", ".join(str(k) for k in keys[:n])
            return s + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")

        lines = [f"loaded {len(self.loaded)} tensors from {self.source}"
                 + (f" ({self.renamed} keys renamed)" if self.renamed else "")]
        if self.dropped:
            lines.append(f"dropped {len(self.dropped)} head/classifier keys: {some(self.dropped)}")
        lines.append(f"missing {len(self.missing)}: {some(self.missing) or 'none'}")
        lines.append(f"unexpected {len(self.unexpected)}: {some(self.unexpected) or 'none'}")
        if self.mismatched:
            lines.append(f"shape mismatch {len(self.mismatched)}: "
                         + some([f"{k} checkpoint {tuple(a)} vs model {tuple(b)}"
                                 for k, a, b in self.mismatched]))
        return "\n".join(lines)


def _check_sha256_arg(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{8,64}", sha256):
        raise ValueError(f"sha256 must be a hex digest (8 to 64 hex digits; a prefix is enough), "
                         f"got {sha256!r}")
    return sha256.lower()


def _verify(path: Path, sha256: str | None) -> None:
    bad = digest_mismatch(path, {"sha256": sha256})
    if bad is not None:
        raise ValueError(f"sha256 mismatch: {bad}; the file is corrupt or not the one expected: delete it "
                         "and fetch it again")


def url_cache_path(url: str, cache: str | Path | None = None) -> Path:
    """Where the file of a weights URL is kept once downloaded (``cache``: default
    ``pylandmark.data.download.cache_dir() / "checkpoints"``).

    The cache is keyed by the URL, so two URLs that end in the same file name (another host,
    another path) never share a file: ``<cache>/by-url/<first 16 hex digits of the URL's
    SHA-256>/<file name>``. A file name that carries the start of its SHA-256 (torch.hub and
    cirtorch style, ``name-<hex>.pth``; see :func:`~pylandmark.models.presets.hub_hash`) is kept
    as ``<cache>/<file name>``, where the weight presets' files are too: its bytes are checked
    against that hash after the download and on every load, so the name is key enough.
    """
    root = Path(cache).expanduser() if cache is not None else checkpoints_dir()
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    if name in ("", ".", ".."):
        name = "weights.bin"
    if hub_hash(url) is not None:
        return root / name
    return root / "by-url" / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def _url_mismatch(path: Path, sha256: str | None, hub: str | None) -> str | None:
    """Checks a downloaded file against the caller's sha256 and the hash in its name."""
    for want, what in ((sha256, "the sha256 given"), (hub, "the hash in the URL's file name")):
        bad = digest_mismatch(path, {"sha256": want})
        if bad is not None:
            return f"{bad} ({what})"
    return None


def _fetch_url(url: str, sha256: str | None, cache: str | Path | None, progress: bool) -> Path:
    dest = url_cache_path(url, cache)
    hub = hub_hash(url)
    if dest.is_file():
        bad = _url_mismatch(dest, sha256, hub)
        if bad is None:
            logger.info("using cached %s (from %s)", dest, url)
            return dest
        logger.warning("cached %s does not match: %s; downloading it again", dest, bad)
        dest.unlink()
    full = sha256 if sha256 is not None and len(sha256) == 64 else None
    try:
        path = Path(download.download_url(url, dest, sha256=full, progress=progress))
    except OSError as err:
        hint = "" if str(dest) in str(err) else (
            f" Without network access, fetch the file elsewhere and put it at {dest}")
        raise OSError(f"load_backbone_weights: could not download {url}: {err}.{hint} "
                      "(or pass the file's local path as source)") from err
    bad = _url_mismatch(path, sha256, hub)
    if bad is not None:
        path.unlink(missing_ok=True)
        raise ValueError(f"sha256 mismatch: the file downloaded from {url} is not the one expected: {bad}; "
                         "deleted it, nothing was cached")
    return path


def _resolve(source: str | Path, sha256: str | None, cache: str | Path | None, progress: bool) -> Path:
    """The local file of a weights source: a path (checked against ``sha256``), or a URL fetched
    into the cache (see :func:`url_cache_path`) unless already there."""
    s = str(source)
    if s.startswith(URL_SCHEMES):
        return _fetch_url(s, sha256, cache, progress)
    path = Path(s).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"source: no checkpoint file at {path}; pass an existing file or an "
                                "http(s):// or file:// URL")
    _verify(path, sha256)
    return path


def _unwrap(obj: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """Finds the ``{name: tensor}`` dict inside a trainer checkpoint."""
    for _ in range(3):
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _NESTED if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"{source} holds no tensors (top-level keys {sorted(obj)[:10]}); expected a "
                             "state_dict or a checkpoint with a 'state_dict' / 'model' entry")
        obj = inner
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _rename(key: str, targets: Mapping[str, Any], cirtorch: tuple[str, ...]) -> str:
    name = key
    while name not in targets:
        pre = next((p for p in _WRAPPER_PREFIXES if name.startswith(p)), None)
        if pre is None:
            break
        name = name[len(pre):]
    if name not in targets and cirtorch and name.startswith("features."):
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) < len(cirtorch):
            name = f"{cirtorch[int(parts[1])]}.{parts[2]}"
    return name


def load_backbone_weights(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor],
                          sha256: str | None = None, *, strict: bool = True,
                          cache_dir: str | Path | None = None, progress: bool = True) -> LoadReport:
    """Loads pretrained weights into a backbone (or into ``model.backbone`` of a LandmarkNet).

    Key prefixes of timm (``stem.``, ``stages.``), torchvision (``conv1``, ``layer1`` ...),
    DataParallel (``module.``), wrappers (``backbone.``, ``model.``) and cirtorch
    (``features.<i>.``) are mapped to the model's names; classifier and retrieval-head keys
    (``head.fc``, ``fc``, ``pool.p``, ``whiten``...) are dropped unless the model has them.
    Checkpoints nested under ``state_dict`` / ``model`` are unwrapped.

    Args:
        model: a :class:`~pylandmark.models.LandmarkNet` or a bare backbone module.
        source: a local ``.safetensors`` / torch file, an ``http(s)://`` or ``file://`` URL
            (downloaded once into ``cache_dir``, default ``pylandmark.data.download.cache_dir() /
            "checkpoints"``, at :func:`url_cache_path`: one file per URL), or a ``{name: tensor}``
            dict.
        sha256: expected SHA-256 of the file (a prefix of >= 8 hex digits is enough). A URL whose
            file name carries a hash (``name-<hex>.pth``) is also checked against that.
        strict: raise ValueError (and load nothing) when keys are missing, unexpected or of the
            wrong shape; with False, load what matches and log a warning.
        cache_dir: where downloads go.
        progress: show a download progress bar.

    Returns:
        a :class:`LoadReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    target = model.backbone if isinstance(model, LandmarkNet) else model
    sha = _check_sha256_arg(sha256)
    if isinstance(source, Mapping):
        if sha is not None:
            raise ValueError("sha256 applies to files and URLs, not to an in-memory state dict")
        name, raw = "<dict>", _unwrap(source, "source")
    elif isinstance(source, (str, Path)):
        path = _resolve(source, sha, cache_dir, progress)
        name, raw = str(path), _unwrap(read_state_dict(path), str(path))
    else:
        raise TypeError(f"source must be a path, a URL or a dict of tensors, got {type(source).__name__}")

    own = target.state_dict()
    cirtorch = tuple(getattr(target, "cirtorch_features", ()))
    report = LoadReport(source=name)
    new_state: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        mapped = _rename(key, own, cirtorch)
        if mapped in own and mapped not in new_state:
            if tuple(tensor.shape) != tuple(own[mapped].shape):
                report.mismatched.append((mapped, tuple(tensor.shape), tuple(own[mapped].shape)))
                continue
            new_state[mapped] = tensor
            report.renamed += mapped != key
        elif mapped.startswith(_HEAD_PREFIXES) or mapped == "meta":
            report.dropped.append(key)
        else:
            report.unexpected.append(key)
    report.loaded = [k for k in own if k in new_state]
    report.missing = [k for k in own if k not in new_state and not k.endswith("num_batches_tracked")]
    if not report.ok:
        if strict:
            raise ValueError(f"load_backbone_weights: checkpoint does not fit {type(target).__name__} "
                             f"(pass strict=False to load the matching part):\n{report}")
        logger.warning("partial load into %s:\n%s", type(target).__name__, report)
    if not report.loaded:
        raise ValueError(f"load_backbone_weights: no key of {name} matches {type(target).__name__}; is it "
                         f"a checkpoint for another architecture?\n{report}")
    target.load_state_dict(new_state, strict=False)
    logger.info("%s", report)
    return report
