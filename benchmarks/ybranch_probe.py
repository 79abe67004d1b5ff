"""How strongly does a trained clinical nnY-Net's summary vector depend on the diagnosis? (issue #15, docs/nnynet.md)

Loads the clinical model that ``benchmarks/ybranch.py`` trained for one seed and feeds it the centred training-patch
window of the first two held-out images, with the categorical field ``diagnosis`` set to each of its two categories.
It reports:

* the norm of the branch's summary vector ``o``;
* how far the diagnosis moves ``o`` (absolute, and as a fraction of ``|o|``);
* the distance between the two category tokens;
* the largest change the diagnosis makes in each FiLM layer's ``(gamma, beta)``.

    python benchmarks/ybranch_probe.py /tmp/nnyseg_ybranch/seed_5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

DATASET = "Dataset502_YBranchPhantom"
MODEL = "nnYNetTrainer__nnYNetPlans__ybranch_clinical"
CONFIGURATION = "ybranch_clinical"


def probe(seed_folder: Path, field: str = "diagnosis") -> dict[str, float | list[float]]:
    from nnyseg.nnunet_integration import load_checkpoint
    from nnyseg.registry import build_from_architecture

    model = seed_folder / "nnUNet_results" / DATASET / MODEL
    plans = json.loads((model / "plans.json").read_text(encoding="utf-8"))
    dataset = json.loads((model / "dataset.json").read_text(encoding="utf-8"))
    configuration = plans["configurations"][CONFIGURATION]
    architecture = (
        configuration.get("architecture") or plans["configurations"][configuration["inherits_from"]]["architecture"]
    )
    num_outputs = len(dataset["labels"]) - 1 if "regions_class_order" in dataset else len(dataset["labels"])
    network = build_from_architecture(architecture, 1, num_outputs, deep_supervision=False)
    checkpoint = load_checkpoint(model / "fold_0" / "checkpoint_final.pth")
    network.load_state_dict(checkpoint["network_weights"])
    network.eval()

    props = plans["foreground_intensity_properties_per_channel"]["0"]
    patch = configuration["patch_size"]
    images = []
    for path in sorted((seed_folder / "nnUNet_raw" / DATASET / "imagesTs").glob("*.nii.gz"))[:2]:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
        array = (np.clip(array, props["percentile_00_5"], props["percentile_99_5"]) - props["mean"]) / props["std"]
        size = patch  # one centred window, as the sliding-window predictor sees the image
        start = [(s - c) // 2 for s, c in zip(array.shape, size, strict=True)]
        crop = array[tuple(slice(b, b + c) for b, c in zip(start, size, strict=True))]
        images.append(torch.from_numpy(np.ascontiguousarray(crop)))
    x = torch.stack(images)[:, None]

    branch = network.cross_attention
    tokenizer = branch.tokenizer
    j = tokenizer.field_names.index(field)
    values = torch.zeros(x.shape[0], tokenizer.num_fields)
    missing = torch.zeros_like(values, dtype=torch.bool)
    with torch.no_grad():
        bottleneck = network.encoder(x)[-1]
        summaries = []
        for category in (0, 1):
            forced = values.clone()
            forced[:, j] = category
            summaries.append(branch.summarise(bottleneck, (forced, missing)))
        films = [branch.film, *branch.level_films]
        moved = (summaries[0] - summaries[1]).norm(dim=1).mean().item()
        norm = summaries[0].norm(dim=1).mean().item()
        table = tokenizer.category_embedding.weight
        return {
            "window": list(x.shape[2:]),
            "summary_norm": norm,
            "diagnosis_moves_summary": moved,
            "relative": moved / norm,
            "category_token_distance": float((table[0] - table[1]).norm()),
            "max_film_change": [round(float((f(summaries[0]) - f(summaries[1])).abs().max()), 3) for f in films],
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("seed_folders", nargs="+", type=Path, help="ybranch.py's per-seed folders (WORKDIR/seed_N)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for folder in args.seed_folders:
        result = probe(folder)
        cells = (f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
        print(f"{folder}: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
