"""Shared benchmark helpers: timing, roofline constants, the printed table, JSON + PNG results.

Each op benchmark (norm, attention, quant, paged, throughput) times with ``bench_ms``, reports its
effective bandwidth or FLOP rate beside the time against the ceilings below, prints ``print_table``
and writes ``benchmarks/results/{gpu}_{name}.json`` and ``.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

# Ceilings measured on an NVIDIA H100 80GB HBM3 (BENCHMARKS.md, 2026-11-23): a 2 GiB device-to-device
# copy, counting bytes read + written, and a bf16 8192^3 matmul. Results on other GPUs are reported
# against the same numbers; measure_copy_tb_s() gives the machine's own copy ceiling beside them.
COPY_TB_S = 3.0
BF16_TFLOPS = 760.0

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Smoke runs (tests, `--quick` checks) write elsewhere so they never touch the committed results: an
# --out-dir (results_dir below) wins over this variable, which wins over RESULTS_DIR.
RESULTS_DIR_ENV = "LLMFAST_RESULTS_DIR"
_results_dir_override: Path | None = None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def gpu_name(device: torch.device | str | None = None) -> str:
    """Short lowercase tag for result file names: "h100", "h200", ..., or "cpu" for CPU runs."""
    device = torch.device(device) if device is not None else default_device()
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)  # e.g. "NVIDIA H100 80GB HBM3"
    model = re.search(r"\b([A-Z]+[0-9]+[A-Za-z]*)\b", name.replace("NVIDIA", ""))
    if model:
        return model.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")


def bench_ms(
    fn: Callable[[], object],
    *,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> float:
    """Median milliseconds per call of ``fn``; ``grad_to_none`` tensors get ``.grad = None`` before each call.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls). CPU: ``time.perf_counter``.
    Warm up anything that compiles on its first call before timing it: do_bench sizes its loops from
    the first few calls.
    """
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))

    def call_ms() -> float:
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    estimate = max(call_ms(), 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        call_ms()
    return statistics.median(call_ms() for _ in range(max(5, int(rep_ms / estimate))))


def interleaved_ms(fns: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """``repeats`` ``bench_ms`` timings of each ``name -> fn``, the names taking turns, so that a slow spell of
    a shared machine hits every implementation."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(bench_ms(fn))
    return times


def parse_int_list(text: str) -> list[int]:
    """``"1,16,64"`` -> ``[1, 16, 64]`` (positive ints), for argparse."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints separated by commas, got {text!r}")
    return values


def positive_int(text: str) -> int:
    """``"4"`` -> 4 (a positive int), for argparse."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Inside the block torch uses ``n`` CPU threads (None: as many as it did); the count is restored after, so
    that a benchmark run in-process (``llmfast bench all``, the tests) leaves no setting behind."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n or saved)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def parse_pairs(text: str, names: str, first_multiple_of: int = 1) -> list[tuple[int, int]]:
    """``"4096x4096,16384x4096"`` -> positive ``(a, b)`` pairs, ``a`` a multiple of ``first_multiple_of``,
    for argparse; ``names`` (e.g. ``"KxN"``) names them in the error."""
    try:
        pairs = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 1 or p[0] % first_multiple_of for p in pairs):
        first = names.split("x")[0]
        rule = f" with {first} a multiple of {first_multiple_of}" if first_multiple_of > 1 else ""
        raise argparse.ArgumentTypeError(f"expected {names}[,{names}...]{rule}, got {text!r}")
    return pairs


def tb_per_s(nbytes: float, ms: float) -> float:
    return nbytes / ms / 1e9


def measure_copy_tb_s(nbytes: int = 2 << 30) -> float | None:
    """This GPU's device-to-device copy rate (bytes read + written), as BENCHMARKS.md measured it."""
    if not torch.cuda.is_available():
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return tb_per_s(2 * nbytes, ms)


