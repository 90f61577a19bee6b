"""Evaluation tables (Markdown + CSV, mean ± sd per dataset and method, as Tables III-V) and comparison panels
(Figs. 9 and 13).

Input rows are per-slice results: ``{"method", "dataset", "case_id", "psnr", "ssim", "lpips", "seconds"}`` with
``lpips`` None when the AlexNet backbone is missing (``metrics.lpips.lpips_available``). Conventions:

* mean ± sd over the slices of a (dataset, method) group; sd is the sample standard deviation (ddof = 1), not
  defined for one slice (shown without ±, empty in the CSV);
* LPIPS is shown x 100 (:data:`dudocrop.metrics.perceptual.LPIPS_SCALE`, as in Tables III-V); a group whose
  rows have no LPIPS shows ``unavailable`` (never a number from a random backbone), and mixing present and
  absent LPIPS in one group is an error;
* PI_q / PI_s (Eq. 18-19) are per (dataset, method), passed separately: a value, None (``unavailable``) or not
  given (``—``, not evaluated);
* the best mean per dataset is bold in the Markdown table (PSNR and SSIM highest, LPIPS and PI lowest);
* files are written atomically (a temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dudocrop.atomic import write_text
from dudocrop.metrics.image import CT_RANGE_HU, DISPLAY_WINDOW_HU, ERROR_WINDOW_HU, image_metrics, psnr, ssim
from dudocrop.metrics.perceptual import LPIPS_SCALE
from dudocrop.viz import save_panel

__all__ = ["PANEL_LEGEND", "ROW_FIELDS", "Stat", "SummaryRow", "comparison_panel", "format_csv", "format_markdown",
           "score_rows", "summarize", "write_tables"]

#: The fields of a per-slice result row.
ROW_FIELDS = ("method", "dataset", "case_id", "psnr", "ssim", "lpips", "seconds")
#: Optional fields of a row: RMSE in HU and the measured-data consistency score (dudocrop.metrics.consistency,
#: against NMAR's image: about 1 for an image the measured rays support); a column appears when a group has them.
OPTIONAL_FIELDS = ("rmse", "consistency")
UNAVAILABLE = "unavailable"
#: What the numbers under each panel image are (the paper's figure captions say the same).
PANEL_LEGEND = "PSNR (dB) / SSIM / LPIPS×100 (LPIPS only when the AlexNet backbone is available)"
NOT_EVALUATED = "—"


@dataclass(frozen=True)
class Stat:
    """Mean and sample sd (None for one value) of a metric over a group's slices."""

    mean: float
    sd: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        v = np.asarray(values, dtype=np.float64)
        mean = float(v.mean())
        if v.size < 2:
            return cls(mean, None, int(v.size))
        sd = float(v.std(ddof=1)) if np.isfinite(v).all() else math.nan  # +inf PSNR (identical images)
        return cls(mean, sd, int(v.size))


@dataclass(frozen=True)
class SummaryRow:
    """One (dataset, method) line of the tables; ``lpips`` is raw LPIPS (None: unavailable); ``pi_q`` /
    ``pi_s`` hold a value, None (unavailable) or :data:`NOT_EVALUATED`."""

    dataset: str
    method: str
    n: int
    psnr: Stat
    ssim: Stat
    lpips: Stat | None
    seconds: Stat
    pi_q: float | None | str = NOT_EVALUATED
    pi_s: float | None | str = NOT_EVALUATED
    rmse: Stat | None = None
    consistency: Stat | None = None


