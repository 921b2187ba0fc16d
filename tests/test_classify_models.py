"""The three models on small generated features: fit, probabilities, CV, save/load, errors; metrics."""

import json

import numpy as np
import pytest
import skops.io
from sklearn.exceptions import NotFittedError
from sklearn.metrics import balanced_accuracy_score, f1_score, log_loss, top_k_accuracy_score

from furnitype.classify.models import (
    MODEL_NAMES,
    DenseModel,
    FeatureClassifier,
    LogRegModel,
    SVMModel,
    make_model,
)
from furnitype.classify.synthetic import make_features
from furnitype.classify.train import mcnemar_p, score
from furnitype.errors import StoreError

#: Small settings so that every fit takes well under a few seconds.
SMALL = {
    "dense": {"hidden_units": 16, "max_epochs": 40, "patience": 5, "batch_size": 16},
    "logreg": {"Cs": (0.01, 0.1, 1.0), "cv": 3},
    "svm": {"linear_Cs": (0.01, 1.0), "rbf_Cs": (1.0, 10.0), "rbf_gammas": (0.5, 1.0), "cv": 3},
}


@pytest.fixture(scope="module")
def data():
    X, y, sha = make_features([18, 18, 18, 18], 24, seed=3, separation=2.5)
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), dtype=bool)
    test[rng.permutation(len(y))[:16]] = True
    return X[~test], y[~test], sha[~test], X[test], y[test]


@pytest.fixture(scope="module")
def fitted(data):
    X, y, sha, _, _ = data
    return {
        name: make_model(name, random_state=0, **SMALL[name]).fit(X, y, groups=sha) for name in MODEL_NAMES
    }


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_learns_and_gives_probabilities(name, data, fitted):
    _, _, _, X_test, y_test = data
    model = fitted[name]
    proba = model.predict_proba(X_test)
    assert proba.shape == (len(X_test), 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert model.classes_.tolist() == ["bed", "chair", "cupboard", "fridge"]
    assert model.n_features_in_ == 24
    assert np.mean(model.predict(X_test) == y_test) >= 0.8


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_reloaded_model_predicts_the_same(name, data, fitted, tmp_path):
    _, _, _, X_test, _ = data
    model = fitted[name]
    model.save(tmp_path / name)
    loaded = FeatureClassifier.load(tmp_path / name)
    assert type(loaded) is type(model)
    assert loaded.get_params() == json.loads(json.dumps(model.get_params()))
    np.testing.assert_allclose(
        loaded.predict_proba(X_test), model.predict_proba(X_test), rtol=1e-6, atol=1e-7
    )
    assert loaded.summary() == json.loads(json.dumps(model.summary()))
    description = json.loads((tmp_path / name / "model.json").read_text())
    assert description["model"] == name
    assert (tmp_path / name / description["payload"]).is_file()


def test_logreg_chooses_c_by_cross_validation(fitted):
    model = fitted["logreg"]
    assert model.best_params_["C"] in (0.01, 0.1, 1.0)
    assert [r["params"]["C"] for r in model.cv_results_] == [0.01, 0.1, 1.0]
    best = min(model.cv_results_, key=lambda r: r["log_loss"])
    assert best["params"] == model.best_params_
    assert model.n_splits_ == 3


def test_svm_considers_linear_and_rbf(fitted):
    model = fitted["svm"]
    kernels = [r["params"]["kernel"] for r in model.cv_results_]
    assert kernels == ["linear"] * 2 + ["rbf"] * 4
    assert model.best_params_ in [r["params"] for r in model.cv_results_]
    assert max(r["accuracy"] for r in model.cv_results_) == pytest.approx(
        next(r["accuracy"] for r in model.cv_results_ if r["params"] == model.best_params_)
    )


def test_svm_precomputed_kernels_match_direct_fits(data, fitted):
    X, y, sha, X_test, _ = data
    direct = SVMModel(precompute_max_rows=0, random_state=0, **SMALL["svm"]).fit(X, y, groups=sha)
    assert [r["accuracy"] for r in direct.cv_results_] == [r["accuracy"] for r in fitted["svm"].cv_results_]
    assert direct.best_params_ == fitted["svm"].best_params_
    np.testing.assert_allclose(direct.predict_proba(X_test), fitted["svm"].predict_proba(X_test), atol=1e-4)


def test_dense_stops_early_on_validation_rows(fitted):
    model = fitted["dense"]
    assert 1 <= model.best_epoch_ <= model.epochs_run_ <= 40
    assert model.n_validation_ > 0


def test_dense_without_validation_trains_all_epochs(data):
    X, y, _, _, _ = data
    model = DenseModel(hidden_units=8, max_epochs=3, validation_fraction=0.0, class_weight="balanced")
    model.fit(X, y)
    assert (model.epochs_run_, model.best_epoch_, model.n_validation_) == (3, 3, 0)


def test_balanced_class_weights_and_two_classes(data):
    X, y, sha, X_test, y_test = data
    keep, keep_test = np.isin(y, ["bed", "chair"]), np.isin(y_test, ["bed", "chair"])
    for model in (LogRegModel(class_weight="balanced", **SMALL["logreg"]), SVMModel(**SMALL["svm"])):
        model.fit(X[keep], y[keep], groups=sha[keep])
        assert model.predict_proba(X_test[keep_test]).shape == (int(keep_test.sum()), 2)


def test_identical_photos_share_a_fold(data):
    X, y, _, _, _ = data
    groups = np.array([f"g{i // 2}" for i in range(len(y))])
    y_pairs = y[np.arange(len(y)) // 2 * 2]  # both rows of a pair get the pair's label
    model = LogRegModel(**SMALL["logreg"]).fit(X, y_pairs, groups=groups)
    assert model.n_splits_ == 3


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_predict_before_fit_is_refused(name, data):
    with pytest.raises(NotFittedError, match="not fitted yet"):
        make_model(name).predict_proba(data[3])


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (DenseModel(dropout=1.0), r"dropout must be a number in \[0, 1\). Received: dropout=1.0"),
        (DenseModel(hidden_units=2.5), "hidden_units must be an integer >= 1. Received: hidden_units=2.5"),
        (LogRegModel(Cs=()), r"Cs must be a non-empty list, each item a number > 0. Received: Cs=\(\)"),
        (LogRegModel(class_weight="auto"), "class_weight must be one of None, 'balanced'. Received"),
        (SVMModel(kernels=("poly",)), "kernels must be a non-empty list, each item one of 'linear', 'rbf'"),
        (SVMModel(scoring="log_loss"), "scoring must be one of 'accuracy', 'balanced_accuracy'"),
    ],
)
def test_bad_parameters_are_refused_by_fit(model, message, data):
    with pytest.raises(ValueError, match=message):
        model.fit(data[0], data[1])


