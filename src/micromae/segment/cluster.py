"""k-means on pixel embeddings: fit on a subsample, save the centres with metadata, predict anywhere.

MAESTER fits k-means on a random subsample of pixel embeddings (500 000 of ~600 M in the supplement) and
assigns every pixel to its nearest centre. Fitting uses scikit-learn (``MiniBatchKMeans`` for large samples,
``KMeans`` otherwise) or faiss when it is installed and asked for; prediction is a matrix product on the
embeddings' own device, so it runs on the GPU next to the encoder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import micromae
from micromae.errors import input_error
from micromae.io import atomic_path


@dataclass
class ClusterModel:
    """k centres in embedding space plus where they came from.

    centers: (k, D) float32. meta: checkpoint hash, k, seed, sample size, feature dimension, embedding mode, ...
    """

    centers: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.centers.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centers.shape[1])

    def squared_distances(self, features: torch.Tensor) -> torch.Tensor:
        """features: (N, D) → (N, k) squared Euclidean distances to the centres (on features' device)."""
        self._check_dim(features.shape[-1])
        c = torch.as_tensor(self.centers, device=features.device, dtype=torch.float32)
        x = features.float()
        return (x.pow(2).sum(1, keepdim=True) - 2.0 * x @ c.T + c.pow(2).sum(1)[None]).clamp_min_(0)

    def predict(self, features: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """features: (N, D) → (N,) int64 index of the nearest centre (numpy in, numpy out)."""
        as_numpy = isinstance(features, np.ndarray)
        x = torch.from_numpy(np.ascontiguousarray(features)) if as_numpy else features
        labels = self.squared_distances(x).argmin(1)
        return labels.numpy() if as_numpy else labels

    def predict_map(self, features: torch.Tensor) -> torch.Tensor:
        """features: (D, H, W) → labels (H, W) int64."""
        d, h, w = features.shape
        return self.predict(features.reshape(d, h * w).T).reshape(h, w)

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.npz: centres + JSON metadata) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, overwrite=True) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, centers=self.centers.astype(np.float32), meta=np.array(json.dumps(self.meta)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ClusterModel:
        path = Path(path)
        if not path.is_file():
            raise input_error("cluster centres", "an existing .npz written by micromae cluster",
                              f"'{path}' does not exist", "Fit centres with `micromae cluster` or pass --k to fit")
        try:
            with np.load(path, allow_pickle=False) as data:
                centers, meta = data["centers"], json.loads(str(data["meta"]))
        except Exception as exc:  # numpy raises several types for foreign or truncated files
            raise input_error(f"cluster centres '{path}'", "a .npz with 'centers' and 'meta'",
                              f"an unreadable file ({exc})", "Refit the centres") from exc
        return cls(centers.astype(np.float32), meta)

    def _check_dim(self, dim: int) -> None:
        if dim != self.dim:
            raise input_error("embeddings", f"{self.dim}-dimensional features (as the centres were fitted)",
                              f"{dim} dimensions", "Use the centres fitted with the same checkpoint and mode")


def fit_kmeans(samples: np.ndarray, k: int, seed: int = 0, method: str = "auto", n_init: int = 3,
               meta: dict[str, Any] | None = None) -> ClusterModel:
    """Fit k centres to samples (N, D).

    method: ``auto`` (KMeans up to 100 000 samples, MiniBatchKMeans above), ``kmeans``, ``minibatch``,
    ``faiss`` (needs the faiss package).
    """
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if samples.ndim != 2:
        raise input_error("k-means samples", "a 2-D array (N, D)", f"shape {samples.shape}", "Flatten the pixels")
    n = samples.shape[0]
    if not 1 <= k <= n:
        raise input_error("k", f"a number of clusters between 1 and the sample size ({n})", str(k),
                          "Lower --k or raise the number of sampled pixels (--samples)")
    t0 = time.time()
    if method == "auto":
        method = "kmeans" if n <= 100_000 else "minibatch"
    if method == "faiss":
        try:
            import faiss  # optional
        except ImportError as exc:
            raise input_error("cluster method", "faiss installed", "no faiss module",
                              "pip install faiss-cpu, or use method=auto") from exc
        km = faiss.Kmeans(samples.shape[1], k, niter=50, nredo=n_init, seed=seed, verbose=False)
        km.train(samples)
        centers = km.centroids
    elif method in ("kmeans", "minibatch"):
        from sklearn.cluster import KMeans, MiniBatchKMeans

        if method == "kmeans":
            est = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
        else:
            est = MiniBatchKMeans(n_clusters=k, n_init=n_init, random_state=seed, batch_size=4096,
                                  max_iter=200)
        centers = est.fit(samples).cluster_centers_
    else:
        raise input_error("cluster method", "auto, kmeans, minibatch or faiss", repr(method), "Pick one")
    info = {"k": k, "seed": seed, "sample_size": n, "feature_dim": int(samples.shape[1]), "method": method,
            "fit_seconds": round(time.time() - t0, 2), "micromae_version": micromae.__version__,
            **(meta or {})}
    return ClusterModel(np.asarray(centers, dtype=np.float32), info)
