"""Train the sample MLP on a synthetic Iris-like dataset and write examples/sample/weights.npz.

Run as `python -m examples.sample.make_weights`. Training is deterministic (fixed seed,
full-batch gradient descent in plain NumPy) and takes well under a second, so the committed
weights file can always be regenerated and reviewed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from examples.sample.model import DEFAULT_WEIGHTS_PATH, WEIGHT_KEYS, load_model

SEED = 20240601
N_HIDDEN = 16
SAMPLES_PER_CLASS = 100
EPOCHS = 1500
LEARNING_RATE = 0.1
MOMENTUM = 0.9

# Per-class means and standard deviations of (sepal length, sepal width, petal length,
# petal width) in cm, close to Fisher's Iris data: setosa, versicolor, virginica. The last
# two overlap a little, as in the real data, so the model is not trivially perfect.
CLASS_MEANS = np.array(
    [[5.01, 3.43, 1.46, 0.25], [5.94, 2.77, 4.26, 1.33], [6.59, 2.97, 5.55, 2.03]]
)
CLASS_STDS = np.array(
    [[0.35, 0.38, 0.17, 0.11], [0.52, 0.31, 0.47, 0.20], [0.64, 0.32, 0.55, 0.27]]
)


def make_dataset(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw Gaussian samples per class; features [n, 4] in cm, labels [n] in {0, 1, 2}."""
    n_classes, n_features = CLASS_MEANS.shape
    noise = rng.standard_normal((n_classes, SAMPLES_PER_CLASS, n_features))
    x = (CLASS_MEANS[:, None, :] + noise * CLASS_STDS[:, None, :]).reshape(-1, n_features)
    # Physical lengths are never negative; clipping keeps the synthetic data plausible.
    x = np.clip(x, 0.05, None)
    y = np.repeat(np.arange(n_classes), SAMPLES_PER_CLASS)
    return x, y


def train(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fit the MLP by full-batch gradient descent with momentum on softmax cross-entropy."""
    n, n_features = x.shape
    n_classes = int(y.max()) + 1
    mean, scale = x.mean(axis=0), x.std(axis=0)
    z = (x - mean) / scale
    onehot = np.eye(n_classes)[y]

    # He initialisation suits the ReLU layer; a small output layer starts near uniform.
    params = {
        "w1": rng.standard_normal((n_features, N_HIDDEN)) * np.sqrt(2.0 / n_features),
        "b1": np.zeros(N_HIDDEN),
        "w2": rng.standard_normal((N_HIDDEN, n_classes)) * 0.1,
        "b2": np.zeros(n_classes),
    }
    velocity = {key: np.zeros_like(value) for key, value in params.items()}

    for _ in range(EPOCHS):
        pre = z @ params["w1"] + params["b1"]
        hidden = np.maximum(pre, 0.0)
        logits = hidden @ params["w2"] + params["b2"]
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)

        d_logits = (probs - onehot) / n
        d_hidden = (d_logits @ params["w2"].T) * (pre > 0)
        grads = {
            "w1": z.T @ d_hidden,
            "b1": d_hidden.sum(axis=0),
            "w2": hidden.T @ d_logits,
            "b2": d_logits.sum(axis=0),
        }
        for key, grad in grads.items():
            velocity[key] = MOMENTUM * velocity[key] - LEARNING_RATE * grad
            params[key] += velocity[key]

    return {"feature_mean": mean, "feature_scale": scale, **params}


def main(argv: list[str] | None = None) -> None:
    """Train, write the weights file, and report accuracy as a sanity check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS_PATH, help="weights file")
    parser.add_argument("--name", default="sample", help="model name stored in the file")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    rng = np.random.default_rng(SEED)
    x, y = make_dataset(rng)
    arrays = train(x, y, rng)
    # float32 halves the file and is what the OIP outputs advertise; the model upcasts on load.
    weights = {key: value.astype(np.float32) for key, value in arrays.items()}
    np.savez(args.out, name=np.array(args.name), **weights)
    elapsed = time.perf_counter() - started

    model = load_model(args.out)
    if set(WEIGHT_KEYS) != {"name", *weights}:
        raise RuntimeError("make_weights and load_model disagree on the weight keys")
    accuracy = float((model.predict(x).argmax(axis=1) == y).mean())
    print(
        f"wrote {args.out} ({args.out.stat().st_size} bytes): {model.n_features} -> "
        f"{N_HIDDEN} ReLU -> {model.n_classes} softmax, train accuracy {accuracy:.3f}, "
        f"{elapsed:.2f} s"
    )


if __name__ == "__main__":
    main()
