"""Multi-label classification with fixed-point layers (Bibtex, Delicious, Bookmarks).

Models (:mod:`.models`): a strong MLP, SPEN (unrolled energy), FPI_NN and FPI_GD, all on the
same unary network. Training (:mod:`.train`) selects epoch and threshold on a validation split
carved from the training set and evaluates the test split once. Metrics in :mod:`.metrics`.
"""

from torchfpi.apps.multilabel.api import load_multilabel_model
from torchfpi.apps.multilabel.metrics import best_threshold, example_f1, mean_example_f1
from torchfpi.apps.multilabel.models import MODELS, ModelConfig, MultiLabelModel
from torchfpi.apps.multilabel.train import (
    Splits,
    TrainConfig,
    make_splits,
    predict,
    train_multilabel,
)

__all__ = [
    "MODELS",
    "ModelConfig",
    "MultiLabelModel",
    "Splits",
    "TrainConfig",
    "best_threshold",
    "example_f1",
    "load_multilabel_model",
    "make_splits",
    "mean_example_f1",
    "predict",
    "train_multilabel",
]
