"""Cross-modal retrieval: does a patient's radiograph land next to the same patient's CT in the shared space?

Beyond the paper. Its motivation (section 1) is that separate 2D and 3D encoders put "a patient's X-ray and CT
features in different manifolds"; its evidence that one encoder fixes this (Table 3 right, Figure 2a) is
indirect. Here it is measured on pairs: radiograph i and CT i are the same patient (phantoms rendered both
ways, data.PAIRED_PHANTOMS; or a CT and its DRR, data.DrrDataset).

    For each query (a radiograph), rank its own patient's CT among all N gallery CTs by cosine similarity of
    the frozen backbone embeddings (rank 1: retrieved first); and the reverse (CT -> radiograph).
    Recall@k = fraction of queries whose own item ranks <= k (chance k / N); median rank (chance (N + 1) / 2).

With `centre`, each modality's mean embedding is removed first: the modality gap is one direction that shifts
every radiograph alike, and cosine similarity of uncentred embeddings can be dominated by it. The means are
taken over the test sets themselves (the gallery is known in retrieval), which is stated beside the table.
CIs: percentile bootstrap over the queries (patients), the gallery kept whole.

Imports numpy only: copy it alone.
"""
import numpy as np

RECALL_AT = (1, 5, 10)


def ranks(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(N,) rank of gallery[i] for queries[i] among all of gallery by cosine similarity; ties count against it."""
    if queries.shape != gallery.shape or queries.ndim != 2:
        raise ValueError(f"retrieval: queries {queries.shape} and gallery {gallery.shape} must be paired (N, D)")
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    sim = q.astype(np.float64) @ g.T.astype(np.float64)  # (N queries, N gallery)
    return (sim >= np.diagonal(sim)[:, None]).sum(axis=1)  # its own item and every one at least as close


def summary(r: np.ndarray) -> dict:
    """Recall@k and the median rank of ranks r."""
    return {**{f"R@{k}": float((r <= k).mean()) for k in RECALL_AT}, "median rank": float(np.median(r))}


def chance(n: int) -> dict:
    """What a random embedding scores on average with a gallery of n."""
    return {**{f"R@{k}": min(k, n) / n for k in RECALL_AT}, "median rank": (n + 1) / 2}


def cross_modal(x_2d: np.ndarray, x_3d: np.ndarray, centre: bool = False, n_boot: int = 1000, seed: int = 0) -> dict:
    """Both directions for paired rows (x_2d[i], x_3d[i]): {direction: {metric: (value, (lo, hi))}}, plus
    "chance": {metric: value} and "n"."""
    if centre:
        x_2d, x_3d = x_2d - x_2d.mean(0), x_3d - x_3d.mean(0)
    rng = np.random.default_rng(seed)
    n = len(x_2d)
    boot = rng.integers(0, n, (n_boot, n))  # the same resamples of patients for every metric and direction
    out = {"n": n, "chance": chance(n)}
    for direction, (q, g) in (("2D -> 3D", (x_2d, x_3d)), ("3D -> 2D", (x_3d, x_2d))):
        r = ranks(q, g)
        point, draws = summary(r), [summary(r[b]) for b in boot]
        out[direction] = {m: (v, tuple(np.percentile([d[m] for d in draws], [2.5, 97.5]).tolist()))
                          for m, v in point.items()}
    return out
