"""Evaluation harness: low-dose denoising and anomaly detection, side by side, as CSV + Markdown + PNG.

Denoising: each clean CT is cut to a block of contiguous axial slices (optionally an in-plane
centre crop), low dose is simulated in the projection domain (`lowdose`) at each photon level, and
every method in `methods` denoises the same noisy volume. The clean reference is the original CT
(the simulation adds only reconstructed noise to it). PSNR/SSIM are computed in the [-160, 240] HU
window (as the MedDiff-FM paper) and each method's wall time per volume is recorded.

Context slices: a block may carry extra slices on each side that every method denoises but that are not
scored (`DenoiseCase.scored`). Why: a clinical CT is denoised whole, so a 3D method sees the neighbours of
every slice; a thin block alone makes it guess them (the sampler mirror-pads short axes). Per-slice methods
(NLM, BM3D) give the same scored slices either way and only take longer.

A method is any `callable(noisy: Volume, sigma_hu: float | None) -> Volume`; `sigma_hu` is the
true noise std of the simulation inside the metric window ("oracle", `noise_std_in_window`), or
None when methods must estimate it themselves.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import baselines, metrics
from .errors import InputError, ResourceError
from .io import VOLUME_SUFFIXES, Volume, atomic_path, png_figure, read_volume, write_csv
from .lowdose import simulate_low_dose
from .orientation import AxisOrder
from .validation import check_ct

log = logging.getLogger(__name__)

DenoiseMethod = Callable[[Volume, Optional[float]], Volume]
Progress = Optional[Callable[[int, int], None]]

#: Name of the unprocessed low-dose image in tables and figures.
INPUT_METHOD = "low-dose input"
DENOISE_COLUMNS = ("case", "photons", "method", "psnr", "ssim", "seconds", "noise_std_hu")
ANOMALY_COLUMNS = ("case", "pixel_auroc", "image_auroc", "best_dice", "best_dice_threshold", "pro",
                   "lesion_slices", "healthy_slices", "case_score", "case_auroc")


# ---------------------------------------------------------------- inputs

def collect_ct_paths(paths: Sequence[Path]) -> List[Path]:
    """Expand inputs: a file is one CT; a folder holding NIfTI/NRRD/MHA files gives each of them;
    any other folder is one DICOM series."""
    found: List[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise InputError(f"input not found: {path}")
        volume_files = sorted(p for p in path.iterdir() if p.name.lower().endswith(VOLUME_SUFFIXES)) \
            if path.is_dir() else []
        found.extend(volume_files or [path])
    return found


def axial_first(volume: Volume, like: Optional[Volume] = None) -> Volume:
    """`volume` with axial slices along its first array axis: one stored sagittal- or coronal-first is brought to
    patient order. Reversed axes alone are kept, so the published tables' noise draws stay. `like`: take the order
    from this volume instead, so that volumes on one grid (within its tolerance) are all turned alike."""
    order = AxisOrder.of((volume if like is None else like).direction)
    return volume if order.source == (0, 1, 2) else order.volume(volume)


def case_names(paths: Sequence[Path]) -> List[str]:
    """Short unique names: the file name without suffix, prefixed by its folder when that repeats."""
    def stem(p: Path) -> str:
        name = p.name
        for suffix in VOLUME_SUFFIXES:
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return name

    stems = [stem(p) for p in paths]
    # abspath: a file in the working directory has a folder name too (the folder given, not a link's target)
    names = [s if stems.count(s) == 1 else f"{Path(os.path.abspath(p)).parent.name}_{s}"
             for p, s in zip(paths, stems)]
    if len(set(names)) != len(names):
        raise InputError(f"two inputs would get the same case name ({names}); rename or move one.")
    return names


class DenoiseCase(NamedTuple):
    """A clean CT block, and the axial slices of it that are scored; the others are context (see module
    docstring). A plain (name, volume) pair scores every slice."""

    name: str
    volume: Volume
    scored: slice = slice(None)


def central_block(vol: Volume, n_slices: int, crop_yx: Optional[int] = None) -> Volume:
    """The `n_slices` contiguous axial slices in the middle of `vol`, optionally a centred
    `crop_yx` x `crop_yx` in-plane square (kept whole where the image is smaller)."""
    if n_slices < 1:
        raise InputError(f"number of slices must be >= 1, got {n_slices}.")
    if crop_yx is not None and crop_yx < 1:
        raise InputError(f"in-plane crop size must be >= 1 pixel, got {crop_yx}.")
    depth, height, width = vol.shape
    in_plane = []
    for size in (height, width):
        keep = size if not crop_yx else min(crop_yx, size)
        in_plane.append(slice((size - keep) // 2, (size - keep) // 2 + keep))
    return vol.crop((_middle(depth, n_slices), *in_plane))


def central_case(name: str, vol: Volume, n_slices: int, crop_yx: Optional[int] = None,
                 context: int = 0) -> DenoiseCase:
    """The `central_block` of `n_slices` scored slices with up to `context` more slices on each side
    (fewer where the CT ends)."""
    if context < 0:
        raise InputError(f"context slices must be >= 0, got {context}.")
    scored, extended = _middle(vol.shape[0], n_slices), _middle(vol.shape[0], n_slices + 2 * context)
    if vol.shape[0] < n_slices:
        log.warning("%s has %d axial slices, fewer than the %d asked for: all of them are scored", name,
                    vol.shape[0], n_slices)
    block = central_block(vol, n_slices + 2 * context, crop_yx)
    return DenoiseCase(name, block, slice(scored.start - extended.start, scored.stop - extended.start))


def _middle(depth: int, n: int) -> slice:
    start = max((depth - n) // 2, 0)
    return slice(start, start + min(n, depth))


def load_cases(paths: Sequence[Path], n_slices: int, crop_yx: Optional[int] = None,
               context: int = 0) -> List[DenoiseCase]:
    """Read each CT (see `collect_ct_paths`) and cut its central case of slices (see `central_case`)."""
    if n_slices < 1 or context < 0:
        raise InputError(f"need at least 1 scored slice and no negative context, got {n_slices} and {context}")
    files = collect_ct_paths(paths)
    cases = []
    for name, path in zip(case_names(files), files):
        try:
            volume = read_volume(path)
            check_ct(volume)  # the reference must be a clean CT in HU: PSNR in an HU window means nothing otherwise
            # Low dose is simulated per axial slice.
            cases.append(central_case(name, axial_first(volume), n_slices, crop_yx, context))
        except InputError as exc:  # among many files, say which one (unless the message does)
            raise InputError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
    return cases


# ---------------------------------------------------------------- methods

#: Classical methods by the short name the CLI uses.
CLASSICAL_METHODS = ("gaussian", "nlm", "bm3d")


def classical_methods(include: Sequence[str] = CLASSICAL_METHODS, gaussian_sigma_px: float = 1.0,
                      window: Tuple[float, float] = metrics.DENOISING_WINDOW_HU) -> Dict[str, DenoiseMethod]:
    """Gaussian smoothing, non-local means and BM3D (those named in `include`), keyed by display name."""
    unknown = set(include) - set(CLASSICAL_METHODS)
    if unknown:
        raise InputError(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(CLASSICAL_METHODS)}.")
    available = {
        "gaussian": (f"Gaussian {gaussian_sigma_px:g} px",
                     lambda vol, sigma: baselines.gaussian(vol, gaussian_sigma_px)),
        "nlm": ("NLM", lambda vol, sigma: baselines.nlm(vol, sigma, window=window)),
        "bm3d": ("BM3D", lambda vol, sigma: baselines.bm3d_denoise(vol, sigma, window=window)),
    }
    return {label: method for key, (label, method) in available.items() if key in include}


def meddifffm_method(model: str, nfe: Optional[int] = None, seed: int = 0, device: str = "auto",
                     **options) -> DenoiseMethod:
    """MedDiffFM denoising (`tasks.denoise.denoise`, DiffPIR) as a harness method.

    `model` is a registered model name or a model file; it is loaded once. The method gets the same
    noise std as the classical methods (the oracle, or None to estimate it). `options` (window,
    lam, overlap, window_batch, ...) pass through to `denoise`.
    """
    try:
        from .tasks import common
        from .tasks.denoise import denoise
    except ImportError as exc:
        raise ResourceError(f"MedDiffFM denoising is not available ({exc}).") from None
    torch_device = common.choose_device(device)
    network = common.load_task_model(model, torch_device)

    def run(vol: Volume, sigma_hu: Optional[float]) -> Volume:
        return denoise(vol, network, nfe=nfe, noise_level=sigma_hu, seed=seed,
                       device=torch_device, **options).denoised

    return run


# ---------------------------------------------------------------- denoising

@dataclass
class DenoiseReport:
    """Result rows (see DENOISE_COLUMNS) and, per case and dose, the middle slice of every image."""

    rows: List[Dict[str, object]] = field(default_factory=list)
    examples: Dict[str, Dict[float, Dict[str, np.ndarray]]] = field(default_factory=dict)


def evaluate_denoising(cases: Sequence[Union[DenoiseCase, Tuple[str, Volume]]], methods: Dict[str, DenoiseMethod],
                       photons: Sequence[float] = (1e5, 2.5e4), seed: int = 0, oracle_sigma: bool = True,
                       window: Tuple[float, float] = metrics.DENOISING_WINDOW_HU,
                       progress: Progress = None) -> DenoiseReport:
    """Simulate each dose on each clean case and score every method on it (see module docstring)."""
    if not cases or not photons:
        raise InputError("evaluate_denoising needs at least one case and one photon level.")
    if INPUT_METHOD in methods:
        raise InputError(f"{INPUT_METHOD!r} is reserved for the unprocessed input; rename that method.")
    report = DenoiseReport()
    total, done = len(cases) * len(photons) * (len(methods) + 1), 0
    for case_index, case in enumerate(cases):
        name, clean, scored = DenoiseCase(*case)
        clean_scored = clean.array[scored]
        report.examples[name] = {}
        for dose_index, dose in enumerate(photons):
            noisy = simulate_low_dose(clean, photons=dose, seed=seed + 1000 * case_index + dose_index)
            noise_std = noise_std_in_window(noisy.array[scored], clean_scored, window)
            outputs = {INPUT_METHOD: (noisy, 0.0)}
            for method_name, method in methods.items():
                start = time.perf_counter()
                denoised = method(noisy, noise_std if oracle_sigma else None)
                outputs[method_name] = (denoised, time.perf_counter() - start)
            for method_name, (image, seconds) in outputs.items():
                if image.shape != clean.shape:
                    raise InputError(f"method {method_name!r} returned shape {image.shape}, "
                                     f"expected {clean.shape}.")
                scores = metrics.hu_window_metrics(image.array[scored], clean_scored, window)
                report.rows.append({"case": name, "photons": dose, "method": method_name,
                                    "psnr": scores["psnr"], "ssim": scores["ssim"], "seconds": seconds,
                                    "noise_std_hu": noise_std})
                done += 1
                if progress is not None:
                    progress(done, total)
            middle = clean_scored.shape[0] // 2
            example = {m: image.array[scored][middle] for m, (image, _) in outputs.items()}
            example["clean"] = clean_scored[middle]
            report.examples[name][dose] = example
            log.info("%s at %g photons: %s", name, dose, ", ".join(
                f"{r['method']} {r['psnr']:.2f} dB" for r in report.rows[-len(outputs):]))
    return report


def noise_std_in_window(noisy: Union[Volume, np.ndarray], clean: Union[Volume, np.ndarray],
                        window: Tuple[float, float]) -> float:
    """Std (HU) of the simulated noise where the clean image lies inside the metric window: the
    noise the metrics see (air and bone are clipped away). Measured on the lung1 chest case, this
    oracle is 15 % above the whole-volume std and gains BM3D 1.2 dB over it."""
    noisy, clean = (v.array if isinstance(v, Volume) else np.asarray(v) for v in (noisy, clean))
    noise = noisy.astype(np.float64) - clean
    scored = (clean > window[0]) & (clean < window[1])
    return float(np.std(noise[scored] if scored.any() else noise))


def mean_over_cases(rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """Per (photons, method): PSNR, SSIM and seconds averaged over cases, in first-seen order."""
    groups: Dict[Tuple[float, str], List[Dict[str, object]]] = {}
    for row in rows:
        groups.setdefault((row["photons"], row["method"]), []).append(row)
    return [{"case": f"mean of {len(group)}", "photons": dose, "method": method,
             **{key: float(np.mean([r[key] for r in group])) for key in ("psnr", "ssim", "seconds",
                                                                          "noise_std_hu")}}
            for (dose, method), group in groups.items()]


def report_files(kind: str, case_names: Sequence[str]) -> List[str]:
    """The files a `kind` ("denoise" or "anomaly") report writes: <kind>_results.csv, <kind>_results.md, then one
    <kind>_<case>.png per case."""
    return [f"{kind}_results.csv", f"{kind}_results.md", *(f"{kind}_{name}.png" for name in case_names)]


def write_denoise_report(report: DenoiseReport, out_dir: Path,
                         window: Tuple[float, float] = metrics.DENOISING_WINDOW_HU) -> List[Path]:
    """The `report_files` of a denoising report; returns their paths."""
    out_dir = Path(out_dir)
    csv_name, md_name, *figures = report_files("denoise", list(report.examples))
    summary = mean_over_cases(report.rows)
    written = [write_csv(report.rows + summary, DENOISE_COLUMNS, out_dir / csv_name)]
    text = (f"# Low-dose CT denoising\n\nPSNR (dB) / SSIM in the [{window[0]:g}, {window[1]:g}] HU window, "
            "on the scored slices; seconds = wall time per volume, context slices included.\n\n"
            "## Mean over cases\n\n"
            + denoise_summary_markdown(summary) + "\n## Per case\n\n"
            + markdown_table(report.rows, DENOISE_COLUMNS))
    written.append(write_text(text, out_dir / md_name))
    for (case, by_dose), figure in zip(report.examples.items(), figures):
        scores = {(r["photons"], r["method"]): r["psnr"] for r in report.rows if r["case"] == case}
        written.append(_denoise_figure(case, by_dose, scores, window, out_dir / figure))
    _warn_stale_figures(out_dir, "denoise_", written)
    return written


def denoise_summary_markdown(summary_rows: Sequence[Dict[str, object]]) -> str:
    """One row per method, one 'PSNR / SSIM (s)' column per photon level."""
    doses = list(dict.fromkeys(r["photons"] for r in summary_rows))
    methods = list(dict.fromkeys(r["method"] for r in summary_rows))
    cell = {(r["method"], r["photons"]): f"{r['psnr']:.2f} / {r['ssim']:.3f} ({r['seconds']:.1f} s)"
            for r in summary_rows}
    lines = ["| method | " + " | ".join(f"I0 = {d:g}" for d in doses) + " |",
             "|---|" + "---|" * len(doses)]
    lines += ["| " + m + " | " + " | ".join(cell.get((m, d), "") for d in doses) + " |" for m in methods]
    return "\n".join(lines) + "\n"


def _denoise_figure(case: str, by_dose: Dict[float, Dict[str, np.ndarray]], psnr: Dict[Tuple[float, str], float],
                    window: Tuple[float, float], path: Path) -> Path:
    """Rows = doses; columns = input, each method, clean, |error| of the method with the best PSNR."""
    doses = list(by_dose)
    columns = [m for m in by_dose[doses[0]] if m != "clean"] + ["clean", "error"]
    with png_figure(path, 110, nrows=len(doses), ncols=len(columns), squeeze=False,
                    figsize=(2.2 * len(columns), 2.8 * len(doses))) as (fig, axes):
        for row, dose in enumerate(doses):
            images = by_dose[dose]
            best = max((m for m in images if m not in ("clean", INPUT_METHOD)),
                       key=lambda m: psnr[(dose, m)], default=INPUT_METHOD)
            for col, name in enumerate(columns):
                ax = axes[row, col]
                ax.set_axis_off()
                if name == "error":
                    error = np.abs(np.clip(images[best], *window) - np.clip(images["clean"], *window))
                    ax.imshow(error, cmap="magma", vmin=0, vmax=(window[1] - window[0]) / 4)
                    ax.set_title(f"|error| {best}", fontsize=7)
                    continue
                ax.imshow(images[name], cmap="gray", vmin=window[0], vmax=window[1])
                title = name if name == "clean" else f"{name}\n{psnr[(dose, name)]:.2f} dB"
                ax.set_title(title, fontsize=7)
            axes[row, 0].text(-0.08, 0.5, f"I0 = {dose:g}", rotation=90, va="center", ha="right",
                              transform=axes[row, 0].transAxes, fontsize=8)
        fig.suptitle(f"{case}: middle scored slice, window [{window[0]:g}, {window[1]:g}] HU", fontsize=9)
        fig.tight_layout(h_pad=1.5)
    return path


# ---------------------------------------------------------------- anomaly detection

@dataclass
class AnomalyCase:
    """An anomaly score map (higher = more abnormal), its lesion mask (same zyx shape; None for a healthy case),
    optionally the CT in HU for the figure, and optionally the region that was searched (only its voxels are
    scored)."""

    name: str
    scores: np.ndarray
    mask: Optional[np.ndarray]
    image: Optional[np.ndarray] = None
    searched: Optional[np.ndarray] = None


#: A score map with more than this share of voxels at exactly 0 looks like a map with a search region
#: (`detect-anomalies --mask`): unless that region is given, those voxels are scored as easy negatives.
ZERO_SHARE_WARNING = 0.2


def evaluate_anomaly(cases: Sequence[AnomalyCase], max_fpr: float = 0.3) -> List[Dict[str, object]]:
    """Pixel AUROC, best Dice (and its threshold), PRO up to `max_fpr` per case, and image-level AUROC
    over axial slices (slice score = its highest voxel score; a slice is a lesion slice when the mask
    touches it; NaN unless a case has both kinds). A last row pools all slices of all cases for the
    image AUROC and averages the other metrics over the lesion cases. A case's `searched` region limits every
    metric to its voxels: slices without any are left out, and a slice whose lesion lies wholly outside it counts
    as healthy (the lesion voxels left out are logged). PRO's regions are whole lesions, clipped to the searched
    voxels.

    Healthy cases (mask None) add healthy slices and a case to rank: every case gets `case_score`, the image score
    of `detect-anomalies` (`metrics.anomaly_image_score`, its highest searched voxel score, as for a slice), and the
    last row `case_auroc`, lesion cases against healthy ones by that score (NaN unless both kinds are given)."""
    if all(case.mask is None for case in cases):
        raise InputError("no case has a lesion: anomaly metrics need at least one (the others may be healthy)")
    rows, slice_scores, slice_labels = [], [], []
    for case in cases:
        scores = np.asarray(case.scores, dtype=np.float64)
        healthy = case.mask is None
        mask = np.zeros(scores.shape, bool) if healthy else np.asarray(case.mask) > 0
        if scores.shape != mask.shape or scores.ndim != 3:
            raise InputError(f"case {case.name}: scores {scores.shape} and mask {mask.shape} must be "
                             "3D volumes on the same grid.")
        if case.image is not None and np.shape(case.image) != scores.shape:
            raise InputError(f"case {case.name}: the image {np.shape(case.image)} is not on the score grid "
                             f"{scores.shape}.")
        if not healthy and not mask.any():  # an empty mask given by mistake must not pass for a healthy case
            raise InputError(f"case {case.name}: the lesion mask is empty. A case without a lesion is scored as "
                             "healthy only when said so (no mask; on the command line, the word healthy).")
        searched = _searched_voxels(case, scores, mask)
        whole_lesions, mask = mask, mask & searched
        slices = len(scores)
        per_slice = _slice_scores(scores, searched)
        has_lesion = mask.reshape(slices, -1).any(axis=1)
        kept = searched.reshape(slices, -1).any(axis=1)
        per_slice, has_lesion = per_slice[kept], has_lesion[kept]
        slice_scores.append(per_slice)
        slice_labels.append(has_lesion)
        try:
            row = {"case": case.name, "image_auroc": _auroc_if_defined(per_slice, has_lesion),
                   "lesion_slices": int(has_lesion.sum()), "healthy_slices": int((~has_lesion).sum())}
            row["case_score"] = metrics.anomaly_image_score(scores[searched])
            if healthy:
                row.update(dict.fromkeys(("pixel_auroc", "best_dice", "best_dice_threshold", "pro"), float("nan")))
            else:
                row["best_dice"], row["best_dice_threshold"] = metrics.best_dice(scores[searched], mask[searched])
                row["pixel_auroc"] = metrics.pixel_auroc(scores[searched], mask[searched])
                row["pro"] = metrics.pro_score(np.where(searched, scores, 0.0), whole_lesions, max_fpr,
                                               searched=searched)
        except (InputError, ValueError) as exc:  # e.g. NaN scores, or a mask covering every voxel
            raise InputError(f"case {case.name}: {exc}") from None
        rows.append(row)
    return rows + [_pooled_anomaly_row(rows, [case.mask is None for case in cases], slice_scores, slice_labels)]


def _pooled_anomaly_row(rows: Sequence[Dict[str, object]], healthy: Sequence[bool],
                        slice_scores: Sequence[np.ndarray], slice_labels: Sequence[np.ndarray]) -> Dict[str, object]:
    """The last row of `evaluate_anomaly`: slices and cases ranked together, voxel metrics averaged over the lesion
    cases (a healthy case has none). Per-case rows lack `case_auroc`, this row `case_score` (blank in the tables)."""
    lesion_rows = [row for row, is_healthy in zip(rows, healthy) if not is_healthy]
    n_healthy = len(rows) - len(lesion_rows)
    pooled = {"case": f"all {len(rows)} cases" + (f" ({n_healthy} healthy)" if n_healthy else ""),
              "image_auroc": _auroc_if_defined(np.concatenate(slice_scores), np.concatenate(slice_labels)),
              "case_auroc": _auroc_if_defined(np.array([row["case_score"] for row in rows]),
                                              ~np.array(healthy, bool)),
              "best_dice_threshold": float("nan")}
    for key in ("lesion_slices", "healthy_slices"):
        pooled[key] = sum(row[key] for row in rows)
    for key in ("pixel_auroc", "best_dice", "pro"):
        pooled[key] = float(np.mean([row[key] for row in lesion_rows]))
    return pooled


def _slice_scores(scores: np.ndarray, searched: np.ndarray) -> np.ndarray:
    """Each axial slice's score: its highest voxel score in the region searched (-inf where it has none)."""
    return np.where(searched, scores, -np.inf).reshape(len(scores), -1).max(axis=1)


