"""Client-side gradient caches: G_k(theta_c) = sum of example gradients at a recorded model version."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CACHE_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def exclusion_digest(excluded: torch.Tensor) -> str:
    """Short digest of a set of excluded example indices (the scope a cache covers)."""
    if excluded.numel() == 0:
        return "none"
    data = torch.unique(excluded.to(torch.int64)).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class GradientCache:
    """A stored gradient SUM over `num_examples` examples at model `version`, covering data scope `scope`."""

    gradient_sum: torch.Tensor
    num_examples: int
    version: str
    scope: str = "none"

    def without(self, subset_sum: torch.Tensor, subset_count: int, new_scope: str) -> GradientCache:
        """G_{k without S} = G_k - G_S: the cache after removing a subset (same version)."""
        if subset_count > self.num_examples:
            raise ValueError(f"cannot remove {subset_count} examples from a cache over {self.num_examples}")
        return GradientCache(
            self.gradient_sum.to(torch.float64) - subset_sum.to(torch.float64),
            self.num_examples - subset_count,
            self.version,
            new_scope,
        )

    def is_at(self, version: str, scope: str) -> bool:
        """True when the cache was computed at this model version over this data scope."""
        return self.version == version and self.scope == scope

    @property
    def nbytes(self) -> int:
        """Bytes of the stored vector."""
        return self.gradient_sum.numel() * self.gradient_sum.element_size()


class CacheStore:
    """Disk-backed store of gradient caches keyed by client id (one safetensors file each).

    Disk, not the Flower Context: the Context travels with every message, and a node may be
    served by different Ray worker processes over a run, so only a shared folder is both
    cheap and consistent. `dtype` sets the storage precision (arithmetic is float64).
    """

    def __init__(self, root: str | os.PathLike[str], dtype: str = "float32") -> None:
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype={dtype!r}: must be one of {', '.join(CACHE_DTYPES)}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.dtype = CACHE_DTYPES[dtype]
        self._lock = threading.Lock()

    def _path(self, client: int) -> Path:
        return self.root / f"client-{client:06d}.safetensors"

    def put(self, client: int, cache: GradientCache) -> None:
        """Store (replace) the cache of `client`; written atomically."""
        path = self._path(client)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        metadata = {"num_examples": str(cache.num_examples), "version": cache.version, "scope": cache.scope}
        with self._lock:
            save_file({"gradient_sum": cache.gradient_sum.to(self.dtype).contiguous()}, str(tmp), metadata=metadata)
            os.replace(tmp, path)

    def get(self, client: int) -> GradientCache | None:
        """The cache of `client`, or None if it has none."""
        path = self._path(client)
        if not path.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensor = load_file(str(path))["gradient_sum"].to(torch.float64)
        return GradientCache(tensor, int(metadata["num_examples"]), metadata["version"], metadata.get("scope", "none"))

    def delete(self, client: int) -> None:
        """Forget the cache of `client` (a no-op if absent)."""
        self._path(client).unlink(missing_ok=True)

    def total_bytes(self) -> int:
        """Bytes on disk over all stored caches."""
        return sum(p.stat().st_size for p in self.root.glob("client-*.safetensors"))

    def client_bytes(self, client: int) -> int:
        """Bytes on disk of `client`'s cache (0 if it has none)."""
        path = self._path(client)
        return path.stat().st_size if path.exists() else 0
