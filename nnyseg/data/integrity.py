"""Integrity checks of image files: truncated or corrupt downloads, and NaN or infinite voxels.

SimpleITK, which nnU-Net reads images with, misses both kinds of damage without a word:

* it reads a ``.nii.gz`` cut short, or one whose compressed bytes are damaged, and fills the missing part with
  zeros or garbage (it never checks the gzip stream's CRC and length), and it reads an uncompressed ``.nii`` that is
  cut short the same way;
* its NIfTI reader returns 0 where the file holds NaN or +-inf.

The checks here read every byte of the file:

* a gzip-compressed file (found by its magic bytes, whatever its name) is decompressed to its end, so that zlib
  verifies its CRC-32 and length;
* a NIfTI file (``.nii``, ``.nii.gz``; NIfTI-1 or NIfTI-2) must hold the whole data block its header announces
  (``vox_offset + prod(shape) * itemsize`` bytes), and a float data block is scanned for NaN and +-inf on the raw
  bytes, in the same single pass, so that neither SimpleITK nor any intensity scaling hides them;
* a MetaImage (``.mha``) with compressed data has its zlib stream decompressed to its end (Adler-32 checked);
* every other format (``.mha``, ``.nrrd``, ``.gipl``, ...) is read with SimpleITK, whose readers of these formats
  refuse a truncated file, and a float image is scanned for NaN and +-inf.

Memory stays constant for NIfTI (16 MiB chunks, whatever the image size); other formats are read whole. Files are
only read, never modified. Every problem is one string that starts with the file's path; truncation and damage say
:data:`CORRUPT`, "truncated or corrupt, download it again".

What cannot be detected: flipped bytes in an uncompressed file (``.nii``, uncompressed ``.mha``/``.nrrd``, DICOM),
which carries no checksum, read as valid voxel values.

Public API: :func:`check_image_file` (one file), :func:`check_image_files` (many, in parallel, with a progress bar),
:func:`check_image_files_by_file` (the same, per file), :func:`input_image_files` (the files of an nnU-Net input
folder) and :func:`check_dicom_series` (the files of one DICOM series).
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

__all__ = [
    "CORRUPT",
    "NNUNET_IMAGE_ENDINGS",
    "check_dicom_series",
    "check_image_file",
    "check_image_files",
    "check_image_files_by_file",
    "input_image_files",
]

#: The words every truncation or corruption problem contains.
CORRUPT = "truncated or corrupt, download it again"

#: File endings nnU-Net's image readers take (SimpleITK, nibabel, tif and 2-D natural-image readers).
NNUNET_IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl", ".tif", ".tiff", ".png", ".bmp")

_CHUNK = 16 * 2**20  # bytes per read: large enough that Python's per-call overhead vanishes, small enough for RAM
_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI_ENDINGS = (".nii", ".nii.gz")
_DICOM_MAGIC_OFFSET = 128  # the 128-byte preamble, then "DICM"
_NNUNET_CHANNEL = re.compile(r"_\d{4}$")
_ITK_DETAIL_PREFIX = re.compile(r"^\[\w+\]\s*\w+:\s*")  # "[nrrd] _nrrdEncodingRaw_read: "


class _Corrupt(Exception):
    """A file that cannot be read to its end; the message says what was found."""


# ----------------------------------------------------------------------------------------------------------------
# Public API


def check_image_file(path: str | Path) -> list[str]:
    """Problems of one image file (empty if none): truncation or damage, and NaN or infinite voxels.

    Reads the whole file once (see the module docstring for what is checked per format), never modifies it.

    Args:
        path: An image file: NIfTI (``.nii``, ``.nii.gz``) or anything SimpleITK reads (``.mha``, ``.nrrd``, ...).

    Returns:
        One message per problem, each starting with ``path``. A truncated or damaged file gives exactly one
        message, which contains :data:`CORRUPT` ("truncated or corrupt, download it again") and the reason; an
        intact float image with non-finite voxels gives one message with their count.
    """
    path = Path(path)
    if not path.is_file():
        return [f"{path}: no such file"]
    try:
        if path.name.lower().endswith(_NIFTI_ENDINGS):
            n_nan, n_inf, nifti = _scan_nifti(path)
        else:
            if _is_gzip(path):
                _drain_gzip(path)
            if path.name.lower().endswith(".mha"):
                _check_mha_stream(path)
            n_nan, n_inf, nifti = *_scan_with_sitk(path), False
    except _Corrupt as e:
        return [f"{path}: {CORRUPT} ({e})"]
    if n_nan or n_inf:
        # The non-NIfTI formats keep NaN through SimpleITK; only for NIfTI is the silent zero worth saying.
        hidden = "; SimpleITK (nnU-Net's reader) silently reads them as 0" if nifti else ""
        return [f"{path}: {n_nan + n_inf} NaN or infinite voxel(s) ({n_nan} NaN, {n_inf} infinite){hidden}"]
    return []


def check_image_files_by_file(
    paths: Iterable[str | Path],
    *,
    num_processes: int | None = None,
    progress: bool = True,
    desc: str = "checking image files",
) -> dict[Path, list[str]]:
    """:func:`check_image_file` of every file, in parallel; ``{path: its problems}`` in the order given.

    Args:
        paths: Image files.
        num_processes: Files checked at the same time, in threads: the decompression and NaN scan of NIfTI files
            run outside Python's GIL (SimpleITK, which reads the other formats, holds it). None: the number of
            CPUs, at most 8 (nnU-Net's default process count).
        progress: Show a progress bar (tqdm, one step per file).
        desc: The progress bar's label.
    """
    paths = [Path(p) for p in paths]
    workers = max(1, min(num_processes or min(os.cpu_count() or 1, 8), len(paths) or 1))
    bar = dict(total=len(paths), desc=desc, unit="file", disable=not progress, leave=False)
    if workers == 1:
        results = [check_image_file(p) for p in tqdm(paths, **bar)]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(tqdm(pool.map(check_image_file, paths), **bar))
    return dict(zip(paths, results, strict=True))


def check_image_files(
    paths: Iterable[str | Path],
    *,
    num_processes: int | None = None,
    progress: bool = True,
    desc: str = "checking image files",
) -> list[str]:
    """Every problem of every file (empty if none), in the order of ``paths``; see :func:`check_image_file`.

    Typical use, before handing files to nnU-Net::

        problems = check_image_files(files)
        if problems:
            raise InputImageError(folder, problems)  # nnyseg.data.validation: lists them all

    Arguments are those of :func:`check_image_files_by_file`.
    """
    by_file = check_image_files_by_file(paths, num_processes=num_processes, progress=progress, desc=desc)
    return [problem for problems in by_file.values() for problem in problems]


def input_image_files(folder: str | Path) -> list[Path]:
    """The image files nnU-Net predicts from in ``folder``: ``CASE_XXXX<ending>`` (XXXX the channel), sorted.

    The ending is any of :data:`NNUNET_IMAGE_ENDINGS`; hidden files and subfolders are left out, as nnU-Net does.
    """
    found = []
    for p in Path(folder).iterdir():
        name = p.name
        ending = next((e for e in NNUNET_IMAGE_ENDINGS if name.lower().endswith(e)), None)
        if ending and not name.startswith(".") and _NNUNET_CHANNEL.search(name[: -len(ending)]) and p.is_file():
            found.append(p)
    return sorted(found)


def check_dicom_series(folder: str | Path, series_uid: str, files: Sequence[str | Path]) -> list[str]:
    """Files of DICOM series ``series_uid`` in ``folder`` that GDCM reads incompletely or not at all.

    GDCM leaves a truncated slice out of the series without an error (ITK only warns about "non uniform sampling
    or missing slices"), so a converted volume would silently miss a slice. A file is reported when it is a DICOM
    file (``DICM`` after the preamble) that holds ``series_uid`` but is not among ``files`` (the series as GDCM
    lists it), or when it is in ``files`` and SimpleITK cannot read its voxels.

    Args:
        folder: The DICOM folder (only its files, not subfolders).
        series_uid: The series being converted.
        files: The series' files as ``sitk.ImageSeriesReader.GetGDCMSeriesFileNames`` lists them.

    Returns:
        One message per bad file, naming it and saying :data:`CORRUPT`.
    """
    import SimpleITK as sitk

    listed = {Path(f).resolve() for f in files}
    # The UID as a whole value: not the prefix of a longer UID (DICOM pads UIDs with NUL to an even length).
    uid = re.compile(rb"(?<![0-9.])" + re.escape(series_uid.encode("ascii", "replace")) + rb"(?![0-9.])")
    problems = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.resolve() in listed:
            try:
                sitk.ReadImage(str(path))
            except RuntimeError as e:
                problems.append(f"{path}: {CORRUPT} (SimpleITK cannot read it: {_itk_reason(e)})")
            continue
        with path.open("rb") as f:
            if f.read(_DICOM_MAGIC_OFFSET + 4)[_DICOM_MAGIC_OFFSET:] != b"DICM":
                continue  # not a DICOM file (notes, a NIfTI file): never read further
            data = f.read()
        if uid.search(data):
            problems.append(
                f"{path}: {CORRUPT} (a file of DICOM series {series_uid} that GDCM cannot read, so it would leave "
                "a slice out of the volume)"
            )
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Per format


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(2) == _GZIP_MAGIC


class _GzipReader:
    """The decompressed bytes of a gzip file, read in chunks.

    zlib itself checks every member's CRC-32 and length (``wbits=31``), and a stream that ends before its end-of-stream
    marker is an error, so reading to the end checks the whole file. (Python's :mod:`gzip` does the same checks;
    driving zlib directly with large input blocks is about a fifth faster.) Bytes after the last member that do not
    start another member are ignored, as ``gzip -d`` ignores zero padding: no voxel can be lost there.
    """

    def __init__(self, file):
        self._file = file
        self._inflater = zlib.decompressobj(31)
        self._pending = b""
        self._done = False

    def read(self, size: int) -> bytes:
        parts, n = [], 0
        while n < size and not self._done:
            if not self._pending:
                self._pending = self._file.read(_CHUNK // 4)
                if not self._pending:
                    if not self._inflater.eof:
                        raise _Corrupt("gzip: the compressed stream ends before its end-of-stream marker")
                    self._done = True
                    break
            try:
                block = self._inflater.decompress(self._pending, size - n)  # output bounded: constant memory
            except zlib.error as e:  # invalid deflate data, CRC-32 or length mismatch
                raise _Corrupt(_zlib_reason("gzip", e)) from e
            self._pending = self._inflater.unconsumed_tail
            if self._inflater.eof:
                rest = self._inflater.unused_data + self._pending or self._file.read(_CHUNK // 4)
                if rest.startswith(_GZIP_MAGIC):  # another member (e.g. files concatenated by `cat`)
                    self._inflater, self._pending = zlib.decompressobj(31), rest
                else:
                    self._done = True
            parts.append(block)
            n += len(block)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def __enter__(self) -> _GzipReader:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


def _open(path: Path):
    """The file's decompressed byte stream: gzip is recognised by its magic bytes, not by the file name."""
    if path.stat().st_size == 0:
        raise _Corrupt("the file is empty")
    return _GzipReader(path.open("rb")) if _is_gzip(path) else path.open("rb")


def _read(stream, size: int) -> bytes:
    """Up to ``size`` bytes; fewer only at the end of the stream."""
    try:
        return stream.read(size)
    except OSError as e:
        raise _Corrupt(f"cannot be read: {e}") from e


def _drain(stream) -> int:
    """Read ``stream`` to its end (which checks a gzip stream's CRC-32 and length); the number of bytes read."""
    total = 0
    while block := _read(stream, _CHUNK):
        total += len(block)
    return total


def _drain_gzip(path: Path) -> None:
    with _open(path) as stream:
        _drain(stream)


def _nifti_header(stream):
    """The NIfTI-1 or NIfTI-2 header at the start of ``stream`` (nibabel's header classes, no data read)."""
    from nibabel.nifti1 import Nifti1Header
    from nibabel.nifti2 import Nifti2Header

    start = _read(stream, 348)
    size_le = int.from_bytes(start[:4], "little") if len(start) >= 4 else 0
    size_be = int.from_bytes(start[:4], "big") if len(start) >= 4 else 0
    if 348 in (size_le, size_be):
        klass, block = Nifti1Header, start
    elif 540 in (size_le, size_be):
        klass, block = Nifti2Header, start + _read(stream, 540 - 348)
    else:
        raise _Corrupt(f"not a NIfTI header (sizeof_hdr is neither 348 nor 540; {len(start)} header bytes read)")
    if len(block) < klass.template_dtype.itemsize:
        raise _Corrupt(f"the file ends inside its NIfTI header ({len(block)} of {klass.template_dtype.itemsize} bytes)")
    try:
        header = klass(block, check=False)  # SimpleITK accepts headers that nibabel's strict check would refuse
        dtype = header.get_data_dtype()
        shape = header.get_data_shape()
    except Exception as e:  # nibabel's HeaderDataError and friends on a garbled header
        raise _Corrupt(f"invalid NIfTI header: {e}") from e
    return header, len(block), dtype, shape


def _scan_nifti(path: Path) -> tuple[int, int, bool]:
    """(NaN count, infinite count, True) of a NIfTI file read once from start to end; :class:`_Corrupt` if damaged."""
    with _open(path) as stream:
        header, header_size, dtype, shape = _nifti_header(stream)
        # A single-file NIfTI's data starts at vox_offset, never inside the header and its 4 extension-flag bytes.
        offset = max(int(header.get_data_offset()), header_size + 4)
        n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        skipped = header_size
        while skipped < offset:  # header extensions: read, not checked
            block = _read(stream, min(_CHUNK, offset - skipped))
            if not block:
                break
            skipped += len(block)
        scan = np.issubdtype(dtype, np.inexact)  # float or complex: integers cannot hold NaN
        n_nan = n_inf = 0
        got, tail = 0, b""
        while got < n_bytes:
            block = _read(stream, min(_CHUNK, n_bytes - got))
            if not block:
                break
            got += len(block)
            if scan:
                if tail:
                    block = tail + block
                usable = len(block) - len(block) % dtype.itemsize
                values = np.frombuffer(memoryview(block)[:usable], dtype=dtype)
                tail = block[usable:]
                if not np.isfinite(values).all():  # the fast path; counting only when there is something to count
                    n_nan += int(np.count_nonzero(np.isnan(values)))
                    n_inf += int(np.count_nonzero(np.isinf(values)))
        _drain(stream)  # bytes after the data block (allowed), and the gzip CRC/length check at the very end
    if got < n_bytes:
        raise _Corrupt(
            f"its data block holds {got} of the {n_bytes} bytes its header announces "
            f"({'x'.join(map(str, shape))} voxels of {dtype.name}), {100 * got / max(n_bytes, 1):.1f}%"
        )
    return n_nan, n_inf, True


def _check_mha_stream(path: Path) -> None:
    """Decompress a MetaImage's compressed data to its end: ITK reads a damaged zlib stream without error."""
    with path.open("rb") as f:
        head = f.read(65536)
        match = re.search(rb"^ElementDataFile\s*=\s*(\S+)[^\n]*\n", head, re.MULTILINE)
        compressed = re.search(rb"^CompressedData\s*=\s*True", head, re.MULTILINE | re.IGNORECASE)
        if match is None or compressed is None or match.group(1) != b"LOCAL":
            return  # uncompressed (ITK refuses it when short) or data in another file
        f.seek(match.end())
        decompressor = zlib.decompressobj()
        try:
            while not decompressor.eof and (block := f.read(_CHUNK)):
                while block and not decompressor.eof:
                    decompressor.decompress(block, _CHUNK)  # output bounded per call: constant memory
                    block = decompressor.unconsumed_tail
        except zlib.error as e:  # invalid deflate data or an Adler-32 mismatch
            raise _Corrupt(_zlib_reason("zlib", e)) from e
    if not decompressor.eof:
        raise _Corrupt("its compressed data ends before the end of the zlib stream")


def _scan_with_sitk(path: Path) -> tuple[int, int]:
    """(NaN count, infinite count) of a file SimpleITK reads whole; :class:`_Corrupt` if it cannot."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise _Corrupt(f"SimpleITK cannot read it: {_itk_reason(e)}") from e
    values = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(values.dtype, np.inexact) or np.isfinite(values).all():
        return 0, 0
    return int(np.count_nonzero(np.isnan(values))), int(np.count_nonzero(np.isinf(values)))


def _zlib_reason(stream: str, error: zlib.error) -> str:
    """A zlib error in words, e.g. "gzip: its checksum does not match its data (zlib: ... incorrect data check)"."""
    text = str(error)
    if "incorrect data check" in text:
        what = "its checksum does not match its data"
    elif "incorrect length check" in text:
        what = "its length field does not match its data"
    else:
        what = "invalid compressed data"
    return f"{stream}: {what} (zlib: {text})"


def _itk_reason(error: RuntimeError) -> str:
    """What an ITK exception says went wrong, without the C++ file and line (and the misleading "Reason: ...")."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    main = next((line.split("ERROR:", 1)[1].split("):", 1)[-1].strip() for line in lines if "ERROR:" in line), None)
    if main is None:
        return lines[-1] if lines else "unknown ITK error"
    detail = lines[-1]
    if "ERROR:" in detail or detail.startswith("Reason:"):
        return main
    # e.g. NRRD: "[nrrd] _nrrdEncodingRaw_read: fread got only 109177 2-sized things, not 163840"
    return f"{main.rstrip(':')}: {_ITK_DETAIL_PREFIX.sub('', detail)}"
