"""Loading a trained multi-label model: :func:`load_multilabel_model`, for the CLI and the scripts."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch

from torchfpi.io import PathLike


def load_multilabel_model(checkpoint: PathLike, device: Union[str, torch.device, None] = None
                          ) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The best model of a ``torchfpi train multilabel`` run, in eval mode, and its record.

    Args:
        checkpoint: the run's checkpoint (``--checkpoint-dir``/``DATASET-MODEL-seedSEED.pt``); read
            with ``weights_only=True``.
        device: where the model runs (default CPU).

    Returns:
        ``(model, info)``: ``model(x)`` gives logits ``(B, L)`` of features ``(B, F)``; predict
        the labels with ``torch.sigmoid(model(x)) >= info["threshold"]`` (the threshold chosen on
        validation). ``info`` also holds ``val_f1``, ``epoch``, ``step`` and the training ``config``.

    Raises:
        FileNotFoundError: no such file.
        DataError: not a multi-label training checkpoint, or one without a validated model.

    Example:
        >>> model, info = load_multilabel_model("runs/bibtex-fpi_gd-seed0.pt")  # doctest: +SKIP
        >>> (torch.sigmoid(model(x)) >= info["threshold"]).shape  # doctest: +SKIP
        torch.Size([B, 159])
    """
    from pathlib import Path

    from torchfpi.apps._trainer import CHECKPOINT_KEYS
    from torchfpi.apps._training import load_checkpoint, restoring
    from torchfpi.apps.multilabel.models import ModelConfig, MultiLabelModel
    from torchfpi.errors import DataError

    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    state = load_checkpoint(path, required=CHECKPOINT_KEYS, app="multilabel")
    weights: Optional[Dict[str, torch.Tensor]] = state["best_state"]
    if weights is None:
        raise DataError(f"'{path}' holds no validated model yet (killed before the first epoch ended): "
                        "resume the run with --resume")
    with restoring(path):
        cfg = state["config"]
        dims = state["task"]["dims"]
        model = MultiLabelModel(cfg["model"], dims["num_features"], dims["num_labels"],
                                ModelConfig(**cfg["model_cfg"]))
        model = model.to({"float64": torch.float64}.get(cfg.get("dtype"), torch.float32))
        model.load_state_dict(weights)
    info = {**state["best"], "config": cfg}
    return model.to(torch.device(device) if device is not None else torch.device("cpu")).eval(), info


__all__ = ["load_multilabel_model"]
