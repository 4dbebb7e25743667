"""Secure-aggregation arithmetic (SecAgg+, Bell et al. 2020): quantisation, masks, modular sums, the error bound.

No Flower message types here: numpy arrays in and out. The protocol that moves these arrays between clients and
the server is `strategies.secagg`.

Symbols: B the L2 norm bound of each client's contribution (--gradient-norm-bound, times a scale the round
states), n the clients that start the protocol, n' <= n those whose masked vector is summed, L the levels of
one client's quantised value, Delta = 2B / L the quantisation step, P the vector length.

- Field: the integers modulo 2^32, held in numpy uint32 (its wrap-around IS the modular sum; a masked entry takes
  4 bytes, what a float32 gradient takes in the plain round).
- Range: |v_j| <= ||v||_2 <= B, so once a client clips its vector to L2 norm B (the bound the plain round applies on
  the server, moved to the client: the server never sees the vector) no coordinate is outside [-B, B]; the clip is
  what happens to values beyond the range, and how many clients clipped is securely summed too.
- Levels: L = floor((2^32 - 1) / n), the most a client may use so that the sum of n values in [0, L] never wraps.
- Rounding: deterministic (to nearest). Stochastic rounding only pays when the levels are few (its bias-free
  errors average out); with 2^25..2^31 levels its noise is as large as the deterministic error's bound, it makes a
  run irreproducible, and a client re-sending its masked vector after a retry would send the same vector masked
  twice with different roundings, whose difference the server could read. Each coordinate of the sum is then off
  by at most n' * Delta / 2 (`sum_error_bound`).
- Masks: the keystream of AES-256 in counter mode under a 32-byte seed (`mask`), i.e. uniform on the field. Not
  Flower's `pseudo_rand_gen`: that folds the seed to 32 bits for numpy's RandomState, a space the server could search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

FIELD_BITS = 32
FIELD = 1 << FIELD_BITS  # the modulus; numpy uint32 arithmetic wraps at it
FIELD_DTYPE = np.uint32


@dataclass(frozen=True)
class Quantiser:
    """Maps a client's float vector, clipped to L2 norm `bound`, to integers in [0, levels], and a sum of n' back."""

    bound: float  # B (already times the round's scale): the clipping norm and the per-coordinate range [-B, B]
    levels: int  # L

    @classmethod
    def for_clients(cls, bound: float, num_clients: int) -> Quantiser:
        """The finest quantiser whose sum over `num_clients` clients cannot wrap the field."""
        if not bound > 0 or not math.isfinite(bound):
            raise ValueError(f"bound={bound}: secure aggregation needs a finite norm bound > 0 (the quantisation range)")
        if num_clients < 1:
            raise ValueError(f"num_clients={num_clients}: must be >= 1")
        return cls(float(bound), (FIELD - 1) // num_clients)

    @property
    def step(self) -> float:
        """Delta = 2B / L."""
        return 2.0 * self.bound / self.levels

    def clip(self, vector: np.ndarray) -> tuple[np.ndarray, bool]:
        """The vector scaled down to L2 norm B if it is longer (then every coordinate is in [-B, B]); and whether it was."""
        vector = np.asarray(vector, dtype=np.float64)
        norm = float(np.linalg.norm(vector))
        if norm <= self.bound:
            return vector, False
        return vector * (self.bound / norm), True

    def quantise(self, vector: np.ndarray) -> np.ndarray:
        """round((v + B) L / 2B) in [0, L], as field elements (the vector must be clipped: see `clip`)."""
        scaled = (np.clip(np.asarray(vector, dtype=np.float64), -self.bound, self.bound) + self.bound) / self.step
        return np.clip(np.rint(scaled), 0, self.levels).astype(FIELD_DTYPE)

    def dequantise_sum(self, total: np.ndarray, contributors: int) -> np.ndarray:
        """The float sum of `contributors` vectors from the sum of their quantised values (no wrap: n' L < 2^32)."""
        return np.asarray(total, dtype=np.float64) * self.step - contributors * self.bound

    def sum_error_bound(self, contributors: int, length: int) -> tuple[float, float]:
        """(max |error| of one coordinate, bound on the L2 error) of the dequantised sum: n' Delta/2, sqrt(P) n' Delta/2."""
        per_coordinate = contributors * self.step / 2.0
        return per_coordinate, math.sqrt(length) * per_coordinate


def mask(seed: bytes, length: int) -> np.ndarray:
    """`length` field elements drawn uniformly from the seed (AES-256-CTR keystream, zero nonce: one use per seed)."""
    if len(seed) != 32:
        raise ValueError(f"mask seed of {len(seed)} bytes: must be 32")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    stream = encryptor.update(b"\0" * (4 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(FIELD_DTYPE, copy=True)


def field_sum(vectors: list[np.ndarray] | tuple[np.ndarray, ...]) -> np.ndarray:
    """The sum modulo 2^32 of field vectors."""
    total = np.zeros_like(vectors[0], dtype=FIELD_DTYPE)
    for vector in vectors:
        total += vector.astype(FIELD_DTYPE, copy=False)  # uint32 wraps: the modular sum
    return total


def masked_input(quantised: np.ndarray, own_seed: bytes, pair_seeds: dict[int, bytes], me: int) -> np.ndarray:
    """y = x + PRG(b) + sum_{v > me} PRG(s_me,v) - sum_{v < me} PRG(s_me,v) mod 2^32 (pairwise masks cancel in the sum)."""
    out = quantised.astype(FIELD_DTYPE, copy=True)
    out += mask(own_seed, len(out))
    for other, seed in pair_seeds.items():
        if other > me:
            out += mask(seed, len(out))
        else:
            out -= mask(seed, len(out))
    return out


def unmask(masked_sum: np.ndarray, own_seeds: list[bytes], dropped_pairs: list[tuple[int, int, bytes]]) -> np.ndarray:
    """The sum of the x's from the sum of masked inputs.

    `own_seeds`: b of every client whose masked input is in the sum; `dropped_pairs`: (survivor v, dropped u, s_v,u)
    for every survivor that masked against a client whose input is not in the sum (that mask did not cancel).
    """
    out = masked_sum.astype(FIELD_DTYPE, copy=True)
    for seed in own_seeds:
        out -= mask(seed, len(out))
    for survivor, dropped, seed in dropped_pairs:
        if dropped > survivor:  # the survivor added it
            out -= mask(seed, len(out))
        else:
            out += mask(seed, len(out))
    return out


def threshold_for(setting: float, participants: int) -> int:
    """Shares needed to reconstruct a secret among `participants` (--secagg-threshold).

    `participants` is the number of shares a client hands out (its neighbourhood k). 0: a strict majority,
    floor(k/2) + 1 (no two disjoint groups of answering neighbours can each reach it); a fraction in (0, 1):
    ceil(f k), as Flower's workflow reads a float; a whole number: that count. At least 2 (Flower's floor) and at most
    k (a count above k needs every neighbour).
    """
    if setting == 0:
        wanted = participants // 2 + 1
    elif 0 < setting < 1:
        wanted = math.ceil(setting * participants)
    else:
        wanted = int(setting)
    return min(max(wanted, 2), participants)


@dataclass(frozen=True)
class SecAggSettings:
    """Secure aggregation of a round: the norm bound B that sets the quantisation range, and the threshold setting."""

    norm_bound: float
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if not self.norm_bound > 0:
            raise ValueError(f"norm_bound={self.norm_bound}: secure aggregation needs a norm bound > 0 (the quantisation range)")
        if self.threshold < 0 or (self.threshold >= 1 and not float(self.threshold).is_integer()):
            raise ValueError(f"threshold={self.threshold}: 0 (majority), a fraction in (0, 1) or a whole count >= 1")


# ----- key agreement (X25519 + HKDF) ---------------------------------------------------------------------------
# X25519, not Flower's SECP384R1 PEM keys: a raw private key is 32 bytes, so its Shamir sharing takes 3 chunks of 16
# bytes instead of ~20 for a PEM key, which is what the share and unmask stages cost at 100 clients.


def key_pair() -> tuple[bytes, bytes]:
    """A fresh (private, public) X25519 key pair as 32 raw bytes each."""
    private = X25519PrivateKey.generate()
    return (
        private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
        private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
    )


def agree(private: bytes, public: bytes) -> bytes:
    """The 32-byte secret two parties share: HKDF-SHA256 of X25519(private, public) (symmetric in the two key pairs)."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedunlearn-secagg").derive(shared)


def neighbourhood_size(participants: int) -> int:
    """k, the clients each one shares its secrets with and masks against, itself included: 2 ceil(log2 n) + 1, at most n.

    Bell et al.'s SecAgg+: a neighbourhood of O(log n) clients instead of all n (SecAgg) keeps the same guarantees
    against an honest-but-curious server and makes the share and unmask stages O(n log n) instead of O(n^2).
    """
    if participants <= 3:
        return participants
    return min(participants, 2 * math.ceil(math.log2(participants)) + 1)


def neighbourhoods(order: list[int], size: int) -> dict[int, list[int]]:
    """Each client's neighbours (itself included) on a ring of `order`: the `size // 2` clients on either side (Flower's)."""
    n, half = len(order), size // 2
    if size >= n:
        return {p: sorted(order) for p in order}
    return {p: sorted({order[(i + offset) % n] for offset in range(-half, half + 1)}) for i, p in enumerate(order)}
