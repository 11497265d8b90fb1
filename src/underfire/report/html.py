"""The self-contained HTML page: inline CSS, every picture a base64 data URI, no script.

A report must open from a mail attachment or an archive years later, so nothing is fetched: the
page is one file. Every string that comes from the database is escaped with ``html.escape``.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..data.shapes import SHAPE_CLASSES
from .data import MEASURES, RunData, attack_label, baseline_attack, formatted, gain_key, gained, rounded, summary_key

if TYPE_CHECKING:  # figures (matplotlib) are imported only when a page is drawn
    from .figures import FigureStyle


@dataclass(frozen=True)
class PageOptions:
    """What the page shows: how many images per grid, how large thumbnails are embedded."""

    grid_images: int = 4
    thumbnail_px: int = 128  # shown size of each grid picture (CSS pixels)
    max_embed_px: int = 256  # larger pictures are downscaled before embedding
    figures: FigureStyle | None = None  # None: the default ``FigureStyle``


CSS = """
*{box-sizing:border-box}
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1d2330;
 background:#f4f6f9;margin:0;padding:16px 12px;line-height:1.4;font-size:14px}
h1{margin:0 0 4px;font-size:26px} h2{margin:28px 0 10px;font-size:19px;border-bottom:2px solid #d8dee8;padding-bottom:4px}
h3{margin:18px 0 8px;font-size:15px}
.sub{color:#5b6474;margin:0 0 16px}
.card{background:#fff;border:1px solid #dfe3ea;border-radius:8px;padding:14px 18px;margin:0 0 14px;box-shadow:0 1px 2px rgba(0,0,0,.04)}
.head{display:flex;gap:16px;align-items:stretch;flex-wrap:wrap}
.head>.card{flex:1 1 380px}
pre.config{margin:0;max-height:230px;overflow:auto;font-size:12px;background:#f7f8fb;border:1px solid #e6e9ef;padding:8px;border-radius:4px}
table{border-collapse:collapse}
table.kv td{padding:2px 12px 2px 0;vertical-align:top} table.kv td:first-child{color:#5b6474;white-space:nowrap}
.scroll{overflow-x:auto;max-width:100%}
table.summary{width:100%;background:#fff;font-variant-numeric:tabular-nums;font-size:12px}
table.summary th,table.summary td{border:1px solid #dfe3ea;padding:3px 5px;text-align:right;white-space:nowrap}
table.summary th{background:#eef1f6;text-align:center;font-weight:600;white-space:normal}
.scale{white-space:nowrap} .scale img{vertical-align:middle;border:1px solid #dfe3ea}
table.summary td.text{text-align:left}
table.summary th.pgd,table.summary td.pgd{background:#fbfbfd;color:#444b58}
table.summary td.adv2{background:#fff}
table.summary tr:hover td{background:#f3f7ff}
td.better{background:#dff3e4 !important;font-weight:700;color:#13592b !important}
td.gain{font-weight:600} td.gain.up{color:#13592b} td.gain.down{color:#b3261e}
.badge{display:inline-block;font-size:11px;padding:0 6px;border-radius:8px;background:#fff1c2;color:#7a5a00;margin-left:6px}
.callout{border-left:4px solid #2e8b57;background:#eef8f1;padding:8px 12px;margin:10px 0;border-radius:0 6px 6px 0}
.note{color:#5b6474;font-size:12px}
img.figure{max-width:100%;background:#fff;border:1px solid #dfe3ea;border-radius:6px}
.figrow{display:flex;flex-wrap:wrap;gap:0 32px;align-items:flex-start}
.figsec{flex:0 1 auto;max-width:100%}
.figsec .note{max-width:560px}
table.grid{background:#fff;border:1px solid #dfe3ea}
table.grid th{font-size:12px;background:#eef1f6;padding:4px 6px;font-weight:600}
table.grid th.row{text-align:left;font-weight:normal;font-size:12px;background:#fafbfc;width:150px;vertical-align:middle}
table.grid td{padding:4px 5px;text-align:center;vertical-align:top}
table.grid img{image-rendering:pixelated;border-radius:3px;display:block;margin:0 auto}
.missing{display:flex;align-items:center;justify-content:center;background:#eceff3;color:#8a93a3;font-size:11px;border-radius:3px;margin:0 auto}
.cap{font-size:11px;color:#3a4150;margin-top:2px}
.ok{color:#1f7a3a;font-weight:600} .fail{color:#b3261e;font-weight:600}
footer{margin-top:30px;color:#8a93a3;font-size:12px}
"""


def class_label(model: str, index: int | None) -> str:
    """A class's name where the model's class list is known (the built-in shapes models), else its id."""
    if index is None:
        return "?"
    if model.startswith("shapes-") and 0 <= index < len(SHAPE_CLASSES):
        return SHAPE_CLASSES[index]
    return str(index)


def _joined(words: list[str]) -> str:
    """'A', 'A and B', 'A, B and C'."""
    if len(words) < 2:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _label(attack: str) -> str:
    """An attack's label, escaped for the page (an unregistered attack's name comes from the database)."""
    return escape(attack_label(attack))


def _bound_attacks(run: RunData) -> list[str]:
    """The attacks with transfer cells, in run order."""
    with_cells = {cell["attack"] for cell in run.transfer}
    return [a for a in run.attacks if a in with_cells] + sorted(with_cells - set(run.attacks))


def _intro(attacks: list[str]) -> str:
    """What the run's attacks are, each by its registered description."""
    from ..attacks import ATTACKS

    parts = []
    for attack in attacks:
        known = attack in ATTACKS and ATTACKS.get(attack).description
        parts.append(
            f"{_label(attack)}: {escape(ATTACKS.get(attack).description) if known else 'an attack that is not installed here'}"
        )
    if not parts:
        return "This run has no attack results."
    return (
        "Adversarial examples that change the prediction to a target class; the question is whether the "
        "interpreter's map still looks like the benign one. " + "; ".join(parts) + "."
    )


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _resolve(run_dir: Path, path: str | None) -> Path | None:
    """A picture path of the database, only where it lies inside the run folder: a crafted run
    folder must not pull other local files (``/home/...``, ``../``, links) into a report."""
    if not path:
        return None
    root = run_dir.resolve()
    candidate = (root / path).resolve()  # an absolute ``path`` replaces root here, and is then refused
    return candidate if candidate.is_relative_to(root) else None


def _load_rgb(path: Path | None) -> Image.Image | None:
    if path is None or not path.is_file():
        return None
    try:
        with Image.open(path) as picture:
            return picture.convert("RGB")
    except (OSError, UnidentifiedImageError):
        return None


@dataclass(frozen=True)
class _Embedded:
    """A picture ready for the page: its data URI and pixel size."""

    uri: str
    width: int
    height: int


def _embed_image(picture: Image.Image, max_side: int) -> _Embedded:
    if max(picture.size) > max_side:
        picture = picture.copy()
        picture.thumbnail((max_side, max_side), Image.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return _Embedded(_data_uri(buffer.getvalue()), *picture.size)


def _embed_file(path: Path | None, max_side: int) -> _Embedded | None:
    """A run's picture file: small PNGs are embedded byte for byte (no decode, no re-encode: the
    page's main cost), anything else is decoded, downscaled and re-encoded; None if unreadable."""
    if path is None or not path.is_file():
        return None
    try:
        with Image.open(path) as picture:
            if picture.format == "PNG" and max(picture.size) <= max_side:
                return _Embedded(_data_uri(path.read_bytes()), *picture.size)
            return _embed_image(picture.convert("RGB"), max_side)
    except (OSError, UnidentifiedImageError):
        return None


def _overlay_from_map(map_path: Path | None, base: Image.Image | None) -> Image.Image | None:
    """A jet overlay drawn from the saved .npy map, for rows whose overlay PNG is missing (the map
    alone, enlarged, if the image is missing too)."""
    if map_path is None or not map_path.is_file():
        return None
    try:
        saliency = np.load(map_path, allow_pickle=False).astype(np.float32).squeeze()
    except (OSError, ValueError):
        return None
    if saliency.ndim != 2 or saliency.size == 0:
        return None
    from ..visualize import colorize

    size = base.size if base is not None else (saliency.shape[1] * 8, saliency.shape[0] * 8)
    heat = colorize(np.asarray(Image.fromarray(saliency).resize(size, Image.BILINEAR))).astype(np.float32)
    blended = heat if base is None else 0.5 * np.asarray(base, dtype=np.float32) + 0.5 * heat
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


class _Pictures:
    """Embeds a run's PNG files (and overlays drawn from .npy maps) as data URIs."""

    def __init__(self, run_dir: Path, options: PageOptions) -> None:
        self.run_dir = run_dir
        self.options = options

    def file(self, path: str | None) -> _Embedded | None:
        return _embed_file(_resolve(self.run_dir, path), self.options.max_embed_px)

    def overlay(self, overlay_path: str | None, map_path: str | None, base_path: str | None) -> _Embedded | None:
        """The overlay PNG, or one drawn from the .npy map where the PNG is missing."""
        embedded = self.file(overlay_path)
        if embedded is None:
            base = _load_rgb(_resolve(self.run_dir, base_path))
            drawn = _overlay_from_map(_resolve(self.run_dir, map_path), base)
            embedded = None if drawn is None else _embed_image(drawn, self.options.max_embed_px)
        return embedded

    def tag(self, picture: _Embedded | None, alt: str, placeholder: str = "missing file") -> str:
        size = self.options.thumbnail_px
        if picture is None:
            return f'<div class="missing" style="width:{size}px;height:{size}px">{escape(placeholder)}</div>'
        height = round(size * picture.height / picture.width)
        return f'<img src="{picture.uri}" width="{size}" height="{height}" alt="{escape(alt)}">'


def _header(run: RunData) -> str:
    versions = run.versions
    if isinstance(versions, dict):
        version_text = " · ".join(f"{escape(str(k))} {escape(str(v))}" for k, v in versions.items())
    else:
        version_text = escape(str(versions)) if versions is not None else "—"
    counts = run.counts
    results = counts["results"]
    rows = [
        ("run directory", escape(str(run.run_dir))),
        ("created", escape(run.created or "—")),
        ("versions", version_text),
        ("images", str(counts["images"])),
        ("result rows", " · ".join(f"{_label(a)} {results.get(a, 0)}" for a in run.attacks) or "0"),
        ("transfer rows", str(counts["transfer"])),
        ("cells", f"{len(run.summary)} (model × interpreter × target map)"),
    ]
    settings = _settings_line(run.config)
    if settings:
        rows.insert(0, ("attack settings", settings))
    if run.surrogates:
        attacked = " · ".join(
            f"{_label(attack)} vs {escape(interpreter)}: "
            + ", ".join(f"{escape(str(k))}={escape(str(v))}" for k, v in sorted(options.items()))
            for (attack, interpreter), options in run.surrogates.items()
        )
        rows.insert(
            1 if settings else 0,
            ("attacked surrogates", attacked + " (maps judged with the interpreters' own options)"),
        )
    table = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    config = (
        json.dumps(run.config, indent=2, sort_keys=True, default=str)
        if run.config is not None
        else "no config recorded"
    )
    return (
        f"<h1>underfire report — {escape(run.name)}</h1>"
        f'<p class="sub">{_intro(run.attacks)}</p>'
        '<div class="head">'
        f'<div class="card"><h3 style="margin-top:0">Run</h3><table class="kv">{table}</table></div>'
        f'<div class="card"><h3 style="margin-top:0">Configuration</h3><pre class="config">{escape(config)}</pre></div>'
        "</div>"
    )


def _settings_line(config: Any) -> str:
    """ε, preset, target choice, target maps and seed in words (escaped), from a run's config."""
    experiment = config.get("experiment") if isinstance(config, dict) else None
    if not isinstance(experiment, dict):
        return ""
    parts = []
    eps = experiment.get("eps")
    if isinstance(eps, (int, float)):
        levels = eps * 255
        parts.append(f"ε = {round(levels)}/255" if abs(levels - round(levels)) < 1e-6 else f"ε = {eps:.4g}")
    if "preset" in experiment:
        parts.append(f"preset {experiment['preset']}")
    if "target" in experiment:
        target = experiment["target"]
        parts.append("random target classes (never the true class)" if target == "random" else f"target class {target}")
    if experiment.get("target_maps"):
        parts.append("target maps " + ", ".join(str(t) for t in experiment["target_maps"]))
    if "seed" in experiment:
        parts.append(f"seed {experiment['seed']}")
    return escape(" · ".join(parts))


def _colour_scale() -> str:
    """The overlays' colour scale (jet, low → high importance) as a small embedded picture."""
    from ..visualize import colorize

    ramp = colorize(np.tile(np.linspace(0.0, 1.0, 160), (10, 1)))
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    return (
        '<span class="scale">map: low <img src="'
        + _data_uri(buffer.getvalue())
        + '" width="160" height="10" alt="colour scale from low (blue) to high (red) importance"> high</span>'
    )


def _summary_table(run: RunData) -> str:
    attacks = run.attacks
    base = baseline_attack(attacks)
    compared = gained(attacks)
    base_label = _label(base) if base is not None else ""
    span = len(attacks)
    head_top = '<tr><th rowspan="2">model</th><th rowspan="2">interpreter</th><th rowspan="2">target map</th><th rowspan="2">images</th>'
    if span:
        head_top += "".join(f'<th colspan="{span}">{escape(m.label)}</th>' for m in MEASURES)
    head_top += "".join(
        f'<th rowspan="2">IoU gain<br><span class="note">{_label(attack)} − {base_label}</span></th>'
        for attack in compared
    )
    if span:  # last: the numbers people read come first, within 800 px
        head_top += f'<th colspan="{span}">rows</th>'
    head_top += "</tr>"
    group = "".join(f'<th class="{escape(a)}">{_label(a)}</th>' for a in attacks)
    head_bottom = "<tr>" + group * (1 + len(MEASURES)) + "</tr>"
    body = []
    for row in run.summary:
        counts = [row.get(f"{a}_n") or 0 for a in attacks]
        partial = bool(counts) and (len(set(counts)) > 1 or min(counts) < row["images"])
        badge = (
            '<span class="badge" title="the attacks have different numbers of rows">partial</span>' if partial else ""
        )
        attrs = (
            f'data-model="{escape(row["model"])}" data-interpreter="{escape(row["interpreter"])}" '
            f'data-target-map="{escape(row["target_map"])}"'
        )
        cells = [
            f'<td class="text">{escape(row["model"])}</td>',
            f'<td class="text"><b>{escape(row["interpreter"])}</b></td>',
            f'<td class="text">{escape(row["target_map"])}{badge}</td>',
            f'<td data-key="images">{formatted(row["images"], "count")}</td>',
        ]
        reference = row.get(summary_key("iou", base)) if base is not None else None
        for measure in MEASURES:
            for attack in attacks:
                key = summary_key(measure.column, attack)
                css = escape(attack)
                if measure.column == "iou" and attack in compared:
                    value = row.get(key)
                    if reference is not None and value is not None and value > reference:
                        css += " better"
                cells.append(f'<td class="{css}" data-key="{escape(key)}">{formatted(row.get(key), measure.kind)}</td>')
        for attack in compared:
            key = gain_key(attack, attacks)
            gain = row.get(key)
            sign = "+" if gain is not None and gain > 0 else ""
            trend = "" if gain is None or gain == 0 else (" up" if gain > 0 else " down")
            cells.append(f'<td class="gain{trend}" data-key="{escape(key)}">{sign}{formatted(gain, "number")}</td>')
        cells += [
            f'<td class="{escape(a)}" data-key="{escape(a)}_n">{formatted(row.get(f"{a}_n"), "count")}</td>'
            for a in attacks
        ]
        body.append(f"<tr {attrs}>{''.join(cells)}</tr>")
    callout = ""
    if compared:
        first, key = compared[0], gain_key(compared[0], attacks)
        with_gain = [r for r in run.summary if r.get(key) is not None]
        better = [r for r in with_gain if r[key] > 0]
        if with_gain:
            gains = [r[key] for r in with_gain]
            green = (
                f"{_label(first)} IoU above {base_label} IoU"
                if len(compared) == 1
                else f"an attack's IoU above {base_label} IoU"
            )
            callout = (
                f'<div class="callout">{_label(first)} keeps the map closer to the target map than {base_label} does (higher IoU) in '
                f"<b>{len(better)} of {len(with_gain)}</b> cells; IoU gain from "
                f"{formatted(min(gains), 'number')} to {formatted(max(gains), 'number')}. "
                f"Green cells: {green}.</div>"
            )
    note = (
        '<p class="note">Means over the rows of each cell (SQL AVG), rounded once: success in %, p(target), '
        "map L1 and IoU to 3 decimals, seconds to 2. IoU is the mean over top-k fractions of the adversarial "
        "map against the target map; “IoU, successful” the same over the images whose attack reached the target "
        "class only. “wall s / image” is wall-clock time per image under whatever else ran on the machine, "
        "not a benchmark (benchmarks/ measures speed). “rows” says how many rows each cell has (a partial run has fewer).</p>"
    )
    labels = [_label(a) for a in attacks]
    title = " beside ".join(labels) if len(labels) == 2 else _joined(labels)
    table = f'<div class="scroll"><table class="summary" id="summary"><thead>{head_top}{head_bottom}</thead><tbody>{"".join(body)}</tbody></table></div>'
    return f"<h2>Summary{': ' + title if title else ''}</h2>" + callout + table + note


def _figures(run: RunData, options: PageOptions) -> str:
    from .figures import FigureStyle, iou_curves_figure, transfer_figure

    style = options.figures or FigureStyle()
    parts = []
    if run.curves:
        from .figures import attack_lines

        png = iou_curves_figure(run.curves, style, run.attacks)
        drawn = {curve["attack"] for curve in run.curves}
        lines = ", ".join(
            f"{_label(a)} {line.words}"
            for a, line in attack_lines([*run.attacks, *(c["attack"] for c in run.curves)]).items()
            if a in drawn
        )
        parts.append(
            '<section class="figsec"><h2>IoU against k</h2>'
            '<p class="note">Mean IoU of the top-k % pixels of the adversarial map and the target map; '
            f"{lines}, one colour per interpreter.</p>"
            f'<img class="figure" src="{_data_uri(png)}" alt="IoU against top-k fraction"></section>'
        )
    if run.transfer:
        bound = _bound_attacks(run)
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for cell in run.transfer:
            groups.setdefault((cell["model"], cell["attack"], cell["target_map"]), []).append(cell)
        order = sorted(groups, key=lambda key: (key[0], bound.index(key[1]) if key[1] in bound else len(bound), key[1]))
        several_maps = len({target_map for _, _, target_map in groups}) > 1
        several_attacks = len(set(bound) | {attack for _, attack, _ in groups}) > 1
        panels: dict[str, list[dict[str, Any]]] = {}
        for model, attack, target_map in order:
            title = model + (f" — {attack_label(attack)}" if several_attacks else "")
            title += ("\n" if several_attacks else " — ") + f"target map {target_map}" if several_maps else ""
            panels[title] = groups[(model, attack, target_map)]
        png = transfer_figure(panels, style)
        crafted = _joined([_label(a) for a in dict.fromkeys(attack for _, attack, _ in order)])
        parts.append(
            '<section class="figsec"><h2>Transfer between interpreters</h2>'
            f'<p class="note">Mean IoU of {crafted} examples crafted against the row interpreter, explained by the '
            "column interpreter, with that interpreter's benign map; the diagonal is the attack itself.</p>"
            f'<img class="figure" src="{_data_uri(png)}" alt="transfer matrices"></section>'
        )
    return f'<div class="figrow">{"".join(parts)}</div>' if parts else ""


def _detection(run: RunData, options: PageOptions) -> str:
    """``underfire detect``'s results: ROC curves and, per attack, its success rate undefended and
    the share that also evades the detector (success × (1 − TPR))."""
    if not run.detections:
        return ""
    from ..runs.detect import ANY
    from .figures import FigureStyle, roc_figure

    def success(model: str, attack: str, interpreter: str, target_map: str) -> float | None:
        """The attack's success rate (an ``any`` row's: over its first interpreter's rows, the same images)."""
        if interpreter == ANY:
            interpreter = next(
                (key[1] for key in run.results if (key[0], key[2], key[3]) == (model, attack, target_map)), ANY
            )
        rows = [r for key, r in run.results.items() if key[:4] == (model, interpreter, attack, target_map)]
        return sum(bool(r["success"]) for r in rows) / len(rows) if rows else None

    body = []
    for row in run.detections:
        rate = success(row["model"], row["attack"], row["interpreter"], row["target_map"])
        evades = None if rate is None or row["tpr"] is None else rate * (1 - row["tpr"])
        cells = [
            escape(row["model"]),
            escape(row["detector"]),
            _label(row["attack"]),
            escape(row["interpreter"]),
            escape(row["target_map"]),
            str(row["examples"]),
            *(
                formatted(rounded(value, kind), kind)
                for value, kind in (
                    (row["target_fpr"], "percent"),
                    (row["fpr"], "percent"),
                    (row["tpr"], "percent"),
                    (row["auc"], "number"),
                    (rate, "percent"),
                    (evades, "percent"),
                )
            ),
        ]
        body.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    head = "".join(
        f"<th>{name}</th>"
        for name in (
            "model",
            "detector",
            "attack",
            "against",
            "target map",
            "examples",
            "FPR asked",
            "FPR",
            "TPR",
            "AUC",
            "success (undefended)",
            "success and undetected",
        )
    )
    figure = ""
    if run.roc:
        png = roc_figure(run.roc, options.figures or FigureStyle())
        figure = f'<img class="figure" src="{_data_uri(png)}" alt="ROC curves of the ensemble detector">'
    note = (
        '<p class="note">The ensemble detector (underfire detect) explains each image with several interpreters and scores '
        "their disagreement; its threshold is calibrated on this run's benign images (in-sample) for the asked false-positive "
        "rate. TPR is over the successful adversarial examples; the last column is the attack's success rate times the share "
        "the detector misses.</p>"
    )
    table = f'<div class="scroll"><table class="summary" id="detection"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
    return f'<section class="figsec"><h2>Ensemble detector</h2>{note}{table}{figure}</section>'


def _verdict(row: dict[str, Any], model: str) -> str:
    """Caption of an adversarial image: did it reach the target class, and with what probability."""
    mark = '<span class="ok">✓</span>' if row.get("success") else '<span class="fail">✗</span>'
    confidence = formatted(row.get("confidence"), "number")
    predicted = escape(class_label(model, row.get("predicted_class")))
    return f'<div class="cap">{mark} predicted {predicted}<br>p(target) {confidence}</div>'


def _grid(run: RunData, pictures: _Pictures, model: str, interpreter: str, options: PageOptions) -> str:
    target_maps = run.target_maps(model, interpreter)
    if not target_maps:
        return ""
    target_map = target_maps[0]

    def row_for(attack: str, image: str) -> dict[str, Any] | None:
        return run.results.get((model, interpreter, attack, target_map, image))

    names = {image for (m, i, _, t, image) in run.results if (m, i, t) == (model, interpreter, target_map)}
    position = {name: (run.images.get((model, name)) or {}).get("position") for name in names}
    attacks = run.attacks
    base = baseline_attack(attacks)
    preferred = [a for a in attacks if a != base] + ([base] if base is not None else [])  # whose benign paths to show
    ordered = sorted(
        names,
        key=lambda name: (
            not all(row_for(a, name) for a in attacks),
            position[name] is None,
            position[name] or 0,
            name,
        ),
    )
    chosen = ordered[: options.grid_images]
    labels = ["", "benign image", "benign map"] + [f"{_label(a)} {part}" for a in attacks for part in ("image", "map")]
    header = "".join(f"<th>{label}</th>" for label in labels)
    rows = []
    for name in chosen:
        found = {a: row_for(a, name) for a in attacks}
        any_row = next((found[a] for a in preferred if found[a]), None) or {}
        image_row = run.images.get((model, name)) or {}
        true_class = image_row.get("true_class", any_row.get("true_class"))
        target_class = image_row.get("target_class", any_row.get("target_class"))
        benign_path = image_row.get("image_path")
        label = (
            f'<th class="row"><b>{escape(name)}</b><br>true: {escape(class_label(model, true_class))}'
            f"<br>target: <b>{escape(class_label(model, target_class))}</b></th>"
        )
        benign_overlay = pictures.overlay(
            any_row.get("benign_overlay_path"), any_row.get("benign_map_path"), benign_path
        )
        cells = [
            f"<td>{pictures.tag(pictures.file(benign_path), f'benign {name}')}"
            f'<div class="cap">predicted {escape(class_label(model, true_class))}</div></td>',
            f'<td>{pictures.tag(benign_overlay, f"benign map {name}")}<div class="cap">{escape(interpreter)} map</div></td>',
        ]
        for attack, row in found.items():
            label_attack = attack_label(attack)
            if row is None:
                cells += [f"<td>{pictures.tag(None, '', placeholder=f'{label_attack} not run')}</td>"] * 2
                continue
            adversarial = pictures.file(row.get("adversarial_path"))
            overlay = pictures.overlay(row.get("overlay_path"), row.get("map_path"), row.get("adversarial_path"))
            iou = formatted(row.get("iou"), "number")
            cells.append(f"<td>{pictures.tag(adversarial, f'{label_attack} {name}')}{_verdict(row, model)}</td>")
            cells.append(
                f"<td>{pictures.tag(overlay, f'{label_attack} map {name}')}"
                f'<div class="cap" data-key="{escape(attack)}_iou">IoU {iou}</div></td>'
            )
        rows.append(f"<tr>{label}{''.join(cells)}</tr>")
    shown = f"{len(chosen)} of {len(names)} images"
    return (
        f'<h3>{escape(model)} · {escape(interpreter)} <span class="note">target map {escape(target_map)}, {shown}</span></h3>'
        f'<div class="scroll"><table class="grid" data-model="{escape(model)}" data-interpreter="{escape(interpreter)}">'
        f"<thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _examples_note(attacks: list[str]) -> str:
    shown = (
        f"then the {_joined([_label(a) for a in attacks])} images with their maps for the target class"
        if attacks
        else "no attack results"
    )
    good = " A good attack on the interpretation leaves a map that looks like the benign one."
    predicted = (
        " The model predicts each benign image's class (a run attacks correctly classified images, "
        "or labels image files by the prediction)."
    )
    return f'<p class="note">Per interpreter a few images: the benign image and its map, {shown}.{good}{predicted} {_colour_scale()}</p>'


def render_html(run: RunData, options: PageOptions = PageOptions()) -> str:
    """The whole report page as one string."""
    pictures = _Pictures(run.run_dir, options)
    grids = [
        _grid(run, pictures, model, interpreter, options)
        for model in run.models
        for interpreter in run.interpreters(model)
    ]
    body = (
        _header(run)
        + _summary_table(run)
        + _figures(run, options)
        + _detection(run, options)
        + "<h2>Examples</h2>"
        + _examples_note(run.attacks)
        + "".join(grids)
        + "<footer>Generated by underfire from results.sqlite; self-contained (no external resources).</footer>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>underfire report — {escape(run.name)}</title>"
        f"<style>{CSS}</style></head><body>{body}</body></html>\n"
    )
