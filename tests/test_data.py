"""Tests for fedunlearn.data: determinism, partitions, held-out splits, backdoor, forget sets."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fedunlearn.data import (
    PARTITIONS,
    DatasetStore,
    DataSpec,
    FederatedData,
    load_federated_data,
    partition_labels,
    select_forget_subset,
    stamp_trigger,
)
from fedunlearn.errors import ConfigError


@pytest.fixture(scope="module")
def data() -> FederatedData:
    """The default digits federation (IID, backdoor on client 0)."""
    return load_federated_data(DataSpec())


@pytest.fixture(scope="module")
def dirichlet_data() -> FederatedData:
    """A strongly label-skewed digits federation."""
    return load_federated_data(DataSpec(partition="dirichlet", alpha=0.1, seed=3))


def _all_fields_equal(a: FederatedData, b: FederatedData) -> bool:
    """Whether two federations hold bit-identical tensors."""
    tensors = ["x_train", "y_train", "y_train_clean", "poisoned", "x_test", "y_test"]
    if not all(torch.equal(getattr(a, t), getattr(b, t)) for t in tensors):
        return False
    lists = ["client_train", "client_heldout"]
    return all(
        len(getattr(a, name)) == len(getattr(b, name))
        and all(torch.equal(p, q) for p, q in zip(getattr(a, name), getattr(b, name), strict=True))
        for name in lists
    )


def _max_class_share(d: FederatedData) -> float:
    """Mean over clients of the share of the client's most frequent (true) class."""
    shares = []
    for c in range(d.num_clients):
        idx = torch.cat([d.client_train[c], d.client_heldout[c]])
        counts = torch.bincount(d.y_train_clean[idx], minlength=d.num_classes)
        shares.append(counts.max().item() / counts.sum().item())
    return float(np.mean(shares))


# --- determinism -------------------------------------------------------------------------


def test_same_spec_gives_identical_tensors(data: FederatedData) -> None:
    again = load_federated_data(DataSpec())
    assert _all_fields_equal(data, again)


def test_same_dirichlet_spec_gives_identical_tensors(dirichlet_data: FederatedData) -> None:
    again = load_federated_data(DataSpec(partition="dirichlet", alpha=0.1, seed=3))
    assert _all_fields_equal(dirichlet_data, again)


def test_different_seed_gives_different_partition(data: FederatedData) -> None:
    other = load_federated_data(DataSpec(seed=1))
    assert any(not torch.equal(a, b) for a, b in zip(data.client_train, other.client_train, strict=True))
    assert not torch.equal(data.y_test, other.y_test)


def test_shapes_and_dtypes(data: FederatedData) -> None:
    n = data.x_train.shape[0]
    assert data.x_train.dtype == torch.float32
    assert data.x_train.shape[1:] == (1, 8, 8)
    assert data.input_shape == (1, 8, 8)
    assert data.num_classes == 10
    assert data.y_train.dtype == torch.int64 and data.y_train.shape == (n,)
    assert data.y_train_clean.dtype == torch.int64 and data.y_train_clean.shape == (n,)
    assert data.poisoned.dtype == torch.bool and data.poisoned.shape == (n,)
    assert data.x_test.dtype == torch.float32 and data.y_test.dtype == torch.int64
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) <= 1.0
    assert float(data.x_test.min()) >= 0.0 and float(data.x_test.max()) == 1.0
    # digits has 1797 examples; test_fraction=0.2 -> 360 test (sklearn rounds the test size up).
    assert n + data.x_test.shape[0] == 1797
    assert data.x_test.shape[0] == 360


def test_test_split_is_stratified(data: FederatedData) -> None:
    counts = torch.bincount(data.y_test, minlength=10)
    assert int(counts.max() - counts.min()) <= 2


# --- partitions ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["data", "dirichlet_data"])
def test_partitions_disjoint_and_cover_everything(which: str, request: pytest.FixtureRequest) -> None:
    d: FederatedData = request.getfixturevalue(which)
    parts = list(d.client_train) + list(d.client_heldout)
    everything = torch.cat(parts)
    assert everything.numel() == d.x_train.shape[0]
    assert torch.equal(torch.sort(everything).values, torch.arange(d.x_train.shape[0]))
    for c in range(d.num_clients):
        train, held = d.client_train[c], d.client_heldout[c]
        assert train.dtype == torch.int64 and held.dtype == torch.int64
        assert torch.equal(train, torch.sort(train).values)
        assert torch.equal(held, torch.sort(held).values)
        assert train.numel() >= 1 and held.numel() >= 1
        assert not set(train.tolist()) & set(held.tolist())
        assert d.num_train(c) == train.numel()


