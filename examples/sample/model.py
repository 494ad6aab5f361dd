"""The sample model every fnplane pod serves by default: a small NumPy MLP classifier.

It is deliberately real (weights loaded from disk, a forward pass per batch) so that the
`local` backend's cold start measures spawn + import + weight loading, and so that tests can
check served answers against the same model computed in-process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_WEIGHTS_PATH = Path(__file__).with_name("weights.npz")

# The keys of weights.npz; make_weights.py writes exactly these, load_model reads exactly these.
WEIGHT_KEYS = ("name", "feature_mean", "feature_scale", "w1", "b1", "w2", "b2")


@dataclass(frozen=True, slots=True)
class Model:
    """A one-hidden-layer ReLU MLP with a softmax head over standardized features.

    The standardization statistics live with the weights, so callers send raw features and
    never need to know how the model was trained.
    """

    name: str
    feature_mean: np.ndarray  # [n_features]
    feature_scale: np.ndarray  # [n_features]
    w1: np.ndarray  # [n_features, n_hidden]
    b1: np.ndarray  # [n_hidden]
    w2: np.ndarray  # [n_hidden, n_classes]
    b2: np.ndarray  # [n_classes]

    def __post_init__(self) -> None:
        """Refuse inconsistent weights at load time rather than on the first request."""
        n_features, n_hidden = self.w1.shape
        checks = {
            "feature_mean": (self.feature_mean.shape, (n_features,)),
            "feature_scale": (self.feature_scale.shape, (n_features,)),
            "b1": (self.b1.shape, (n_hidden,)),
            "w2[0]": (self.w2.shape[:1], (n_hidden,)),
            "b2": (self.b2.shape, self.w2.shape[1:]),
        }
        for key, (got, want) in checks.items():
            if got != want:
                raise ValueError(f"weights are inconsistent: {key} has shape {got}, want {want}")
        if not (self.feature_scale > 0).all():
            raise ValueError("weights are inconsistent: feature_scale must be positive")

    @property
    def n_features(self) -> int:
        """Number of input features per row."""
        return int(self.w1.shape[0])

    @property
    def n_classes(self) -> int:
        """Number of output classes (width of each probability row)."""
        return int(self.w2.shape[1])

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return class probabilities, shape [n, n_classes] float32, for a batch [n, n_features].

        One call computes the whole batch as two matrix products, which is why the server
        hands micro-batches to a single call instead of looping per row.
        """
        batch = self._validated(x)
        z = (batch - self.feature_mean) / self.feature_scale
        hidden = np.maximum(z @ self.w1 + self.b1, 0.0)
        logits = hidden @ self.w2 + self.b2
        # Subtracting the row max keeps exp() from overflowing on extreme inputs.
        logits -= logits.max(axis=1, keepdims=True)
        expd = np.exp(logits)
        probs = expd / expd.sum(axis=1, keepdims=True)
        return probs.astype(np.float32, copy=False)

    def _validated(self, x: np.ndarray) -> np.ndarray:
        """Turn `x` into a float64 [n, n_features] array, or say precisely what is wrong."""
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"input must be numeric, got dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[1] != self.n_features:
            raise ValueError(f"input must have shape [n, {self.n_features}], got {list(arr.shape)}")
        if arr.shape[0] < 1:
            raise ValueError("input must contain at least one row")
        arr = arr.astype(np.float64, copy=False)
        if not np.isfinite(arr).all():
            raise ValueError("input contains NaN or infinite values")
        return arr


def load_model(path: Path | None = None) -> Model:
    """Load the model from a weights file (default: weights.npz next to this module).

    `allow_pickle=False` because a weights file is data and must never execute code.
    """
    weights_path = DEFAULT_WEIGHTS_PATH if path is None else Path(path)
    with np.load(weights_path, allow_pickle=False) as data:
        missing = [key for key in WEIGHT_KEYS if key not in data.files]
        if missing:
            raise ValueError(f"{weights_path} lacks weights {missing}")
        arrays = {key: np.array(data[key], dtype=np.float64) for key in WEIGHT_KEYS[1:]}
        name = str(data["name"])
    return Model(name=name, **arrays)