def group_rows(rows: Sequence[dict], keys: Sequence[str]) -> list[list[dict]]:
    """``rows`` grouped by their values of ``keys`` (e.g. one group per measured case), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    return list(groups.values())


def copy_scaled(target_tb_s: float, copy_tb_s: float | None) -> float:
    """A TB/s target BENCHMARKS.md sets on the H100 (a fraction of its COPY_TB_S copy rate), as the same fraction
    of this GPU's measured copy rate (an H200 copies faster); the H100's figure where none was measured."""
    return target_tb_s if copy_tb_s is None else target_tb_s * copy_tb_s / COPY_TB_S


def mark_target(row: dict, field: str, target: float, flag: str = "meets_target") -> bool | None:
    """Marks ``row[field] >= target``: sets ``row["target_" + field]`` and ``row[flag]``, and returns the flag.
    Nothing (None) where ``row[field]`` was not measured."""
    if row.get(field) is None:
        return None
    row["target_" + field] = target
    row[flag] = row[field] >= target
    return row[flag]


def _cell(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):  # a target's pass/fail
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def print_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> None:
    """Prints ``rows`` aligned under ``columns`` (their keys); numbers right-aligned, None as n/a."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) in (None, "") for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    print(line(columns))
    print(line(["-" * w for w in widths]))
    for r in cells:
        print(line(r))


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def run_metadata(device: torch.device | str | None = None, packages: Sequence[str] = ()) -> dict:
    device = torch.device(device) if device is not None else default_device()
    on_gpu = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if on_gpu else (platform.processor() or platform.machine()),
        "gpu": gpu_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "cuda": torch.version.cuda if on_gpu else None,
        "versions": {p: package_version(p) for p in ("torch", "triton", *packages)},
    }


def cpu_without_avx512() -> bool:
    """Whether this CPU lacks AVX-512 (Linux /proc/cpuinfo; elsewhere assumed to have it)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512f" not in flags


def results_path(name: str, suffix: str, device: torch.device | str | None = None) -> Path:
    """``{gpu}_{name}{suffix}``; a CPU run on a CPU without AVX-512 is ``cpu_{name}_avx2{suffix}``, so that it
    never overwrites the AVX-512 machine's results (the C++ kernels take another path there)."""
    directory = _results_dir_override or Path(os.environ.get(RESULTS_DIR_ENV) or RESULTS_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    tag = gpu_name(device)
    if tag == "cpu" and cpu_without_avx512():
        name += "_avx2"
    return directory / f"{tag}_{name}{suffix}"


def writable_dir(value: str) -> Path:
    """argparse ``type`` of ``--out-dir``: the folder, created now, so that a path that cannot be one is an
    argument error before anything is measured (not a traceback when the results are saved)."""
    path = Path(value)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot create folder {value}: {exc.strerror or exc}") from None
    return path


def out_dir(args: argparse.Namespace, name: str) -> Path | None:
    """Where a run's JSON + PNG go: ``args.out_dir``; else, for ``--quick``, a fresh temporary folder (a smoke
    run never touches the committed results); else None, benchmarks/results/. Use with results_dir."""
    if args.out_dir is None and args.quick:
        return Path(tempfile.mkdtemp(prefix=f"llmfast_bench_{name}_"))
    return args.out_dir


@contextlib.contextmanager
def results_dir(path: Path | None) -> Iterator[None]:
    """Inside the block, save_results and plot_bars write to ``path`` (None: the default place)."""
    global _results_dir_override
    saved, _results_dir_override = _results_dir_override, path
    try:
        yield
    finally:
        _results_dir_override = saved


def save_results(
    name: str, payload: Mapping, *, device: torch.device | str | None = None, packages: Sequence[str] = ()
) -> Path:
    """Writes ``benchmarks/results/{gpu}_{name}.json``: run metadata, then ``payload``."""
    path = results_path(name, ".json", device)
    path.write_text(json.dumps({"meta": run_metadata(device, packages), **payload}, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def plot_bars(
    name: str,
    panels: Mapping[str, tuple[Sequence[str], Mapping[str, Sequence[float | None]]]],
    *,
    ylabel: str,
    hline: float | None = None,
    hline_label: str | None = None,
    title: str | None = None,
    device: torch.device | str | None = None,
) -> Path | None:
    """Grouped bar charts, two panels a row, to ``benchmarks/results/{gpu}_{name}.png``.

    panels: title -> (x labels, {series label: one value per x label, None where not measured}).
    A series keeps its colour in every panel.
    """
    try:
        from matplotlib.figure import Figure  # renders with Agg, without touching pyplot's global backend
    except ImportError:
        print("note: matplotlib is not installed, so no PNG was written")
        return None
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(7 * ncols, 4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    labels = list(dict.fromkeys(label for _, series in panels.values() for label in series))
    for ax, (panel_title, (xlabels, series)) in zip(axes, panels.items()):
        width = 0.8 / max(1, len(series))
        for i, (label, values) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(xlabels))]
            heights = [float("nan") if v is None else v for v in values]
            ax.bar(xs, heights, width, label=label, color=f"C{labels.index(label) % 10}")
        if hline is not None:
            ax.axhline(hline, color="black", linestyle="--", linewidth=1, label=hline_label)
        ax.set_xticks(range(len(xlabels)), xlabels, fontsize=8)
        ax.set_title(panel_title)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    path = results_path(name, ".png", device)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
    return path