def test_heldout_never_poisoned(data: FederatedData) -> None:
    assert data.poisoned.any()
    for held in data.client_heldout:
        assert not data.poisoned[held].any()
    x, y = data.client_heldout_arrays(0)
    idx = data.client_heldout[0]
    assert torch.equal(y, data.y_train_clean[idx])
    assert torch.equal(x, data.x_train[idx])


def test_heldout_fraction_respected(data: FederatedData) -> None:
    for c in range(data.num_clients):
        n = data.client_train[c].numel() + data.client_heldout[c].numel()
        assert data.client_heldout[c].numel() == round(0.2 * n)


def test_iid_client_sizes_before_heldout_differ_by_at_most_one(data: FederatedData) -> None:
    sizes = [data.client_train[c].numel() + data.client_heldout[c].numel() for c in range(10)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_is_more_skewed_than_iid(data: FederatedData, dirichlet_data: FederatedData) -> None:
    iid_share = _max_class_share(data)
    dir_share = _max_class_share(dirichlet_data)
    assert iid_share < 0.25
    assert dir_share > 2 * iid_share


# --- flwr-datasets partitioners, on labels alone ---------------------------------------------

# Labels written independently of the code under test: 997 examples, 10 classes, in a random order.
LABELS = np.random.default_rng(123).integers(0, 10, size=997)
SETTINGS = {
    "iid": {},
    "dirichlet": {"alpha": 0.1, "min_partition_size": 5},
    "pathological": {"classes_per_client": 2},
    "shard": {"shards_per_client": 2},
}
SHARD_SIZE = 997 // (10 * 2)  # ShardPartitioner's own rule: the whole split cut into num_partitions * shards equal shards


def _spec(partition: str, seed: int = 0, **changes: object) -> DataSpec:
    return DataSpec(num_clients=10, partition=partition, seed=seed, **{**SETTINGS[partition], **changes})  # type: ignore[arg-type]


def _class_counts(parts: list[np.ndarray]) -> np.ndarray:
    """Clients x classes counts of LABELS, by plain bincount (the independent reference)."""
    return np.stack([np.bincount(LABELS[p], minlength=10) for p in parts])


def test_every_claimed_partitioner_is_tested() -> None:
    assert set(SETTINGS) == set(PARTITIONS) == {"iid", "dirichlet", "pathological", "shard"}


@pytest.mark.parametrize("partition", sorted(SETTINGS))
def test_partition_assigns_every_example_at_most_once(partition: str) -> None:
    parts = partition_labels(LABELS, _spec(partition))
    assert len(parts) == 10
    for part in parts:
        assert part.dtype == np.int64 and np.array_equal(part, np.sort(part))
    everything = np.concatenate(parts)
    assert np.unique(everything).size == everything.size  # no example in two clients
    assert everything.min() >= 0 and everything.max() < LABELS.size
    # Shard leaves out what does not fill a shard; the others assign every example.
    expected = 10 * 2 * SHARD_SIZE if partition == "shard" else LABELS.size
    assert everything.size == expected
    assert _class_counts(parts).sum() == expected


@pytest.mark.parametrize("partition", sorted(SETTINGS))
def test_partition_sizes(partition: str) -> None:
    sizes = np.array([p.size for p in partition_labels(LABELS, _spec(partition))])
    assert sizes.min() >= 2
    if partition == "iid":
        assert sizes.max() - sizes.min() <= 1
    if partition == "dirichlet":
        assert sizes.min() >= 5 and sizes.max() - sizes.min() > 20  # min_partition_size held; sizes vary
    if partition == "shard":
        assert np.all(sizes == 2 * SHARD_SIZE)


@pytest.mark.parametrize("partition", sorted(SETTINGS))
def test_partition_label_skew(partition: str) -> None:
    counts = _class_counts(partition_labels(LABELS, _spec(partition)))
    classes_held = (counts > 0).sum(axis=1)
    max_share = (counts.max(axis=1) / counts.sum(axis=1)).mean()
    if partition == "iid":
        assert np.all(classes_held == 10) and max_share < 0.25
    if partition == "dirichlet":
        assert max_share > 0.5
    if partition == "pathological":
        assert np.all(classes_held == 2)
        # first-deterministic: client i's first class is i mod 10, so every class is held by someone.
        assert np.all(counts[np.arange(10), np.arange(10)] > 0)
    if partition == "shard":
        # Two shards of label-sorted examples: each spans at most two labels.
        assert np.all(classes_held <= 4) and max_share > 0.4


@pytest.mark.parametrize("partition", sorted(SETTINGS))
def test_partition_reproducible_from_the_seed(partition: str) -> None:
    first = partition_labels(LABELS, _spec(partition, seed=3))
    again = partition_labels(LABELS, _spec(partition, seed=3))
    other = partition_labels(LABELS, _spec(partition, seed=4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_partition_seed_argument_overrides_the_spec_seed() -> None:
    a = partition_labels(LABELS, _spec("iid", seed=0), seed=9)
    b = partition_labels(LABELS, _spec("iid", seed=9))
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("partition", sorted(SETTINGS))
def test_partition_fetches_nothing(partition: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the partitioner tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert len(partition_labels(LABELS, _spec(partition, seed=11))) == 10


def test_pathological_random_assignment_can_leave_classes_unused() -> None:
    # flwr-datasets' own default: random classes per client; with 3 clients x 2 classes at least 4 classes are unused.
    with pytest.warns(UserWarning, match="NOT be used"):
        parts = partition_labels(LABELS, DataSpec(num_clients=3, partition="pathological", class_assignment="random"))
    assert (_class_counts(parts).sum(axis=0) > 0).sum() <= 6


def test_partition_too_many_clients_for_the_examples() -> None:
    with pytest.raises(ConfigError, match="num_clients=10: 5 training examples.*use fewer clients"):
        partition_labels(LABELS[:5], DataSpec(num_clients=10))


def test_dirichlet_impossible_min_size_names_the_fix() -> None:
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(ConfigError, match="alpha=0.01") as info:
        partition_labels(labels, DataSpec(num_clients=10, partition="dirichlet", alpha=0.01))
    assert "flwr-datasets says" in str(info.value) or "raise --alpha" in str(info.value)


@pytest.mark.parametrize("partition", sorted(SETTINGS))
def test_federated_data_every_train_example_in_one_client(partition: str) -> None:
    spec = DataSpec(partition=partition, **SETTINGS[partition])  # type: ignore[arg-type]
    d = load_federated_data(spec)
    everything = torch.cat([*d.client_train, *d.client_heldout])
    assert torch.equal(torch.sort(everything).values, torch.arange(d.x_train.shape[0]))
    assert all(t.numel() >= 1 and h.numel() >= 1 for t, h in zip(d.client_train, d.client_heldout, strict=True))
    # digits: 1437 training examples; shard drops the 1437 - 10 * 2 * (1437 // 20) = 17 that fill no shard.
    assert d.x_train.shape[0] == (10 * 2 * (1437 // 20) if partition == "shard" else 1437)
    assert torch.equal(d.y_train_clean[d.poisoned == 0], d.y_train[d.poisoned == 0])
    assert _all_fields_equal(d, load_federated_data(spec))


def test_shard_drops_rows_consistently_with_their_inputs() -> None:
    """The rows left out by shard leave x and y together: each kept row is still the digit it was."""
    iid = load_federated_data(DataSpec(backdoor_client=None))
    shard = load_federated_data(DataSpec(partition="shard", backdoor_client=None))
    # Match every kept input to its row in the full split (inputs of digits are distinct enough: compare exactly).
    full = {bytes(x.numpy().tobytes()): int(y) for x, y in zip(iid.x_train, iid.y_train, strict=True)}
    assert all(full[bytes(x.numpy().tobytes())] == int(y) for x, y in zip(shard.x_train, shard.y_train, strict=True))


# --- backdoor ------------------------------------------------------------------------------


def test_backdoor_poisoned_set(data: FederatedData) -> None:
    spec = data.spec
    own = data.client_train[spec.backdoor_client]
    poisoned_idx = torch.nonzero(data.poisoned).flatten()
    # Only examples whose true label is not the target are poisoned.
    assert poisoned_idx.numel() == round(0.8 * int((data.y_train_clean[own] != spec.backdoor_target).sum()))
    assert set(poisoned_idx.tolist()) <= set(own.tolist())
    assert torch.all(data.y_train[poisoned_idx] == spec.backdoor_target)
    patch = data.x_train[poisoned_idx][..., -spec.trigger_size :, -spec.trigger_size :]
    assert torch.all(patch == 1.0)
    clean = ~data.poisoned
    assert torch.equal(data.y_train[clean], data.y_train_clean[clean])
    # Some poisoned examples had another true label, so relabelling really happened.
    assert torch.any(data.y_train_clean[poisoned_idx] != spec.backdoor_target)


def test_backdoor_disabled() -> None:
    d = load_federated_data(DataSpec(backdoor_client=None))
    assert not d.poisoned.any()
    assert torch.equal(d.y_train, d.y_train_clean)


def test_backdoor_changes_do_not_change_partition(data: FederatedData) -> None:
    other = load_federated_data(DataSpec(backdoor_client=3, backdoor_fraction=0.5))
    assert all(torch.equal(a, b) for a, b in zip(data.client_train, other.client_train, strict=True))
    poisoned_idx = torch.nonzero(other.poisoned).flatten()
    assert set(poisoned_idx.tolist()) <= set(other.client_train[3].tolist())
    own = other.client_train[3]
    assert poisoned_idx.numel() == round(0.5 * int((other.y_train_clean[own] != other.spec.backdoor_target).sum()))


def test_stamp_trigger_copies_and_stamps() -> None:
    x = torch.zeros(4, 3, 6, 6)
    out = stamp_trigger(x, 2, 0.5)
    assert torch.all(x == 0)
    assert torch.all(out[..., 4:, 4:] == 0.5)
    assert torch.all(out[..., :4, :] == 0) and torch.all(out[..., :, :4] == 0)
    with pytest.raises(ValueError, match="size"):
        stamp_trigger(x, 7)


def test_triggered_test_excludes_target(data: FederatedData) -> None:
    x, y = data.triggered_test()
    target = data.spec.backdoor_target
    expected = int((data.y_test != target).sum())
    assert x.shape[0] == expected < data.y_test.numel()
    assert torch.all(y == target) and y.dtype == torch.int64
    s = data.spec.trigger_size
    assert torch.all(x[..., -s:, -s:] == 1.0)
    assert torch.equal(x[..., :-s, :], data.x_test[data.y_test != target][..., :-s, :])
    # The clean test set itself stays untouched.
    assert not torch.all(data.x_test[..., -s:, -s:] == 1.0)


def test_client_train_arrays(data: FederatedData) -> None:
    x, y = data.client_train_arrays(0)
    idx = data.client_train[0]
    assert torch.equal(x, data.x_train[idx]) and torch.equal(y, data.y_train[idx])
    with pytest.raises(ValueError, match="client"):
        data.client_train_arrays(10)


# --- forget sets ---------------------------------------------------------------------------


def test_select_forget_subset_poisoned(data: FederatedData) -> None:
    s = select_forget_subset(data, 0, "poisoned", fraction=0.123, seed=0)
    assert s.dtype == torch.int64
    assert torch.equal(s, torch.nonzero(data.poisoned).flatten())


def test_select_forget_subset_poisoned_needs_poison(data: FederatedData) -> None:
    with pytest.raises(ValueError, match="random"):
        select_forget_subset(data, 1, "poisoned", fraction=0.1, seed=0)


def test_select_forget_subset_random(data: FederatedData) -> None:
    own = data.client_train[2]
    s = select_forget_subset(data, 2, "random", fraction=0.1, seed=5)
    assert s.dtype == torch.int64
    assert s.numel() == round(0.1 * own.numel())
    assert torch.equal(s, torch.sort(s).values)
    assert set(s.tolist()) <= set(own.tolist())
    assert torch.equal(s, select_forget_subset(data, 2, "random", fraction=0.1, seed=5))
    assert not torch.equal(s, select_forget_subset(data, 2, "random", fraction=0.1, seed=6))
    tiny = select_forget_subset(data, 2, "random", fraction=1e-6, seed=0)
    assert tiny.numel() == 1


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"client": 0, "samples": "all", "fraction": 0.1}, "samples"),
        ({"client": 0, "samples": "random", "fraction": 0.0}, "fraction"),
        ({"client": 0, "samples": "random", "fraction": 1.5}, "fraction"),
        ({"client": 99, "samples": "random", "fraction": 0.1}, "client"),
    ],
)
def test_select_forget_subset_errors(data: FederatedData, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        select_forget_subset(data, seed=0, **kwargs)


# --- spec validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dataset", "imagenet"),
        ("num_clients", 0),
        ("num_clients", 1),
        ("num_clients", 2.5),
        ("partition", "foo"),
        ("alpha", 0.0),
        ("alpha", -1.0),
        ("alpha", float("nan")),
        ("heldout_fraction", 0.0),
        ("heldout_fraction", 1.0),
        ("test_fraction", 1.2),
        ("train_limit", 5),
        ("seed", -1),
        ("backdoor_client", 10),
        ("backdoor_client", -1),
        ("backdoor_fraction", 1.5),
        ("backdoor_target", 10),
        ("trigger_size", 0),
        ("trigger_size", 9),
        ("partition", "sorted"),
        ("min_partition_size", 1),
        ("self_balancing", "yes"),
        ("classes_per_client", 0),
        ("class_assignment", "round-robin"),
        ("shards_per_client", 0),
        ("shard_size", -1),
        ("dataset", "mylab.data"),
    ],
)
def test_bad_spec_values_raise(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as info:
        DataSpec(**{field: value})
    assert repr(value) in str(info.value) or str(value) in str(info.value)


def test_spec_is_hashable_and_equal_specs_match() -> None:
    assert DataSpec(seed=4) == DataSpec(seed=4)
    assert hash(DataSpec(seed=4)) == hash(DataSpec(seed=4))
    assert DataSpec(seed=4) != DataSpec(seed=5)


def test_train_limit_subsets() -> None:
    d = load_federated_data(DataSpec(train_limit=200))
    assert d.x_train.shape[0] == 200
    total = sum(d.client_train[c].numel() + d.client_heldout[c].numel() for c in range(10))
    assert total == 200


# --- torchvision without data --------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist", "cifar10"])
def test_missing_torchvision_dataset_raises(dataset: str, tmp_path: Path) -> None:
    spec = DataSpec(dataset=dataset, data_dir=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match="download") as info:
        load_federated_data(spec)
    assert str(tmp_path.resolve()) in str(info.value)
    assert list(tmp_path.iterdir()) == [] or not any(p.is_file() for p in tmp_path.rglob("*"))


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in MNIST's big-endian IDX format."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_fake_mnist_folder_loads(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        images = rng.integers(0, 256, size=(n, 28, 28))
        images[0] = 255  # guarantees the maximum pixel value is present
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    spec = DataSpec(dataset="mnist", data_dir=str(tmp_path), num_clients=3, trigger_size=4)
    d = load_federated_data(spec)
    assert d.input_shape == (1, 28, 28) and d.x_train.shape == (60, 1, 28, 28)
    assert d.x_test.shape == (20, 1, 28, 28) and d.y_test.dtype == torch.int64
    assert float(d.x_train.max()) == 1.0 and float(d.x_train.min()) >= 0.0
    assert torch.equal(d.y_train_clean, torch.arange(60) % 10)
    assert torch.equal(d.y_test, torch.arange(20) % 10)
    assert torch.all(d.x_train[d.poisoned][..., -4:, -4:] == 1.0)
    assert _all_fields_equal(d, load_federated_data(spec))


# --- store ---------------------------------------------------------------------------------


def test_dataset_store_caches_per_spec() -> None:
    DatasetStore.clear()
    try:
        a = DatasetStore.get(DataSpec(train_limit=100))
        b = DatasetStore.get(DataSpec(train_limit=100))
        c = DatasetStore.get(DataSpec(train_limit=100, seed=1))
        assert a is b
        assert a is not c
        DatasetStore.clear()
        assert DatasetStore.get(DataSpec(train_limit=100)) is not a
    finally:
        DatasetStore.clear()


def test_replace_revalidates() -> None:
    with pytest.raises(ValueError, match="backdoor_client"):
        replace(DataSpec(), num_clients=2, backdoor_client=5)


def test_many_clients_partition_once_per_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From PARTITION_CACHE_FROM clients the parts are kept in a file: a second process reads them, bit for bit.

    The reference is the partitioner run with the cache off; a changed option, seed or label set gets its own file;
    a torn or foreign file is recomputed, never trusted.
    """
    from fedunlearn import data as data_module

    monkeypatch.setattr(data_module, "PARTITION_CACHE_FROM", 20)
    monkeypatch.setenv("FEDUNLEARN_PARTITION_CHILD", "1")  # partition in this process, where the calls can be counted
    labels = np.random.default_rng(0).integers(0, 10, 400)
    spec = DataSpec(num_clients=20, partition="dirichlet", alpha=0.5, min_partition_size=2, seed=1)
    monkeypatch.setenv("FEDUNLEARN_PARTITION_CACHE", "off")
    reference = partition_labels(labels, spec)
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("FEDUNLEARN_PARTITION_CACHE", str(tmp_path))
    first = partition_labels(labels, spec)
    files = list(tmp_path.glob("parts-20-*.npz"))
    assert len(files) == 1
    calls: list[int] = []
    monkeypatch.setattr(data_module, "_partition_labels", lambda *a: calls.append(1) or reference)
    again = partition_labels(labels, spec)
    assert calls == []  # read from the file, not partitioned again
    for parts in (first, again):
        assert len(parts) == 20 and all(p.dtype == np.int64 and np.array_equal(p, r) for p, r in zip(parts, reference, strict=True))
    partition_labels(labels, DataSpec(num_clients=20, partition="dirichlet", alpha=0.5, min_partition_size=2, seed=2))
    partition_labels(labels[::-1].copy(), spec)
    partition_labels(labels, DataSpec(num_clients=20, partition="dirichlet", alpha=0.3, min_partition_size=2, seed=1))
    assert calls == [1, 1, 1] and len(list(tmp_path.glob("parts-20-*.npz"))) == 4
    files[0].write_bytes(files[0].read_bytes()[:50])  # torn
    assert len(partition_labels(labels, spec)) == 20 and calls == [1, 1, 1, 1]
    np.savez(files[0], flat=np.arange(5), offsets=np.array([0, 5]))  # another shape
    assert len(partition_labels(labels, spec)) == 20 and calls == [1, 1, 1, 1, 1]
    small = DataSpec(num_clients=10, partition="iid")
    partition_labels(labels, small)  # below the threshold: never cached
    assert not list(tmp_path.glob("parts-10-*.npz"))


def test_a_cache_miss_partitions_in_a_child_process(tmp_path: Path) -> None:
    """A fresh process that partitions 1000 clients leaves `datasets` (190 MB of RSS) to a short-lived child and reads
    its file; the parts equal the partitioner's run in-process (the reference, with the cache off)."""
    import subprocess
    import sys

    code = f"""
import sys, numpy as np
from fedunlearn.data import DataSpec, partition_labels
labels = np.random.default_rng(0).integers(0, 10, 3000)
spec = DataSpec(num_clients=1000, partition="iid", seed=5)
parts = partition_labels(labels, spec)
assert "datasets" not in sys.modules and "flwr_datasets" not in sys.modules, "the parent imported datasets"
np.savez({str(tmp_path / "parts.npz")!r}, *parts)
"""
    env = {**os.environ, "FEDUNLEARN_PARTITION_CACHE": str(tmp_path / "cache")}
    env.pop("FEDUNLEARN_PARTITION_CHILD", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "cache").glob("parts-1000-*.npz"))) == 1
    labels = np.random.default_rng(0).integers(0, 10, 3000)
    os.environ["FEDUNLEARN_PARTITION_CACHE"] = "off"
    try:
        reference = partition_labels(labels, DataSpec(num_clients=1000, partition="iid", seed=5))
    finally:
        del os.environ["FEDUNLEARN_PARTITION_CACHE"]
    with np.load(tmp_path / "parts.npz") as stored:
        got = [stored[f"arr_{i}"] for i in range(1000)]
    assert all(np.array_equal(a, b) for a, b in zip(got, reference, strict=True))
