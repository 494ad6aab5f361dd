"""The sample model: shapes, probabilities, determinism, and that its weights regenerate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from examples.sample import make_weights
from examples.sample.model import DEFAULT_WEIGHTS_PATH, WEIGHT_KEYS, Model, load_model

# Textbook prototypes of the three Iris species (sepal length/width, petal length/width, cm).
SETOSA = [5.1, 3.5, 1.4, 0.2]
VERSICOLOR = [6.0, 2.8, 4.4, 1.3]
VIRGINICA = [6.7, 3.0, 5.6, 2.1]


@pytest.fixture(scope="module")
def model() -> Model:
    """The committed model, loaded once."""
    return load_model()


def test_describes_itself(model: Model) -> None:
    assert (model.name, model.n_features, model.n_classes) == ("sample", 4, 3)


def test_predict_returns_one_probability_row_per_input_row(model: Model) -> None:
    batch = np.random.default_rng(0).uniform(0.1, 8.0, size=(7, 4))

    probs = model.predict(batch)

    assert probs.shape == (7, 3)
    assert probs.dtype == np.float32
    assert ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_batch_equals_row_by_row(model: Model) -> None:
    batch = np.array([SETOSA, VERSICOLOR, VIRGINICA])

    rows = np.concatenate([model.predict(batch[i : i + 1]) for i in range(3)])

    np.testing.assert_allclose(model.predict(batch), rows, rtol=1e-6)


def test_classifies_species_prototypes(model: Model) -> None:
    probs = model.predict(np.array([SETOSA, VERSICOLOR, VIRGINICA], dtype=np.float32))

    assert probs.argmax(axis=1).tolist() == [0, 1, 2]


def test_is_deterministic_across_calls_and_loads(model: Model) -> None:
    batch = np.array([SETOSA, VIRGINICA])

    assert np.array_equal(model.predict(batch), load_model().predict(batch))
    assert np.array_equal(model.predict(batch), model.predict(batch))


def test_survives_extreme_but_finite_input(model: Model) -> None:
    probs = model.predict(np.array([[1e30, -1e30, 1e30, 1e30]]))

    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    ("bad_input", "message"),
    [
        (np.array(SETOSA), r"shape \[n, 4\]"),
        (np.zeros((2, 3)), r"shape \[n, 4\]"),
        (np.zeros((1, 2, 4)), r"shape \[n, 4\]"),
        (np.zeros((0, 4)), "at least one row"),
        (np.array([[np.nan, 1.0, 1.0, 1.0]]), "NaN or infinite"),
        (np.array([[np.inf, 1.0, 1.0, 1.0]]), "NaN or infinite"),
        (np.array([["5.1", "3.5", "1.4", "0.2"]]), "numeric"),
        (np.array([[True, False, True, False]]), "numeric"),
    ],
    ids=["1-d", "3-features", "3-d", "no-rows", "nan", "inf", "strings", "booleans"],
)
def test_rejects_bad_input_with_value_error(
    model: Model, bad_input: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        model.predict(bad_input)


def test_load_refuses_a_file_missing_weights(tmp_path: Path) -> None:
    path = tmp_path / "partial.npz"
    np.savez(path, name=np.array("x"), w1=np.zeros((4, 16), dtype=np.float32))

    with pytest.raises(ValueError, match="lacks weights"):
        load_model(path)


def test_make_weights_regenerates_the_committed_file(tmp_path: Path) -> None:
    out = tmp_path / "weights.npz"

    make_weights.main(["--out", str(out)])

    # Not bit-equality: BLAS kernels differ across CPUs, so the last float bits may too.
    with np.load(out) as fresh, np.load(DEFAULT_WEIGHTS_PATH) as committed:
        assert str(fresh["name"]) == str(committed["name"])
        for key in WEIGHT_KEYS[1:]:
            np.testing.assert_allclose(
                fresh[key], committed[key], rtol=1e-4, atol=1e-5, err_msg=key
            )
