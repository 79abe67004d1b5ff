"""DICOM Segmentation objects (DICOM-SEG) of liver/tumour masks on their source CT series, written with highdicom.

:func:`write_dicom_seg` turns a LiTS-labelled mask (0 background, 1 liver, 2 tumour) on the grid ITK read from a CT
series into one binary Segmentation instance (SOP class Segmentation Storage) that PACS viewers, 3D Slicer and OHIF
load beside the CT:

* Two segments, coded with DICOM's own context groups (checked against pydicom's ``codes`` tables):

  1. "Liver": category SCT 91723000 "Anatomical Structure" (CID 7150), type SCT 10200004 "Liver" (CID 7151);
     labels 1 and 2, i.e. the whole organ with its tumours (the segments overlap, ``SegmentsOverlap`` YES);
  2. "Liver tumour": category SCT 49755003 "Morphologically Abnormal Structure" (CID 7150), type SCT 108369006
     "Neoplasm" (CID 7159 "Lesion Segmentation Types"), anatomic region SCT 10200004 "Liver"; label 2.

  The mask is recovered exactly as ``max(liver, 2 x tumour)``.
* Algorithm type AUTOMATIC with an Algorithm Identification (family DCM 123110 "Artificial Intelligence", the
  trainer's name, nnyseg's version, and the model's plans, configuration, folds and checkpoint as parameters).
* One frame per source slice and segment; frames empty in both segments are left out (highdicom's default), and
  every frame references its source CT instance (Derivation Image / Source Image Sequence) and carries the slice's
  Image Position (Patient). Patient, study and equipment-independent attributes (patient name and id, birth date,
  sex, study instance UID, date, time, id, accession number, referring physician) are copied from the CT by
  highdicom; the frame of reference is the CT's.
* A source series that was anonymised with its UIDs blanked (as the TotalSegmentator example series is) is repaired
  in memory, never on disk: an empty SOP Class / Instance UID is taken from the file's meta header (where DICOM
  Part 10 keeps the same values); an empty Study, Series or Frame of Reference UID gets a substitute derived
  deterministically from the instance UIDs (the same series always gets the same substitute), and a note says so,
  because archives and viewers then cannot link the SEG to the CT by that UID.

The ITK grid and the DICOM slices are checked against each other before anything is written: slice ``k`` of the
mask must lie where instance ``k`` says it lies (Image Position (Patient) within 0.01 mm), so an irregularly spaced
series (which ITK reads onto a regular grid) is refused instead of producing misplaced frames.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import nnyseg
from nnyseg.io import atomic_file

__all__ = ["LIVER_SEGMENT", "TUMOUR_SEGMENT", "DicomSegInfo", "read_source_series", "write_dicom_seg"]

LIVER_SEGMENT, TUMOUR_SEGMENT = 1, 2
#: Okabe-Ito blue and orange, the overlay colours of nnyseg's PNGs.
_RGB = {LIVER_SEGMENT: (0, 114, 178), TUMOUR_SEGMENT: (230, 159, 0)}
#: Tolerance (mm) between a slice's Image Position (Patient) and the ITK grid's position of that slice.
POSITION_TOLERANCE_MM = 0.01
_LO_MAX = 64  # DICOM VR LO: at most 64 characters


@dataclass(frozen=True)
class DicomSegInfo:
    """What :func:`write_dicom_seg` wrote.

    Attributes:
        path: The DICOM-SEG file.
        sop_instance_uid: Its SOP Instance UID.
        series_instance_uid: Its (new) Series Instance UID.
        study_instance_uid: The study it belongs to (the CT's, or a substitute, see ``notes``).
        frames: Number of frames written.
        notes: What was repaired in the source's attributes (in memory) to write the object.
    """

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frames: int
    notes: tuple[str, ...]


def _lo(text: str) -> str:
    return text if len(text) <= _LO_MAX else text[: _LO_MAX - 3] + "..."


def read_source_series(files: Sequence[str | Path]) -> tuple[list, list[str]]:
    """The source CT instances' headers (no pixel data) ready for highdicom, and notes on what was repaired.

    Raises:
        ValueError: A file is not DICOM, is multi-frame, has no SOP Instance UID anywhere, or the files disagree on
            their study, series or frame of reference.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import generate_uid

    datasets = []
    notes: list[str] = []
    repaired_instances = 0
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except (InvalidDicomError, OSError) as e:
            raise ValueError(f"{f}: cannot read as DICOM: {e}") from e
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise ValueError(f"{f}: multi-frame (enhanced) CT instances are not supported for DICOM-SEG output")
        meta = getattr(ds, "file_meta", None)
        for keyword, meta_keyword in (
            ("SOPClassUID", "MediaStorageSOPClassUID"),
            ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
        ):
            if not str(ds.get(keyword, "") or ""):
                value = str(meta.get(meta_keyword, "") or "") if meta is not None else ""
                if not value:
                    raise ValueError(f"{f}: no {keyword}, in the dataset or its file meta header; cannot reference it")
                setattr(ds, keyword, value)
                if keyword == "SOPInstanceUID":
                    repaired_instances += 1
        datasets.append(ds)
    if repaired_instances:
        notes.append(
            f"{repaired_instances} source instance(s) have an empty SOP Instance UID; the UID of their file meta "
            "header was used to reference them"
        )
    instance_uids = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    for keyword, what in (
        ("StudyInstanceUID", "Study Instance UID"),
        ("SeriesInstanceUID", "Series Instance UID"),
        ("FrameOfReferenceUID", "Frame of Reference UID"),
    ):
        values = {str(ds.get(keyword, "") or "") for ds in datasets}
        if len(values) > 1:
            raise ValueError(f"{Path(files[0]).parent}: the instances have {len(values)} different {what}s")
        if values == {""}:
            # Deterministic: the same source series always gets the same substitute.
            substitute = generate_uid(entropy_srcs=[f"nnyseg {keyword}", *instance_uids])
            for ds in datasets:
                setattr(ds, keyword, substitute)
            notes.append(
                f"the source series has no {what} (anonymised?); the DICOM-SEG uses the substitute {substitute}, "
                "which the CT does not carry: archives and viewers will not link the two by it"
            )
    return datasets, notes


def _check_positions(datasets: Sequence, reference: sitk.Image, labels: np.ndarray) -> None:
    n, rows, columns = labels.shape
    if len(datasets) != n:
        raise ValueError(f"the mask has {n} slices but the series has {len(datasets)} instances")
    for k, ds in enumerate(datasets):
        if (int(ds.Rows), int(ds.Columns)) != (rows, columns):
            raise ValueError(
                f"instance {ds.SOPInstanceUID}: {ds.Rows} x {ds.Columns} pixels, the mask slice {rows} x {columns}"
            )
        expected = np.array(reference.TransformIndexToPhysicalPoint((0, 0, k)))
        actual = np.array([float(v) for v in ds.ImagePositionPatient])
        if np.max(np.abs(expected - actual)) > POSITION_TOLERANCE_MM:
            raise ValueError(
                f"instance {ds.SOPInstanceUID} lies at {tuple(np.round(actual, 3))} mm but the image grid puts slice "
                f"{k} at {tuple(np.round(expected, 3))} mm: irregular slice spacing or missing slices; cannot place "
                "the DICOM-SEG frames"
            )


def write_dicom_seg(
    labels: np.ndarray,
    source_files: Sequence[str | Path],
    output: str | Path,
    *,
    reference: sitk.Image | None = None,
    algorithm_name: str = "nnyseg",
    algorithm_parameters: Mapping[str, str] | None = None,
    series_description: str = "nnyseg liver and liver tumour",
    overwrite: bool = True,
) -> DicomSegInfo:
    """Write a LiTS-labelled mask as a binary DICOM-SEG on its source series (see the module docstring).

    Args:
        labels: ``(slices, rows, columns)`` array with values 0, 1, 2; slice ``k`` belongs to ``source_files[k]``
            (the order in which ITK's series reader stacked them, ``SimpleITK.GetArrayFromImage`` order).
        source_files: The CT series' files, in slice order.
        output: The file to write (atomically).
        reference: The image ITK read from ``source_files``; when given, every slice's position is checked against
            its instance's Image Position (Patient) first.
        algorithm_name: Name in the Algorithm Identification and Manufacturer's Model Name (e.g. the trainer).
        algorithm_parameters: Name -> value pairs recorded as Algorithm Parameters.
        series_description: The SEG series' description.
        overwrite: Replace an existing ``output``.

    Raises:
        ValueError: Labels outside 0/1/2, a shape or position that does not fit the series, or an unusable source.
        FileExistsError: ``output`` exists and ``overwrite`` is False.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"the mask must be 3D (slices, rows, columns), got shape {labels.shape}")
    unknown = sorted(set(np.unique(labels).tolist()) - {0, 1, 2})
    if unknown:
        raise ValueError(f"the mask holds values {unknown[:10]}; DICOM-SEG output takes LiTS labels 0, 1, 2")
    datasets, notes = read_source_series(source_files)
    if reference is not None:
        _check_positions(datasets, reference, labels)
    elif len(datasets) != labels.shape[0]:
        raise ValueError(f"the mask has {labels.shape[0]} slices but the series has {len(datasets)} instances")

    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(algorithm_name),
        family=codes.cid7162.ArtificialIntelligence,
        version=_lo(nnyseg.__version__),
        source="nnyseg",
        parameters={str(k): str(v) for k, v in (algorithm_parameters or {}).items()} or None,  # LT: no 64 limit
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=LIVER_SEGMENT,
            segment_label="Liver",
            segmented_property_category=codes.cid7150.AnatomicalStructure,
            segmented_property_type=codes.cid7151.Liver,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*_RGB[LIVER_SEGMENT]),
        ),
        hd.seg.SegmentDescription(
            segment_number=TUMOUR_SEGMENT,
            segment_label="Liver tumour",
            segmented_property_category=codes.cid7150.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.cid7159.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[codes.cid7151.Liver],
            display_color=hd.color.CIELabColor.from_rgb(*_RGB[TUMOUR_SEGMENT]),
        ),
    ]
    # Liver includes its tumours (nnU-Net's "liver" region), so the two binary segments overlap.
    pixels = np.stack([labels >= 1, labels == 2], axis=-1)
    source_series_number = datasets[0].get("SeriesNumber")
    series_number = 1000 + (int(source_series_number) if source_series_number not in (None, "") else 0)
    try:
        from importlib.metadata import version

        nnunet_version = version("nnunetv2")
    except Exception:  # only recorded as a software version
        nnunet_version = "unknown"
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="nnyseg",
        manufacturer_model_name=_lo(algorithm_name),
        software_versions=[f"nnyseg {nnyseg.__version__}", f"nnunetv2 {nnunet_version}"],  # type: ignore[arg-type]
        device_serial_number=_lo(f"nnyseg {nnyseg.__version__}"),
        content_label="LIVER_TUMOUR",
        content_description="Automatic liver and liver tumour segmentation",
        series_description=_lo(series_description),
    )
    with atomic_file(output, overwrite=overwrite) as tmp:
        seg.save_as(str(tmp))
    return DicomSegInfo(
        path=Path(output),
        sop_instance_uid=str(seg.SOPInstanceUID),
        series_instance_uid=str(seg.SeriesInstanceUID),
        study_instance_uid=str(seg.StudyInstanceUID),
        frames=int(seg.NumberOfFrames),
        notes=tuple(notes),
    )
