"""The cost of the integrity check (:mod:`nnyseg.data.integrity`) per GB of image data, against a SimpleITK read.

Writes synthetic CT volumes (512 x 512 slices: air, a body ellipse with liver and spine, Gaussian noise; so they
compress about as real CT does) into a temporary folder, in three kinds: int16 ``.nii.gz``, float32 ``.nii.gz`` and
int16 ``.nii``. For each kind it times, side by side in one run (alternating within every repeat, median of the
repeats):

* **SimpleITK read**: ``sitk.ReadImage`` of every file (what nnU-Net does to read an image),
* **integrity check**: :func:`nnyseg.data.integrity.check_image_file` of every file (one thread),

and, on a raw dataset made of the int16 ``.nii.gz`` volumes with their labels, ``validate_raw_dataset`` with the
image check (``nnyseg check-dataset``) and without it (``--headers-only``), one thread and two.

Times are per GB (1e9 bytes) of voxel data (decompressed) and per GB of files on disk. The files are in the page
cache (just written), so this is the CPU cost; on a slow disk both columns also pay for reading the bytes.

    python benchmarks/integrity.py                      # 128 MiB of voxel data per kind, 3 repeats; appends
    python benchmarks/integrity.py --size-mb 32 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnyseg.data.integrity import check_image_file, check_image_files
from nnyseg.data.validation import validate_raw_dataset

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "benchmarks" / "RESULTS.md"
SLICE = (512, 512)
SLICES_PER_FILE = 64  # 32 MiB of int16 voxels per file (fewer slices when --size-mb asks for less)
SPACING = (0.75, 0.75, 2.5)
KINDS = (  # name, dtype, file ending
    ("CT int16, .nii.gz", np.int16, ".nii.gz"),
    ("CT float32, .nii.gz", np.float32, ".nii.gz"),
    ("CT int16, .nii (uncompressed)", np.int16, ".nii"),
)


def ct_volume(seed: int, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """A (z, y, x) int16 CT-like volume in HU and its label (1 liver)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: SLICE[0], : SLICE[1]].astype(np.float32)
    cy, cx = SLICE[0] / 2, SLICE[1] / 2
    body = ((y - cy) / 180) ** 2 + ((x - cx) / 230) ** 2 < 1
    liver = ((y - cy + 20) / 80) ** 2 + ((x - cx + 80) / 100) ** 2 < 1
    spine = ((y - cy - 110) / 25) ** 2 + ((x - cx) / 25) ** 2 < 1
    slice_ = np.full(SLICE, -1000.0, np.float32)
    slice_[body] = 30.0
    slice_[liver] = 60.0
    slice_[spine] = 500.0
    volume = np.repeat(slice_[None], depth, axis=0)
    volume += rng.normal(0.0, 12.0, volume.shape).astype(np.float32)
    label = np.repeat(liver[None], depth, axis=0).astype(np.uint8)
    return np.round(volume).astype(np.int16), label


def write(path: Path, array: np.ndarray) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=path.name.endswith(".gz"))


