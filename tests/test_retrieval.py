"""Cross-modal retrieval (retrieval.py): ranks by cosine similarity, Recall@k, the modality gap, chance."""
import numpy as np
import pytest

import retrieval


def brute_force_ranks(q, g):
    """One query at a time, the gallery sorted by cosine similarity (its own item last among equals)."""
    out = []
    for i in range(len(q)):
        sims = [float(q[i] @ g[j] / np.linalg.norm(q[i]) / np.linalg.norm(g[j])) for j in range(len(g))]
        order = sorted(range(len(g)), key=lambda j: (-sims[j], j == i))
        out.append(order.index(i) + 1)
    return np.array(out)


def test_ranks_equal_sorting_the_gallery_one_query_at_a_time():
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((40, 8)), rng.standard_normal((40, 8))
    g[3] = g[5]  # a tie: counted against the query whose own item it is
    assert np.array_equal(retrieval.ranks(q, g), brute_force_ranks(q, g))


def test_the_same_patient_both_ways_is_retrieved_first_and_noise_scores_chance():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 16))
    perfect = retrieval.cross_modal(x, 3 * x + 0.01 * rng.standard_normal(x.shape), n_boot=50)
    assert perfect["2D -> 3D"]["R@1"][0] == 1.0 and perfect["3D -> 2D"]["median rank"][0] == 1.0
    noise = [retrieval.cross_modal(rng.standard_normal((200, 16)), rng.standard_normal((200, 16)), n_boot=20, seed=s)
             for s in range(20)]
    assert np.mean([r["2D -> 3D"]["R@10"][0] for r in noise]) == pytest.approx(noise[0]["chance"]["R@10"], abs=0.015)
    assert np.mean([r["3D -> 2D"]["median rank"][0] for r in noise]) == pytest.approx(100.5, abs=8)
    lo, hi = perfect["2D -> 3D"]["R@1"][1]
    assert lo == hi == 1.0


def test_removing_each_modalitys_mean_undoes_a_modality_gap():
    """A gap that shifts every radiograph alike swamps cosine similarity; centring removes exactly it."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((100, 16))
    gap = np.zeros(16)
    gap[0] = 50.0
    shifted = x + gap
    assert retrieval.cross_modal(shifted, x, centre=False, n_boot=10)["2D -> 3D"]["R@1"][0] < 0.2
    assert retrieval.cross_modal(shifted, x, centre=True, n_boot=10)["2D -> 3D"]["R@1"][0] == 1.0


def test_unpaired_shapes_are_refused():
    with pytest.raises(ValueError, match="must be paired"):
        retrieval.ranks(np.zeros((3, 4)), np.zeros((4, 4)))