def _num(v, name: str, i: int, *, allow_inf: bool = False, lo: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
        raise ValueError(f"rows[{i}].{name} must be a number, got {v!r}")
    v = float(v)
    if math.isnan(v) or (math.isinf(v) and not (allow_inf and v > 0)):
        raise ValueError(f"rows[{i}].{name} must be finite{' or +inf' if allow_inf else ''}, got {v!r}")
    if lo is not None and v < lo:
        raise ValueError(f"rows[{i}].{name} must be >= {lo}, got {v!r}")
    return v


def _check_rows(rows) -> list[dict]:
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence) or len(rows) == 0:
        raise ValueError("rows must be a non-empty sequence of per-slice result mappings with fields "
                         f"{', '.join(ROW_FIELDS)}")
    out, seen = [], set()
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise ValueError(f"rows[{i}] must be a mapping with fields {', '.join(ROW_FIELDS)}, got {type(r).__name__}")
        missing = [f for f in ROW_FIELDS if f not in r]
        if missing:
            raise ValueError(f"rows[{i}] lacks field(s) {missing}; expected {', '.join(ROW_FIELDS)}")
        for f in ("method", "dataset"):
            if not (isinstance(r[f], str) and r[f]):
                raise ValueError(f"rows[{i}].{f} must be a non-empty str, got {r[f]!r}")
        key = (r["dataset"], r["method"], str(r["case_id"]))
        if key in seen:
            raise ValueError(f"rows[{i}] repeats (dataset, method, case_id) = {key}")
        seen.add(key)
        out.append({
            "method": r["method"], "dataset": r["dataset"], "case_id": str(r["case_id"]),
            "psnr": _num(r["psnr"], "psnr", i, allow_inf=True), "ssim": _num(r["ssim"], "ssim", i),
            "lpips": None if r["lpips"] is None else _num(r["lpips"], "lpips", i, lo=0.0),
            "seconds": _num(r["seconds"], "seconds", i, lo=0.0),
            **{f: _num(r[f], f, i, lo=0.0) for f in OPTIONAL_FIELDS if r.get(f) is not None},
        })
    return out


def _pi_value(pi, key, name):
    if pi is None or key not in pi:
        return NOT_EVALUATED
    entry = pi[key]
    if not isinstance(entry, Mapping):
        raise ValueError(f"pi[{key!r}] must be a mapping with 'pi_q' / 'pi_s', got {type(entry).__name__}")
    v = entry.get(name, NOT_EVALUATED)
    if v is None or v == NOT_EVALUATED:
        return v
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"pi[{key!r}][{name!r}] must be a finite number or None, got {v!r}")
    return float(v)


def summarize(rows: Sequence[Mapping], pi: Mapping[tuple[str, str], Mapping[str, float | None]] | None = None
              ) -> list[SummaryRow]:
    """Group per-slice ``rows`` by (dataset, method) in order of first appearance; ``pi`` maps (dataset,
    method) to ``{"pi_q": value | None, "pi_s": value | None}``."""
    checked = _check_rows(rows)
    if pi is not None and not isinstance(pi, Mapping):
        raise ValueError(f"pi must be a mapping (dataset, method) -> {{'pi_q', 'pi_s'}}, got {type(pi).__name__}")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in checked:
        groups.setdefault((r["dataset"], r["method"]), []).append(r)
    out = []
    for (ds, m), g in groups.items():
        lp = [r["lpips"] for r in g]
        if any(v is None for v in lp) and not all(v is None for v in lp):
            raise ValueError(f"rows of (dataset={ds!r}, method={m!r}) mix LPIPS values and None: LPIPS must be "
                             "computed for every slice of a group or for none")
        out.append(SummaryRow(
            ds, m, len(g), Stat.of([r["psnr"] for r in g]), Stat.of([r["ssim"] for r in g]),
            None if lp[0] is None else Stat.of(lp), Stat.of([r["seconds"] for r in g]),
            _pi_value(pi, (ds, m), "pi_q"), _pi_value(pi, (ds, m), "pi_s"),
            *(Stat.of([r[f] for r in g]) if all(f in r for r in g) else None for f in OPTIONAL_FIELDS)))
    return out