def make_data(root: Path, size_mb: int) -> dict[str, list[Path]]:
    """The files of every kind; the int16 ``.nii.gz`` ones are the images of a raw dataset with labels."""
    dataset = root / "Dataset999_IntegrityBench"
    files: dict[str, list[Path]] = {}
    for name, dtype, ending in KINDS:
        slice_bytes = SLICE[0] * SLICE[1] * np.dtype(dtype).itemsize
        depth = int(np.clip(size_mb * 2**20 // slice_bytes, 1, SLICES_PER_FILE))  # smaller files for a smoke run
        n_files = max(1, round(size_mb * 2**20 / (slice_bytes * depth)))
        files[name] = []
        for i in range(n_files):
            volume, label = ct_volume(i, depth)
            if name == KINDS[0][0]:
                path = dataset / "imagesTr" / f"case_{i:03d}_0000{ending}"
                write(dataset / "labelsTr" / f"case_{i:03d}{ending}", label)
            else:
                path = root / name.split(",")[0].replace(" ", "_") / f"{np.dtype(dtype).name}_{i:03d}{ending}"
            write(path, volume.astype(dtype))
            files[name].append(path)
    n_cases = len(files[KINDS[0][0]])
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    (dataset / "dataset.json").write_text(json.dumps(dataset_json), encoding="utf-8")
    return files


def voxel_bytes(path: Path) -> int:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    pixel_bytes = sitk.Image(1, 1, reader.GetPixelID()).GetSizeOfPixelComponent()
    return int(np.prod(reader.GetSize())) * pixel_bytes * reader.GetNumberOfComponents()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sitk_read_all(paths: list[Path]) -> None:
    for p in paths:
        sitk.ReadImage(str(p))


def check_all(paths: list[Path]) -> None:
    problems = [q for p in paths for q in check_image_file(p)]
    assert not problems, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=128, help="MiB of voxel data per kind (default: 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default: 3)")
    parser.add_argument("--workdir", help="folder for the data (default: a temporary folder, removed afterwards)")
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    command = "python benchmarks/integrity.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))

    started, cpu_started = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        files = make_data(root, args.size_mb)
        t_write = time.perf_counter() - start
        rows = []
        for name, _, _ in KINDS:
            paths = files[name]
            gb_voxels = sum(voxel_bytes(p) for p in paths) / 1e9
            gb_disk = sum(p.stat().st_size for p in paths) / 1e9
            check_all(paths)  # warm-up (imports, page cache), untimed
            reads, checks = [], []
            for _ in range(args.repeats):  # alternate, so that both see the same machine load
                reads.append(timed(lambda paths=paths: sitk_read_all(paths)))
                checks.append(timed(lambda paths=paths: check_all(paths)))
            read, check = statistics.median(reads), statistics.median(checks)
            rows.append((name, len(paths), gb_voxels, gb_disk, read, check))

        dataset = root / "Dataset999_IntegrityBench"
        images = files[KINDS[0][0]]
        gb_images = sum(voxel_bytes(p) for p in images) / 1e9
        validation = []
        for threads in (1, 2):
            full, headers = [], []
            for _ in range(args.repeats):
                full.append(timed(lambda t=threads: validate_raw_dataset(dataset, progress=False, num_processes=t)))
                headers.append(
                    timed(
                        lambda t=threads: validate_raw_dataset(
                            dataset, check_intensities=False, progress=False, num_processes=t
                        )
                    )
                )
            validation.append((threads, statistics.median(headers), statistics.median(full)))
        t_threads = statistics.median(
            timed(lambda: check_image_files(images, num_processes=2, progress=False)) for _ in range(args.repeats)
        )
    total, cpu_time = time.perf_counter() - started, time.process_time() - cpu_started
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = platform.processor() or platform.machine()
    lines = [
        f"## {now}, integrity check cost per GB (issue #14, requirement 1)",
        "",
        "```bash",
        command,
        "```",
        "",
        f"CPU {cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, SimpleITK "
        f"{sitk.Version_VersionString()}, numpy {np.__version__}. Synthetic CT volumes of 512 x 512 x up to "
        f"{SLICES_PER_FILE} voxels (air, body, liver, spine, noise sd 12 HU), {args.size_mb} MiB of voxel data per "
        f"kind, written in {t_write:.0f} s; median of {args.repeats} repeats, the two methods alternating; files in "
        f'the page cache. GB = 1e9 bytes; "voxel GB" counts decompressed voxel data, "disk GB" the files. Total '
        f"wall time {total:.0f} s, of which this process ran {cpu_time:.0f} s of CPU time; load average at the end "
        f"{load} (a shared machine lengthens the absolute times; the ratios, measured alternately, are the "
        "comparable figures).",
        "",
        "| data | files | voxel GB | disk GB | SimpleITK read (s / voxel GB) | integrity check (s / voxel GB) "
        "| integrity check (s / disk GB) | check / read |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, n, gb_voxels, gb_disk, read, check in rows:
        lines.append(
            f"| {name} | {n} | {gb_voxels:.3f} | {gb_disk:.3f} | {read / gb_voxels:.2f} | {check / gb_voxels:.2f} "
            f"| {check / gb_disk:.2f} | {check / read:.2f} |"
        )
    lines += [
        "",
        f"`validate_raw_dataset` (`nnyseg check-dataset`) of a raw dataset of the {len(images)} int16 `.nii.gz` "
        f"volumes ({gb_images:.3f} voxel GB) with their labels; `--headers-only` skips the image check (the labels "
        "are read whole either way):",
        "",
        "| threads | --headers-only (s) | full check (s) | added by the image check (s / voxel GB) "
        "| full / headers-only |",
        "|---:|---:|---:|---:|---:|",
    ]
    for threads, headers, full in validation:
        lines.append(
            f"| {threads} | {headers:.2f} | {full:.2f} | {(full - headers) / gb_images:.2f} | {full / headers:.2f} |"
        )
    lines += [
        "",
        f"`check_image_files` of the same images with 2 threads: {t_threads / gb_images:.2f} s / voxel GB, against "
        f"{rows[0][5] / gb_images:.2f} with one (speed-up {rows[0][5] / t_threads:.2f}x).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        with RESULTS.open("a", encoding="utf-8") as f:  # append only: other sections stay as they are
            f.write("\n" + text)
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
