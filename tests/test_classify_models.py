"""The three models on small generated features: fit, probabilities, CV, save/load, errors; metrics."""

import json
import os
import re
import warnings
import zipfile

import numpy as np
import pytest
import skops.io
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator

from furnitype.classify.metrics import mcnemar_p, score
from furnitype.classify.models import (
    MODEL_NAMES,
    DenseModel,
    FeatureClassifier,
    LogRegModel,
    SVMModel,
    make_model,
)
from furnitype.classify.synthetic import make_features
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


def test_models_describe_their_own_fit(data, fitted):
    X, y, sha, _, _ = data
    logreg = LogRegModel(Cs=(0.1,), cv=50, max_iter=1).fit(X, y, groups=sha)
    assert logreg.chosen() == "C=0.1" and logreg.n_splits_ < 50
    assert logreg.fit_notes() == [
        "lbfgs stopped at max_iter before converging.",
        f"{logreg.n_splits_}-fold CV instead of 50 (the largest class has too few distinct training photos).",
    ]
    assert re.fullmatch(r"its cross-validated log_loss was \d\.\d{3} with C=0\.1", logreg.tuning())
    baseline = make_pipeline(StandardScaler(), LogisticRegression(C=0.1))
    assert logreg.equivalence_to(baseline) == "its cross-validation chose the baseline's own C=0.1: the same model"
    assert fitted["logreg"].fit_notes() == [] and fitted["svm"].equivalence_to(baseline) == ""
    assert re.fullmatch(r"(linear, C=[\d.]+|rbf, C=[\d.]+, gamma=[\d.]+x scale)", fitted["svm"].chosen())
    dense = DenseModel(hidden_units=4, max_epochs=2, validation_fraction=0.0).fit(X, y)
    assert dense.chosen() == "epoch 2/2"
    assert dense.fit_notes() == ["no validation photos, so no early stopping (2 epochs)."]
    assert dense.tuning() == "the dense head is not tuned beyond early stopping (best epoch 2 of 2, 0 validation rows)"


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
        (DenseModel(dropout=1.0), "'dropout' parameter of DenseModel must be a float in the range [0.0, 1.0). Got 1."),
        (DenseModel(hidden_units=2.5), "'hidden_units' parameter of DenseModel must be an int in the range [1, inf)."),
        (LogRegModel(Cs=()), "'Cs' parameter of LogRegModel must be a non-empty list, each item a float in the range"),
        (LogRegModel(Cs=(0.1, -1)), "each item a float in the range (0.0, inf). Got (0.1, -1) instead."),
        (LogRegModel(class_weight="auto"), "'class_weight' parameter of LogRegModel must be a str among {'balanced'}"),
        (LogRegModel(cv=1), "'cv' parameter of LogRegModel must be an int in the range [2, inf). Got 1 instead."),
        (SVMModel(kernels=("poly",)), "'kernels' parameter of SVMModel must be a non-empty list, each item a str"),
        (SVMModel(scoring="log_loss"), "'scoring' parameter of SVMModel must be a str among"),
    ],
)
def test_bad_parameters_are_refused_by_fit(model, message, data):
    with pytest.raises(ValueError, match=re.escape(message)):
        model.fit(data[0], data[1])


def test_bad_fit_inputs_are_refused(data, fitted):
    X, y, _, _, _ = data
    with pytest.raises(ValueError, match="at least 2 classes"):
        LogRegModel().fit(X, np.full(len(y), "bed"))
    with pytest.raises(ValueError, match="Input X contains NaN"):
        LogRegModel().fit(np.full_like(X, np.nan), y)
    with pytest.raises(ValueError, match="X has 10 features, but LogRegModel is expecting 24 features"):
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


@pytest.mark.parametrize("payload", [{"pipeline": os.system}, {"pipeline": eval}, {"pipeline": Payload}],
                         ids=["os.system", "eval", "a class"])
def test_loading_refuses_functions_and_classes(fitted, tmp_path, payload):
    fitted["logreg"].save(tmp_path / "logreg")
    skops.io.dump(payload, tmp_path / "logreg" / "model.skops")
    with pytest.raises(StoreError, match=r"is damaged: model\.skops: holds types furnitype does not trust: "):
        FeatureClassifier.load(tmp_path / "logreg")