def score_rows(method: str, dataset: str, case_ids: Sequence, x, ref, metal_mask=None, seconds=0.0,
               lpips: Callable | None = None, roi=None, window: tuple[float, float] = CT_RANGE_HU,
               consistency=None) -> list[dict]:
    """Per-slice rows for :func:`summarize` from a batch: ``x`` the method's (N, 1, H, W) HU output, ``ref`` the
    metal-free reference, PSNR / SSIM by ``metrics.image_metrics`` in ``window`` outside ``metal_mask`` (inside
    ``roi``), LPIPS by ``lpips`` (e.g. ``metrics.LPIPSMetric()``; None: unavailable) on the same pixels: its mask
    argument (pixels of ``x`` that take the reference's values) is the metal plus everything outside ``roi``;
    ``seconds`` per slice, one number for all or one per slice. Rows also hold ``rmse`` (HU, unclipped, same
    pixels) and, when given (one per slice), the ``consistency`` scores."""
    if not (isinstance(method, str) and method and isinstance(dataset, str) and dataset):
        raise ValueError(f"method and dataset must be non-empty str, got {method!r} and {dataset!r}")
    m = image_metrics(x, ref, metal_mask, roi, window)
    n = m["psnr"].shape[0]
    if isinstance(case_ids, str) or not isinstance(case_ids, Sequence) or len(case_ids) != n:
        raise ValueError(f"case_ids must be a sequence with one id per slice ({n}), got {case_ids!r}")
    secs = list(seconds) if isinstance(seconds, Sequence | np.ndarray) else [seconds] * n
    if len(secs) != n:
        raise ValueError(f"seconds must be one number or one per slice ({n}), got {len(secs)}")
    outside = metal_mask
    if roi is not None:
        out_roi = ~torch.as_tensor(roi, device=x.device).bool().expand_as(x)
        outside = out_roi if metal_mask is None else (torch.as_tensor(metal_mask, device=x.device) > 0) | out_roi
    lp = None if lpips is None else torch.as_tensor(lpips(x, ref, outside)).reshape(-1).tolist()
    cons = None if consistency is None else torch.as_tensor(consistency).reshape(-1).tolist()
    if cons is not None and len(cons) != n:
        raise ValueError(f"consistency must hold one score per slice ({n}), got {len(cons)}")
    return [{"method": method, "dataset": dataset, "case_id": str(case_ids[i]), "psnr": float(m["psnr"][i]),
             "ssim": float(m["ssim"][i]), "lpips": None if lp is None else float(lp[i]), "seconds": float(secs[i]),
             "rmse": float(m["rmse"][i]), **({} if cons is None else {"consistency": float(cons[i])})}
            for i in range(n)]


# ---- formatting ----------------------------------------------------------------------------------------

_DIGITS = {"psnr": 2, "ssim": 3, "lpips": 2, "seconds": 2, "pi": 2}


def _fmt(x: float, d: int) -> str:
    return "inf" if math.isinf(x) else f"{x:.{d}f}"


def _fmt_stat(s: Stat | None, d: int, scale: float = 1.0) -> str:
    if s is None:
        return UNAVAILABLE
    m = _fmt(s.mean * scale, d)
    if s.sd is None or not math.isfinite(s.sd) or math.isinf(s.mean):
        return m
    return f"{m} ± {_fmt(s.sd * scale, d)}"


def _fmt_pi(v) -> str:
    if v is None:
        return UNAVAILABLE
    if v == NOT_EVALUATED:
        return NOT_EVALUATED
    return _fmt(v, _DIGITS["pi"])


def _best(summary: list[SummaryRow]) -> set[tuple[str, str, str]]:
    """(dataset, method, column) of each dataset's best mean."""
    best = set()
    cols = {"psnr": (max, lambda r: r.psnr.mean), "ssim": (max, lambda r: r.ssim.mean),
            "lpips": (min, lambda r: r.lpips.mean if r.lpips is not None else None),
            "pi_q": (min, lambda r: r.pi_q if isinstance(r.pi_q, float) else None),
            "pi_s": (min, lambda r: r.pi_s if isinstance(r.pi_s, float) else None)}
    for ds in dict.fromkeys(r.dataset for r in summary):
        rows = [r for r in summary if r.dataset == ds]
        if len(rows) < 2:
            continue
        for col, (pick, get) in cols.items():
            vals = [(get(r), r.method) for r in rows if get(r) is not None]
            if len(vals) >= 2:
                target = pick(v for v, _ in vals)
                best |= {(ds, m, col) for v, m in vals if v == target}
    return best


def _has_pi(summary) -> bool:
    return any(r.pi_q != NOT_EVALUATED or r.pi_s != NOT_EVALUATED for r in summary)


