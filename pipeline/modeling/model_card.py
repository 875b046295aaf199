"""The README.md beside a model's weights: a model card in the layout timm writes when it pushes a
model to a hub (YAML front matter, then details, training, metrics, usage), so a model directory
can be uploaded as it is and read by someone who never ran the pipeline."""

from __future__ import annotations

import json

import pipeline

_TOP1 = (("test_top1", "test"), ("val_top1", "validation"))


def readme(card: dict, config: dict, name: str, license: str | None) -> str:
    """Markdown for a finished model: ``card`` (ours: role, round, parents, metrics, code version),
    ``config`` (timm's config.json), ``name`` (what the model is called: experiment and round)."""
    pc, metrics = config.get("pretrained_cfg", {}), card.get("metrics", {})
    front = ["---", "tags:", "- image-classification", "- timm", "- noisy-student", "library_name: timm"]
    if license:
        front.append(f"license: {license}")
    front.append("---")
    arch, timm_arch = card.get("arch") or config["architecture"], config["architecture"]
    source = config.get("source")
    labels = config.get("label_names") or []
    c, h, w = pc.get("input_size", (0, 0, 0))
    role = card.get("role", "model")
    kind = {"teacher": "the round-0 teacher", "student": f"the round-{card.get('round')} Noisy Student student",
            "distilled": "a model distilled from a trained model"}.get(role, role)
    lines = [*front, f"# Model card for {name}", "",
             f"An image classifier trained by noisy-student {pipeline.__version__}: {kind}.", "",
             "## Model Details", "- **Model Type:** Image classification",
             f"- **Architecture:** `{arch}`" + (f" (timm `{timm_arch}` with `model_args` in config.json)"
                                                if arch != timm_arch else ""),
             f"- **Params (M):** {metrics['params'] / 1e6:.2f}" if metrics.get("params") else None,
             f"- **Image size:** {h} x {w}, {'grayscale' if c == 1 else 'RGB'}; mean {pc.get('mean')}, "
             f"std {pc.get('std')}",
             f"- **Classes ({len(labels)}):** {', '.join(labels)}"]
    if source:
        lines.append(f"- **Provided by:** the `{source['package']}` package, version {source['version']} "
                     f"(`import {source['module']}` registers it with timm)")
    parents = card.get("parents", {})
    lines += ["", "## Training", f"- **Role:** {role}" + (f", round {card['round']}" if "round" in card else "")]
    for key, what in (("data_manifest_sha256", "prepared data (manifest sha256)"),
                      ("teacher_sha256", "teacher weights (sha256)"),
                      ("pseudo_labels_manifest_sha256", "pseudo labels (manifest sha256)")):
        if parents.get(key):
            lines.append(f"- **{what[0].upper() + what[1:]}:** `{parents[key]}`")
    if card.get("noise"):
        lines.append(f"- **Noise:** `{json.dumps(card['noise'], sort_keys=True)}`")
    scores = [(label, metrics[k]) for k, label in _TOP1 if metrics.get(k) is not None]
    if scores:
        lines += ["", "## Metrics", "| split | top-1 (%) |", "|---|---|"] + [f"| {s} | {v:.2f} |" for s, v in scores]
    imports = f"import {source['module']}  # registers {timm_arch}\n" if source else ""
    lines += ["", "## Model Usage", "```python", f"import timm\n{imports}",
              'model = timm.create_model("local-dir:<this directory>", pretrained=True).eval()',
              "data_config = timm.data.resolve_model_data_config(model)",
              "transforms = timm.data.create_transform(**data_config, is_training=False)", "```", "",
              "## Provenance", f"- noisy-student {pipeline.__version__}, code `{card.get('code_version', '?')}`"]
    return "\n".join(line for line in lines if line is not None) + "\n"
