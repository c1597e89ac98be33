"""An identity recognizer for the toy world: PCA + LDA on latents, fit on training identities only.

The world's "faces" are 4x8x8 latents, so the recognizer works on latents:
centre, PCA to `pca_dims`, then LDA (within-class whitening, then the leading
directions of the whitened class means) to `lda_dims`. It is fit on the teacher
samples of the *training* identities; held-out identities are only enrolled
(their class mean is the mean projection of their own teacher samples, which the
recognizer never saw while fitting).

A set of generated samples for identity i is scored by the mean of its
projections p:
* rank-1 identification: the nearest class mean (Euclidean, over all identities,
  training and held-out) is i's;
* cosine similarity of p and i's class mean, both taken from the centre of the
  training identities' class means (0 = no sign of i; the teacher's own samples
  set the ceiling).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Recognizer:
    mean: torch.Tensor          # [D] centre of the training samples
    proj: torch.Tensor          # [D, lda_dims]
    centre: torch.Tensor        # [lda_dims] centre of the training class means
    class_means: torch.Tensor   # [N identities, lda_dims] (after enrol)
    names: list[str]

    @classmethod
    def fit(cls, samples: torch.Tensor, labels: torch.Tensor, pca_dims: int = 64, lda_dims: int = 24,
            ridge: float = 1e-3) -> "Recognizer":
        x = samples.flatten(1).double()
        mean = x.mean(0)
        xc = x - mean
        _, _, vh = torch.linalg.svd(xc, full_matrices=False)
        pca = vh[:pca_dims].T                              # [D, p]
        y = xc @ pca
        classes = labels.unique()
        mus = torch.stack([y[labels == c].mean(0) for c in classes])
        within = torch.cat([y[labels == c] - mus[i] for i, c in enumerate(classes)])
        sw = within.T @ within / within.shape[0]
        sw = sw + ridge * sw.diagonal().mean() * torch.eye(sw.shape[0], dtype=sw.dtype)
        evals, evecs = torch.linalg.eigh(sw)
        whiten = evecs @ torch.diag(evals.rsqrt())         # Sw^-1/2 (up to rotation)
        mw = (mus - mus.mean(0)) @ whiten
        _, _, vb = torch.linalg.svd(mw, full_matrices=False)
        lda = whiten @ vb[:lda_dims].T                     # [p, l]
        proj = (pca @ lda).float()
        z = (xc.float() @ proj)
        centre = torch.stack([z[labels == c].mean(0) for c in classes]).mean(0)
        return cls(mean.float(), proj, centre, torch.zeros(0, proj.shape[1]), [])

    def project(self, samples: torch.Tensor) -> torch.Tensor:
        return (samples.flatten(1).float() - self.mean) @ self.proj - self.centre

    def enrol(self, names: list[str], samples: torch.Tensor) -> None:
        """samples [N identities, K, ...]: class means of every identity (training and held-out)."""
        n, k = samples.shape[:2]
        self.class_means = self.project(samples.reshape(n * k, *samples.shape[2:])).reshape(n, k, -1).mean(1)
        self.names = list(names)

    def score(self, samples: torch.Tensor, name: str) -> dict[str, float]:
        """A sample set [K, 4, 8, 8] meant to show identity `name`: rank-1 hit (0/1), rank, cosine."""
        p = self.project(samples).mean(0)
        i = self.names.index(name)
        d = (self.class_means - p).norm(dim=1)
        rank = int((d < d[i]).sum()) + 1
        cos = float(torch.nn.functional.cosine_similarity(p, self.class_means[i], dim=0))
        return {"rank1": float(rank == 1), "rank": float(rank), "cos": cos}

    def separation(self, samples: torch.Tensor) -> tuple[float, float, float]:
        """samples [N, K, ...]: mean squared distance of two samples of one identity / of two identities in the
        recognizer space, and the distance ratio sqrt(within / between)."""
        from .world import distance_ratio

        n, k = samples.shape[:2]
        z = self.project(samples.reshape(n * k, *samples.shape[2:])).reshape(n, k, -1)
        return distance_ratio(z)