def test_loading_refuses_a_keras_file_with_python_code(fitted, tmp_path):
    from furnitype.keras_loader import import_keras

    keras = import_keras()
    fitted["dense"].save(tmp_path / "dense")
    touched = tmp_path / "touched"
    code = keras.Sequential(
        [keras.Input((24,)), keras.layers.Lambda(lambda x, t=str(touched): (open(t, "w").close(), x)[1]),
         keras.layers.Dense(4, activation="softmax")]
    )
    code.save(tmp_path / "dense" / "model.keras")
    touched.unlink()  # building the network ran the lambda once: loading must not
    with pytest.raises(StoreError, match=r"is damaged: model\.keras: not a loadable Keras model \(.*lambda"):
        FeatureClassifier.load(tmp_path / "dense")
    assert not touched.exists()


def test_loading_refuses_a_keras_network_of_other_shapes(fitted, tmp_path):
    fitted["dense"].save(tmp_path / "dense")
    record = json.loads((tmp_path / "dense" / "model.json").read_text())
    (tmp_path / "dense" / "model.json").write_text(json.dumps({**record, "n_features_in": 25}))
    with pytest.raises(StoreError, match=r"model\.keras: a network from \(None, 24\) to \(None, 4\), not from 25 "):
        FeatureClassifier.load(tmp_path / "dense")


def test_loading_refuses_a_damaged_keras_file(fitted, tmp_path):
    fitted["dense"].save(tmp_path / "dense")
    (tmp_path / "dense" / "model.keras").write_bytes(b"not a zip")
    with pytest.raises(StoreError, match=r"is damaged: model\.keras: not a Keras model file \(a \.keras file is a "
                                         r"zip archive; this one is not\)$") as raised:
        FeatureClassifier.load(tmp_path / "dense")
    assert "not found" not in str(raised.value)  # it is there: Keras' own words would say "File not found"
    with zipfile.ZipFile(tmp_path / "dense" / "model.keras", "w") as archive:
        archive.writestr("notes.txt", "a zip, but not of a Keras model")
    with pytest.raises(StoreError, match="is damaged: model.keras: not a loadable Keras model"):
        FeatureClassifier.load(tmp_path / "dense")


def test_scores_of_a_test_set_missing_a_predicted_class():
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.7, 0.2, 0.1], [0.2, 0.1, 0.7], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a class without test photos is expected here, not worth a warning
        got = score(y, proba)
    assert got.accuracy == 0.75
    assert got.balanced_accuracy == 0.75  # recall 1/2 and 2/2; class 2 has no test photos
    assert got.macro_f1 == pytest.approx((2 / 3 + 1 + 0) / 3)  # class 2 was predicted, so it counts
    assert got.top3_accuracy == 1.0
    assert got.log_loss == pytest.approx(-np.mean(np.log([0.7, 0.2, 0.8, 0.6])))
    assert got.confusion == [[1, 0, 1], [0, 2, 0], [0, 0, 0]]
    assert got.per_class == {
        "precision": [1.0, 1.0, 0.0],
        "recall": [0.5, 1.0, 0.0],
        "f1": [pytest.approx(2 / 3), 1.0, 0.0],
        "support": [2, 2, 0],
    }
    assert got.predicted.tolist() == [0, 2, 1, 1]
    assert got.summary() == {
        "accuracy": 0.75,
        "balanced_accuracy": 0.75,
        "macro_f1": 0.555556,
        "top3_accuracy": 1.0,
        "log_loss": round(got.log_loss, 6),
    }


def test_scores_of_two_classes():
    got = score(np.array([0, 1, 1]), np.array([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2]]))
    assert (got.accuracy, got.top3_accuracy) == (pytest.approx(2 / 3), 1.0)
    assert got.confusion == [[1, 0], [1, 1]]


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


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.SkipTestWarning")  # array API checks: not ours
@pytest.mark.parametrize(
    "model",
    [LogRegModel(Cs=(0.1, 1.0), cv=2), SVMModel(linear_Cs=(1.0,), rbf_Cs=(1.0,), rbf_gammas=(1.0,), cv=2)],
    ids=["logreg", "svm"],
)
def test_models_pass_scikit_learn_estimator_checks(model):
    expected = {"check_class_weight_classifiers": "class_weight is None or 'balanced', as on the command line"}
    results = check_estimator(model, on_fail=None, expected_failed_checks=expected)
    assert [f"{r['check_name']}: {r['exception']}" for r in results if r["status"] == "failed"] == []
    assert {r["check_name"] for r in results if r["status"] == "xfail"} == set(expected)
