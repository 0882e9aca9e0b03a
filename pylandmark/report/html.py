"""Building blocks of the self-contained HTML pages: a thumbnail store that embeds each image once
(as a CSS class holding a base64 JPEG), framed tiles, and the page around them.

Every string that reaches the page goes through :func:`esc`; labels and paths come from result
and index files and must not be able to inject markup.
"""
from __future__ import annotations

import html
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from .._files import replaced_atomically
from .._version import __version__
from .thumbs import data_uri, resolve_image, thumbnail_jpeg

__all__ = ["ThumbStore", "esc", "tile", "page", "legend", "write_page", "FRAMES"]

# frame class -> meaning, shown in the legend of pages that use it
FRAMES = {"pos": "correct / positive", "neg": "wrong / negative", "junk": "junk (ignored)",
          "none": "no label"}


def esc(value: object) -> str:
    """HTML-escaped text of any value (quotes too, so it is safe inside attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


class ThumbStore:
    """Thumbnails by source path, each decoded and embedded once however often it is shown.

    Args:
        size: thumbnail box in pixels.
        bases: folders that relative paths are also looked up in (after the working folder).
        max_images: most distinct images embedded; later ones show as placeholders (bounds the
            work and the page size for result files from elsewhere).
    """

    def __init__(self, size: int = 160, bases: Sequence[str | os.PathLike] = (), max_images: int = 2000):
        if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 1024:
            raise ValueError(f"thumb_size must be an int in [16, 1024] (pixels), got {size!r}")
        self.size = size
        self.bases = [Path(b) for b in bases]
        self.max_images = max_images
        self._cls: dict[str, str | None] = {}
        self._css: list[str] = []
        self.missing = 0
        self.over_limit = 0

    def load(self, sources: Iterable[str | None], progress: bool = True) -> None:
        """Thumbnails all sources up front (one progress bar for the page)."""
        todo = list(dict.fromkeys(s for s in sources if s and s not in self._cls))
        for src in tqdm(todo, desc="thumbnails", unit="img", disable=not progress or not todo, leave=False):
            self.css_class(src)

    def css_class(self, source: str | None) -> str | None:
        """The CSS class showing this image, or None when it cannot be shown."""
        if not source:
            return None
        if source in self._cls:
            return self._cls[source]
        cls = None
        if len(self._css) >= self.max_images:
            self.over_limit += 1
        else:
            path = resolve_image(source, self.bases)
            jpeg = thumbnail_jpeg(path, self.size) if path is not None else None
            if jpeg is None:
                self.missing += 1
            else:
                cls = f"t{len(self._css)}"
                self._css.append(f".{cls}{{background-image:url({data_uri(jpeg)})}}")
        self._cls[source] = cls
        return cls

    def style(self) -> str:
        return "\n".join(self._css)


def tile(store: ThumbStore, source: str | None, caption: str, frame: str = "none", *,
         big: bool = False, title: str | None = None, overlay: str = "") -> str:
    """One framed thumbnail with a caption (``caption`` is HTML, already escaped)."""
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {sorted(FRAMES)}, got {frame!r}")
    cls = store.css_class(source)
    name = esc(title if title is not None else (source or ""))
    inner = "" if cls else '<span class="ph">no image</span>'
    return (f'<figure class="tile {frame}{" big" if big else ""}">'
            f'<div class="thumb {cls or "missing"}" role="img" aria-label="{name}" title="{name}">'
            f'{inner}{overlay}</div><figcaption>{caption}</figcaption></figure>')


CSS = """
:root{--pos:#1a7f37;--neg:#cf222e;--junk:#8c959f;--none:#d0d7de;--ink:#1f2328;--mute:#656d76;
--bg:#f6f8fa;--card:#fff;--line:#d8dee4}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);
background:var(--bg)}
header{padding:20px 28px 12px;background:var(--card);border-bottom:1px solid var(--line)}
h1{margin:0 0 4px;font-size:22px;font-weight:600}
h2{font-size:16px;margin:0 0 10px;font-weight:600}
.meta{color:var(--mute);margin:0}
main{padding:18px 28px 40px;max-width:1500px}
section.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:16px 18px;
margin-bottom:18px}
.stats{display:flex;gap:28px;flex-wrap:wrap;align-items:baseline;margin-bottom:8px}
.stat b{font-size:26px;font-weight:600;margin-right:6px}
.legend{display:flex;gap:16px;color:var(--mute);font-size:13px;margin-top:6px;flex-wrap:wrap}
.legend i{display:inline-block;width:12px;height:12px;border-radius:3px;margin-right:5px;vertical-align:-1px}
table.confusion{border-collapse:collapse;font-size:13px;margin-top:8px}
table.confusion th,table.confusion td{border:1px solid var(--line);padding:4px 9px;text-align:right}
table.confusion th{background:var(--bg);font-weight:600}
table.confusion th.corner{text-align:left;color:var(--mute);font-weight:400}
table.confusion td.diag{background:#dafbe1}
table.confusion td.off{background:#ffebe9}
table.confusion td.zero{color:#afb8c1}
.row{display:flex;gap:18px;align-items:flex-start;padding:14px 0;border-top:1px solid var(--line)}
.row:first-of-type{border-top:0}
.answer{width:190px;flex:none;padding-top:4px}
.answer .lab{font-size:18px;font-weight:600;word-break:break-word}
.answer .sub{color:var(--mute);font-size:13px}
.verdict{display:inline-block;margin-top:6px;padding:1px 8px;border-radius:10px;font-size:12px;
font-weight:600;color:#fff}
.verdict.pos{background:var(--pos)}.verdict.neg{background:var(--neg)}
.hits{display:flex;flex-wrap:wrap;gap:10px;margin:0;padding:0;list-style:none}
figure.tile{margin:0;width:128px}
figure.tile.big{width:168px}
.thumb{position:relative;width:128px;height:128px;border-radius:6px;border:4px solid var(--none);
background:#eaeef2 center/contain no-repeat}
.big .thumb{width:168px;height:168px;border-color:#57606a}
.pos .thumb{border-color:var(--pos)}.neg .thumb{border-color:var(--neg)}.junk .thumb{border-color:var(--junk)}
.big.pos .thumb,.big.neg .thumb{border-color:#57606a}
.thumb .ph{position:absolute;inset:0;display:flex;align-items:center;justify-content:center;
color:var(--mute);font-size:12px}
.thumb .box{position:absolute;border:2px solid #ffd33d;box-shadow:0 0 0 1px #0008}
figcaption{font-size:12px;margin-top:3px;line-height:1.3;word-break:break-all}
figcaption .score{font-variant-numeric:tabular-nums;font-weight:600}
figcaption .rank{color:var(--mute);margin-right:4px}
figcaption .name{color:var(--mute)}
.note{color:var(--mute);font-size:13px}
"""


def legend(frames: Sequence[str]) -> str:
    """A colour legend for the frame classes used on the page."""
    items = "".join(f'<span><i style="background:var(--{f})"></i>{esc(FRAMES[f])}</span>' for f in frames)
    return f'<div class="legend">{items}</div>'


def page(title: str, subtitle: str, body: str, store: ThumbStore) -> str:
    """The whole document: no external resources, so it opens anywhere without a network."""
    notes = []
    if store.missing:
        notes.append(f"{store.missing} image(s) could not be read and show as placeholders.")
    if store.over_limit:
        notes.append(f"{store.over_limit} image(s) beyond the {store.max_images} embedded show as placeholders.")
    note = "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<meta name="generator" content="pylandmark {esc(__version__)}">'
            f"<title>{esc(title)}</title><style>{CSS}\n{store.style()}</style></head>\n"
            f'<body><header><h1>{esc(title)}</h1><p class="meta">{subtitle}</p></header>\n'
            f"<main>{note}{body}</main></body></html>\n")


def write_page(out: str | os.PathLike, text: str) -> Path:
    """Writes a page to ``out`` through a temporary file in the same folder, then a rename."""
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; name the .html file to write")
    with replaced_atomically(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out