def format_markdown(summary: Sequence[SummaryRow], title: str | None = None, notes: Sequence[str] = (),
                    preamble: Sequence[str] = ()) -> str:
    """The Markdown table: Dataset | Method | n | PSNR (dB) | SSIM | LPIPS×100 | s / slice [| PI_q | PI_s].
    ``preamble``: paragraphs printed first, above the title (what the run is and is not)."""
    summary = list(summary)
    best = _best(summary)
    pi = _has_pi(summary)
    head = ["Dataset", "Method", "n", "PSNR (dB) ↑", "SSIM ↑", "LPIPS×100 ↓", "s / slice"]
    extra = [f for f in OPTIONAL_FIELDS if any(getattr(r, f) is not None for r in summary)]
    head += [{"rmse": "RMSE (HU) ↓", "consistency": "Consistency (NMAR = 1)"}[f] for f in extra]
    if pi:
        head += ["PI_q ↓", "PI_s ↓"]
    lines = [line for p in preamble for line in (p, "")]
    if title:
        lines += [f"### {title}", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["--:"] * (len(head) - 2)) + "|"]

    def b(text, r, col):
        return f"**{text}**" if (r.dataset, r.method, col) in best else text

    for r in summary:
        cells = [r.dataset, r.method, str(r.n), b(_fmt_stat(r.psnr, _DIGITS["psnr"]), r, "psnr"),
                 b(_fmt_stat(r.ssim, _DIGITS["ssim"]), r, "ssim"),
                 b(_fmt_stat(r.lpips, _DIGITS["lpips"], LPIPS_SCALE), r, "lpips"),
                 _fmt_stat(r.seconds, _DIGITS["seconds"])]
        cells += [_fmt_stat(getattr(r, f), 1 if f == "rmse" else 2) if getattr(r, f) is not None else NOT_EVALUATED
                  for f in extra]
        if pi:
            cells += [b(_fmt_pi(r.pi_q), r, "pi_q"), b(_fmt_pi(r.pi_s), r, "pi_s")]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    notes = list(notes) + ["mean ± sample sd over slices; LPIPS×100 as in the paper's Tables III-V; "
                           f"'{UNAVAILABLE}': no AlexNet backbone file, not computed"]
    lines += [""] + [f"_{n}_" for n in notes]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("dataset", "method", "n", "psnr_mean", "psnr_sd", "ssim_mean", "ssim_sd", "lpips_x100_mean",
              "lpips_x100_sd", "seconds_mean", "seconds_sd", "pi_q", "pi_s", "rmse_mean", "rmse_sd",
              "consistency_mean", "consistency_sd")


