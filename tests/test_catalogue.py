"""The catalogue ``furnitype serve`` follows (``furnitype.serve.catalogue``): from ``ann.THRESHOLD`` live rows on it
holds the rows' paths, labels and digests but not their features, and answers as the exact catalogue does."""

from __future__ import annotations

import numpy as np

from furnitype.features import ann, load, save
from furnitype.serve.catalogue import FollowedStore
from furnitype.similar import _StoredSimilarIndex
from tests import store_writer


def test_a_catalogue_above_the_threshold_answers_as_the_exact_one_without_its_features(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    centres = rng.random((20, 16), dtype=np.float32)
    X = np.maximum(centres[rng.integers(0, 20, 300)] + 0.3 * rng.standard_normal((300, 16), np.float32), 0) + 1e-3
    paths = [f"/photos/p{i:04d}.jpg" for i in range(300)]
    digests = [store_writer.digest(p) for p in paths]
    digests[7] = digests[5]  # one content at two paths: the first row's path is the thumbnail's
    store = tmp_path / "catalogue.h5"
    save(store, features=X, paths=paths, labels=["abc"[i % 3] for i in range(300)], sha256=digests,
         meta=store_writer.SETTINGS)

    exact = FollowedStore(store).snapshot
    monkeypatch.setattr(ann, "THRESHOLD", 100)
    big = FollowedStore(store).snapshot
    assert isinstance(big.index, _StoredSimilarIndex) and not isinstance(exact.index, _StoredSimilarIndex)
    assert len(big) == len(exact) == 300 and big.settings == exact.settings == load(store).settings
    assert big.rows == exact.rows and big.path_of(digests[7]) == paths[5]
    for sha in digests[::15] + ["0" * 64]:
        assert (big.path_of(sha), big.label_of(sha)) == (exact.path_of(sha), exact.label_of(sha))
    assert big.index is not None and exact.index is not None
    for sha in digests[::15]:
        for exclude_self in (True, False):
            assert (big.index.search_sha256(sha, k=10, exclude_self=exclude_self).as_dict()
                    == exact.index.search_sha256(sha, k=10, exclude_self=exclude_self).as_dict())
    queries = X[::25] + 0.05
    assert ([[n.as_dict() for n in m] for m in big.index.search_vectors(queries, k=10)]
            == [[n.as_dict() for n in m] for m in exact.index.search_vectors(queries, k=10)])
    assert big.index._loaded is None  # the features were never loaded