def test_bad_fit_inputs_are_refused(data, fitted):
    X, y, _, _, _ = data
    with pytest.raises(ValueError, match="at least 2 classes"):
        LogRegModel().fit(X, np.full(len(y), "bed"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        LogRegModel().fit(np.full_like(X, np.nan), y)
    with pytest.raises(ValueError, match="fitted on 24"):
        fitted["logreg"].predict_proba(X[:, :10])


def test_make_model_rejects_unknown_names_and_ignores_foreign_options():
    with pytest.raises(ValueError, match="unknown model 'knn'; choose from dense, logreg, svm"):
        make_model("knn")
    assert make_model("dense", cv=3, validation_fraction=None).validation_fraction == 0.15


def test_loading_checks_the_kind_and_the_folder(fitted, tmp_path):
    fitted["svm"].save(tmp_path / "svm")
    with pytest.raises(StoreError, match="holds a svm model, not a logreg model"):
        LogRegModel.load(tmp_path / "svm")
    with pytest.raises(StoreError, match="holds no saved model"):
        FeatureClassifier.load(tmp_path / "nothing")


class Payload:
    """A type that skops does not trust."""


def test_loading_refuses_untrusted_types(fitted, tmp_path):
    fitted["logreg"].save(tmp_path / "logreg")
    skops.io.dump({"pipeline": Payload()}, tmp_path / "logreg" / "model.skops")
    with pytest.raises(StoreError, match="holds types furnitype does not trust: .*Payload"):
        FeatureClassifier.load(tmp_path / "logreg")


def test_loading_refuses_a_damaged_keras_file(fitted, tmp_path):
    fitted["dense"].save(tmp_path / "dense")
    (tmp_path / "dense" / "model.keras").write_bytes(b"not a zip")
    with pytest.raises(StoreError, match="is not a loadable Keras model"):
        FeatureClassifier.load(tmp_path / "dense")


def test_score_agrees_with_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, size=200)
    y[:5] = 4
    proba = rng.dirichlet(np.ones(5), size=200)
    proba[np.arange(100), y[:100]] += 1.0
    proba /= proba.sum(axis=1, keepdims=True)
    got = score(y, proba, 5)
    predicted = proba.argmax(axis=1)
    assert got["accuracy"] == pytest.approx(np.mean(predicted == y))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, predicted))
    assert got["macro_f1"] == pytest.approx(f1_score(y, predicted, average="macro"))
    assert got["top3_accuracy"] == pytest.approx(top_k_accuracy_score(y, proba, k=3, labels=range(5)))
    assert got["log_loss"] == pytest.approx(log_loss(y, proba, labels=range(5)))
    assert np.sum(got["confusion"]) == 200 and got["per_class"]["support"] == np.bincount(y).tolist()


def test_mcnemar():
    right = np.ones(100, dtype=bool)
    assert mcnemar_p(right, right) == 1.0
    worse = right.copy()
    worse[:20] = False
    assert mcnemar_p(right, worse) == pytest.approx(2 / 2**20)
    mixed = right.copy()
    mixed[:3] = False
    other = right.copy()
    other[3:5] = False
    assert mcnemar_p(mixed, other) == 1.0