def format_csv(summary: Sequence[SummaryRow]) -> str:
    """CSV with :data:`CSV_FIELDS`; full precision; ``unavailable`` for absent LPIPS / PI, empty sd for n = 1."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)

    def sd(s: Stat | None, scale=1.0):
        return "" if s is None or s.sd is None or not math.isfinite(s.sd) else repr(s.sd * scale)

    for r in summary:
        lp = [UNAVAILABLE, UNAVAILABLE] if r.lpips is None else [repr(r.lpips.mean * LPIPS_SCALE),
                                                                   sd(r.lpips, LPIPS_SCALE)]
        pis = [UNAVAILABLE if v is None else ("" if v == NOT_EVALUATED else repr(v)) for v in (r.pi_q, r.pi_s)]
        opt = [v for f in OPTIONAL_FIELDS for v in ((repr(getattr(r, f).mean), sd(getattr(r, f)))
                                                      if getattr(r, f) is not None else ("", ""))]
        w.writerow([r.dataset, r.method, r.n, repr(r.psnr.mean), sd(r.psnr), repr(r.ssim.mean), sd(r.ssim), *lp,
                    repr(r.seconds.mean), sd(r.seconds), *pis, *opt])
    return buf.getvalue()




def write_tables(rows: Sequence[Mapping], out_dir: str | os.PathLike, stem: str = "evaluation",
                 pi: Mapping[tuple[str, str], Mapping[str, float | None]] | None = None, title: str | None = None,
                 notes: Sequence[str] = (), preamble: Sequence[str] = ()) -> dict[str, Path]:
    """Write ``<out_dir>/<stem>.md`` and ``<stem>.csv`` (atomically) from per-slice ``rows``; returns
    ``{"markdown": path, "csv": path}``. ``notes`` are printed under the Markdown table (say the metric window
    and region here), ``preamble`` above it (what the run is)."""
    if not (isinstance(stem, str) and stem and "/" not in stem and "\\" not in stem):
        raise ValueError(f"stem must be a non-empty file name without folders, got {stem!r}")
    summary = summarize(rows, pi)
    d = Path(out_dir)
    return {"markdown": write_text(d / f"{stem}.md", format_markdown(summary, title, notes, preamble)),
            "csv": write_text(d / f"{stem}.csv", format_csv(summary))}


# ---- comparison panel (Figs. 9 and 13) -----------------------------------------------------------------


def _slice(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim == 2:
        x = x[None, None]
    if x.ndim != 4 or x.shape[:2] != (1, 1):
        raise ValueError(f"{name} must have shape (H, W) or (1, 1, H, W), got {tuple(x.shape)}")
    return x


def comparison_panel(path: str | os.PathLike, outputs: Mapping[str, object], reference, metal_mask=None,
                     lpips: Callable | None = None, scores: Mapping[str, Mapping[str, float | None]] | None = None,
                     metric_window: tuple[float, float] = CT_RANGE_HU, roi=None, scale: int | None = None) -> Path:
    """A PNG like the paper's Figs. 9 / 13: one column per method (``outputs``: method -> HU image, left to
    right), images in the display window [-175, 275] HU, error maps (image - ``reference``) in [-400, 400] HU
    below, ``metal_mask`` in red, and under each image "PSNR/SSIM" (and "/LPIPS×100" when LPIPS is known) as
    numbers (e.g. ``42.51/0.9800/0.34``, PSNR in dB); put :data:`PANEL_LEGEND` in the figure's caption.

    The numbers come from ``scores`` (method -> {"psnr", "ssim", "lpips" (raw, or None)}, e.g. the evaluation
    rows of this slice, so the panel matches the tables) or are computed here with ``metrics.psnr`` /
    ``metrics.ssim`` in ``metric_window`` over the pixels outside the metal (and inside ``roi``) and with
    ``lpips`` (e.g. a ``metrics.lpips.LPIPSMetric``; None: no LPIPS shown). Pixel size:
    ``viz.panel_size(len(outputs), (H, W), True, True, scale)``."""
    if not isinstance(outputs, Mapping) or not outputs:
        raise ValueError("outputs must be a non-empty mapping of method -> HU image")
    ref = _slice(reference, "reference").to(torch.float64)
    mask = None if metal_mask is None else _slice(metal_mask, "metal_mask")
    if lpips is not None and not callable(lpips):
        raise ValueError(f"lpips must be a callable (x, ref, metal_mask) -> (N,) or None, got {type(lpips).__name__}")
    if scores is not None and (not isinstance(scores, Mapping) or set(scores) != set(outputs)):
        raise ValueError(f"scores must map every method {list(outputs)} to its {{'psnr', 'ssim', 'lpips'}}")
    labels = {}
    for m, img in outputs.items():
        x = _slice(img, f"outputs[{m!r}]").to(torch.float64)
        if scores is not None:
            s = scores[m]
            if not isinstance(s, Mapping) or "psnr" not in s or "ssim" not in s:
                raise ValueError(f"scores[{m!r}] must hold 'psnr' and 'ssim' (and optionally 'lpips')")
            p, q, lp = float(s["psnr"]), float(s["ssim"]), s.get("lpips")
        else:
            p = float(psnr(x, ref, mask, roi, window=metric_window)[0])
            q = float(ssim(x, ref, mask, roi, window=metric_window)[0])
            lp = None if lpips is None else float(torch.as_tensor(lpips(x, ref, mask)).reshape(-1)[0])
        # numbers only, as in the paper's figures; the caption says "PSNR/SSIM/(LPIPS×100)" (PANEL_LEGEND)
        labels[m] = f"{_fmt(p, 2)}/{q:.4f}" + (f"/{lp * LPIPS_SCALE:.2f}" if lp is not None else "")
    return save_panel(path, dict(outputs), reference=reference, metal_mask=metal_mask, window=DISPLAY_WINDOW_HU,
                      error_window=ERROR_WINDOW_HU, annotate=True, scale=scale, metric_window=metric_window,
                      image_labels=labels)