def _searched_voxels(case: AnomalyCase, scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The voxels to score: the case's search region, checked against its mask, or all of them."""
    if case.searched is None:
        zero_share = float(np.mean(scores == 0))
        if zero_share > ZERO_SHARE_WARNING:
            log.warning("case %s: %.0f%% of the score map is exactly 0, as outside the search region of "
                        "detect-anomalies --mask; those voxels are scored as easy negatives, which raises AUROC "
                        "and PRO: give the region searched (--regions)", case.name, 100 * zero_share)
        return np.ones(scores.shape, bool)
    searched = np.asarray(case.searched) > 0
    if searched.shape != scores.shape:
        raise InputError(f"case {case.name}: the search region {searched.shape} is not on the score grid "
                         f"{scores.shape}.")
    outside = int((mask & ~searched).sum())
    if mask.any() and outside == int(mask.sum()):
        raise InputError(f"case {case.name}: no lesion voxel lies inside the search region; nothing to detect.")
    if not searched.any():  # a healthy case's: it has no lesion to miss, and no voxel to score
        raise InputError(f"case {case.name}: the search region is empty; nothing to score.")
    if outside:
        log.warning("case %s: %d of the %d lesion voxels lie outside the search region and are not scored",
                    case.name, outside, int(mask.sum()))
    return searched


def _auroc_if_defined(scores: np.ndarray, labels: np.ndarray) -> float:
    if labels.all() or not labels.any():
        return float("nan")
    return metrics.image_auroc(scores, labels)


def write_anomaly_report(rows: Sequence[Dict[str, object]], cases: Sequence[AnomalyCase],
                         out_dir: Path, max_fpr: float = 0.3) -> List[Path]:
    """The `report_files` of an anomaly report; returns their paths."""
    out_dir = Path(out_dir)
    csv_name, md_name, *figures = report_files("anomaly", [case.name for case in cases])
    written = [write_csv(rows, ANOMALY_COLUMNS, out_dir / csv_name)]
    text = (f"# Anomaly detection\n\nPixel AUROC, image-level AUROC over axial slices, best Dice over "
            f"thresholds, PRO integrated to FPR {max_fpr:g} (normalised), each case's image score (its highest "
            f"voxel score) and the AUROC of lesion cases against healthy ones by it (last row).\n\n"
            + markdown_table(rows, ANOMALY_COLUMNS))
    written.append(write_text(text, out_dir / md_name))
    written += [_anomaly_figure(case, out_dir / figure) for case, figure in zip(cases, figures)]
    _warn_stale_figures(out_dir, "anomaly_", written)
    return written


def _warn_stale_figures(out_dir: Path, prefix: str, written: Sequence[Path]) -> None:
    """Name the figures of this kind in `out_dir` that this report did not write: an earlier run's cases, which the
    new table no longer lists. They are left alone (they may be wanted), but must not pass for this run's."""
    stale = sorted(set(out_dir.glob(f"{prefix}*.png")) - {Path(p) for p in written})
    if stale:
        log.warning("%s also holds figures that this run did not make (an earlier run's cases, not in the new "
                    "table): %s", out_dir, ", ".join(p.name for p in stale))


def _anomaly_figure(case: AnomalyCase, path: Path) -> Path:
    """The axial slice with the most lesion (a healthy case: the highest score in the searched region, whence its
    `case_score`): CT (if given), score map, both with the mask outline."""
    if case.mask is None:
        mask = np.zeros(np.shape(case.scores), bool)
        searched = np.ones(mask.shape, bool) if case.searched is None else np.asarray(case.searched) > 0
        z = int(np.argmax(_slice_scores(np.asarray(case.scores, dtype=np.float64), searched)))
    else:
        mask = np.asarray(case.mask) > 0
        z = int(np.argmax(mask.reshape(len(mask), -1).sum(axis=1)))
    panels = ([("CT", case.image[z], "gray", metrics.DENOISING_WINDOW_HU)] if case.image is not None else [])
    panels.append(("anomaly score", case.scores[z], "inferno", (None, None)))
    with png_figure(path, 110, nrows=1, ncols=len(panels), squeeze=False,
                    figsize=(3.2 * len(panels), 3.4)) as (fig, axes):
        for ax, (title, image, cmap, (low, high)) in zip(axes[0], panels):
            ax.imshow(image, cmap=cmap, vmin=low, vmax=high)
            if mask[z].any():
                ax.contour(mask[z], levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
        shown = "healthy case: the slice scoring highest" if case.mask is None else "lesion outlined"
        fig.suptitle(f"{case.name}: slice {z} ({shown})", fontsize=9)
        fig.tight_layout()
    return path


# ---------------------------------------------------------------- tables

def _format(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:g}" if abs(value) >= 1000 else f"{value:.4f}"
    return str(value)


def markdown_table(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_text(text: str, path: Path) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)

