"""Evaluation that can be trusted: who is scored, shadows trained like the target, the retrain band, durability."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fedunlearn.band import band_stats, versus_band
from fedunlearn.data import DatasetStore, DataSpec, load_federated_data
from fedunlearn.deletion import DeletionRequest, decode_ledger, encode_ledger, forget_indices
from fedunlearn.durability import relearn_steps
from fedunlearn.mia import membership_sets
from simulations.runner import Experiment
from strategies import app_config
from strategies.client_app import build_client_app
from strategies.local_grid import LocalGrid

# --------------------------------------------------------------------------- data and scored sets


@pytest.mark.parametrize("target", [0, 3])
def test_poisoning_skips_examples_whose_true_label_is_the_target(target):
    data = load_federated_data(DataSpec(num_clients=4, backdoor_client=1, backdoor_fraction=0.8, backdoor_target=target))
    own = data.client_train[1]
    poisoned = own[data.poisoned[own]]
    assert poisoned.numel() > 0
    assert not (data.y_train_clean[poisoned] == target).any()
    eligible = int((data.y_train_clean[own] != target).sum())
    assert poisoned.numel() == round(0.8 * eligible)
    assert (data.y_train[poisoned] == target).all()


def test_scored_members_are_the_clean_part_of_the_forget_set_and_non_members_its_clients_heldout():
    data = DatasetStore.get(DataSpec(num_clients=4, backdoor_client=1, backdoor_fraction=0.8))
    sets = membership_sets(data, [DeletionRequest(client=1)])
    own = data.client_train[1]
    expected = own[~data.poisoned[own]]
    assert torch.equal(sets.members, torch.sort(expected).values)
    assert not data.poisoned[sets.members].any()
    assert torch.equal(sets.non_members, data.client_heldout[1])
    scored = sets.scored()
    assert scored["members"] == expected.numel() and scored["non_members"] == data.client_heldout[1].numel()
    assert "clean" in scored["which"] and "client(s) 1" in scored["which"]


def test_listed_requests_forget_exactly_their_indices_and_survive_the_ledger():
    data = DatasetStore.get(DataSpec(num_clients=4, backdoor_client=None))
    chosen = tuple(int(i) for i in data.client_train[2][[5, 1, 3]])
    request = DeletionRequest(client=2, samples="listed", indices=chosen)
    assert forget_indices(data, request).tolist() == sorted(chosen)
    assert decode_ledger(encode_ledger([request])) == [request]
    with pytest.raises(ValueError, match="indices"):
        DeletionRequest(client=2, samples="listed")


def test_a_shadow_spec_trains_exactly_its_half_of_the_pool_with_the_clients_that_hold_it():
    base = DataSpec(num_clients=4, backdoor_client=1)
    data = load_federated_data(base)
    sets = membership_sets(data, [DeletionRequest(client=1)])
    pool = torch.unique(torch.cat([sets.members, sets.non_members]))
    inside = pool[::2]
    shadow = load_federated_data(
        DataSpec(num_clients=4, backdoor_client=1, shadow_pool=tuple(pool.tolist()), shadow_in=tuple(inside.tolist()))
    )
    trained = torch.cat(shadow.client_train)
    assert torch.isin(inside, shadow.client_train[1]).all()  # each IN candidate trains, with client 1
    assert not torch.isin(pool[1::2], trained).any()  # OUT candidates train nowhere
    assert torch.equal(shadow.poisoned, data.poisoned)  # the backdoor is the target's
    own_poisoned = data.client_train[1][data.poisoned[data.client_train[1]]]
    assert torch.isin(own_poisoned, shadow.client_train[1]).all()
    for c in (0, 2, 3):  # the other clients are untouched
        assert torch.equal(shadow.client_train[c], data.client_train[c])


# --------------------------------------------------------------------------- band and relearning, by hand


def test_band_arithmetic_against_hand_values():
    band = band_stats([{"asr": 0.0, "acc": 0.95}, {"asr": 0.02, "acc": 0.97}, {"asr": 0.04, "acc": None}], ["asr", "acc"])
    assert band["asr"] == pytest.approx({"mean": 0.02, "std": 0.02, "min": 0.0, "max": 0.04, "n": 3})
    # acc: two values, sample std sqrt(((0.95-0.96)^2 + (0.97-0.96)^2) / 1) = 0.0141421
    assert band["acc"] == pytest.approx({"mean": 0.96, "std": 0.0141421356, "min": 0.95, "max": 0.97, "n": 2})
    versus = versus_band({"asr": 0.08, "acc": 0.96}, band)
    assert versus["asr"] == {"value": 0.08, "z": pytest.approx(3.0), "inside": False}
    assert versus["acc"] == {"value": 0.96, "z": pytest.approx(0.0), "inside": True}
    # A distance to the reference below every retrain's is inside: only the upper end bounds a distance.
    spread = band_stats([{"dist": 15.0}, {"dist": 16.0}], ["dist"])
    assert versus_band({"dist": 1.5}, spread, distances=["dist"])["dist"]["inside"] is True
    assert versus_band({"dist": 1.5}, spread)["dist"]["inside"] is False
    assert versus_band({"dist": 16.5}, spread, distances=["dist"])["dist"]["inside"] is False
    flat = band_stats([{"asr": 0.0}, {"asr": 0.0}], ["asr"])
    assert versus_band({"asr": 0.0}, flat)["asr"]["z"] == 0.0
    assert versus_band({"asr": 0.1}, flat)["asr"] == {"value": 0.1, "z": None, "inside": False}


def _toy():
    torch.manual_seed(0)
    x = torch.randn(40, 1, 2, 2)
    y = (x.flatten(1).sum(1) > 0).long()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()
    return model, x, y


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def test_relearn_steps_counts_sgd_steps_like_a_hand_rolled_loop():
    model, x, y = _toy()
    result = relearn_steps(model, x, y, measure=lambda m: _accuracy(m, x, y), threshold=0.9, lr=0.5, batch_size=8, max_steps=50, seed=3)
    # The same loop by hand: batches from a generator seeded 3, reshuffled after each pass.
    mine = copy.deepcopy(model)
    opt = torch.optim.SGD(mine.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(3)
    order, pos, steps = torch.randperm(40, generator=gen), 0, None
    for step in range(1, 51):
        if pos >= 40:
            order, pos = torch.randperm(40, generator=gen), 0
        idx = order[pos : pos + 8]
        pos += 8
        opt.zero_grad()
        F.cross_entropy(mine(x[idx]), y[idx]).backward()
        opt.step()
        if _accuracy(mine, x, y) >= 0.9:
            steps = step
            break
    assert steps is not None and result.steps == steps
    assert len(result.curve) == steps + 1 and result.curve[-1] >= 0.9 > max(result.curve[:-1])
    assert _accuracy(model, x, y) < 0.9  # the probe fine-tunes a copy
    assert relearn_steps(model, x, y, measure=lambda m: 1.0, threshold=0.9, lr=0.5, batch_size=8, max_steps=5).steps == 0
    never = relearn_steps(model, x, y, measure=lambda m: 0.0, threshold=0.9, lr=0.5, batch_size=8, max_steps=5)
    assert never.steps is None and len(never.curve) == 6


# --------------------------------------------------------------------------- whole runs, in-process


def drive(cfg, tmp_path):
    experiment = Experiment(cfg, out_dir=tmp_path / "out", show_progress=False)
    grid = LocalGrid(build_client_app(app_config.client_spec_for(cfg, str(tmp_path / "caches"))), cfg.num_clients)
    experiment.drive(grid)
    return experiment, grid


def test_attacks_band_and_durability_in_one_run(small_cfg, tmp_path):
    cfg = small_cfg.replace(mia_attacks=("loss", "shadow", "lira"), lira_shadows=4, retrain_seeds=2, relearn_rounds=1, relearn_steps=20)
    experiment, grid = drive(cfg, tmp_path)
    results = experiment.results
    sets = membership_sets(DatasetStore.get(experiment.data_spec), [experiment.request])
    for name, model in results["models"].items():
        for attack in ("loss", "shadow", "lira"):
            entry = model["mia"][attack]
            assert 0.0 <= entry["auc"] <= 1.0 and 0.0 <= entry["tpr_at_1pct_fpr"] <= 1.0, (name, attack)
            assert entry["scored"] == sets.scored()
        assert model["mia_auc"] == model["mia"]["loss"]["auc"]
        assert model["relearn_probe"]["metric"] == "backdoor_asr"
    assert (
        results["membership"]["shadows"] == 4 and results["membership"]["pool"] == sets.scored()["members"] + sets.scored()["non_members"]
    )
    band = results["retrain_band"]
    assert band["acc_test"]["n"] == 3 and band["dist_para"]["n"] == 2
    runs = results["retrain_band_runs"]
    accs = [results["models"]["retrain"]["acc_test"], *(r["acc_test"] for r in runs)]
    assert band["acc_test"]["mean"] == pytest.approx(sum(accs) / 3) and band["acc_test"]["min"] == min(accs)
    assert len({r["seed"] for r in runs}) == 2 and all(r["dist_para"] > 0 for r in runs)  # other seeds, other models
    iau = results["models"]["iau"]
    assert iau["vs_retrain_band"]["acc_test"]["inside"] == (band["acc_test"]["min"] <= iau["acc_test"] <= band["acc_test"]["max"])
    assert "vs_retrain_band" not in results["models"]["retrain"]
    for name in ("retrain", "iau", "iau-cached"):
        durability = results["models"][name]["durability"]
        assert durability["rounds"] == 1 and set(durability) >= {"acc_test", "backdoor_asr", "mia_auc"}
    # Every model continued with the same seeds: the two IAU protocols start from the same model and stay together.
    assert results["models"]["iau"]["durability"]["acc_test"] == pytest.approx(
        results["models"]["iau-cached"]["durability"]["acc_test"], abs=0.01
    )
    # R = 0 is the model itself.
    evaluator = experiment.evaluator
    zero = experiment._durability("probe", experiment.original_arrays, evaluator, grid, None, ledger=(), suffix="", rounds=0)
    itself = evaluator.full(experiment.original_arrays, None)
    assert (
        zero["acc_test"] == itself["acc_test"] and zero["backdoor_asr"] == itself["backdoor_asr"] and zero["mia_auc"] == itself["mia_auc"]
    )
    report = (tmp_path / "out" / "results.json").read_text()
    assert '"retrain_band"' in report and '"durability"' in report


def test_ulira_unlearns_in_every_shadow_and_scores_pairs(small_cfg, tmp_path):
    cfg = small_cfg.replace(mia_attacks=("loss", "ulira"), lira_shadows=4, methods=("retrain", "iau"), relearn_steps=0)
    experiment, _ = drive(cfg, tmp_path)
    entry = experiment.results["models"]["iau"]["mia"]["ulira"]
    assert 0.0 <= entry["auc"] <= 1.0
    pool = experiment.results["membership"]["pool"]
    assert entry["scored"]["members"] + entry["scored"]["non_members"] == 4 * pool
    assert entry["scored"]["members"] == 2 * pool  # every candidate IN in half of the shadows
    assert entry["cost"]["seconds_per_shadow"] > 0 and entry["cost"]["failed_shadows"] == 0
    assert "ulira" not in experiment.results["models"]["retrain"]["mia"]


BAD = [
    (["--retrain-seeds", "-1"], "retrain-seeds=-1"),
    (["--lira-shadows", "1"], "lira-shadows=1"),
    (["--mia-attacks", "foo"], "mia-attacks='foo'"),
    (["--mia-attacks", "loss,ulira", "--methods", "retrain"], "needs a method to evaluate"),
    (["--mia-attacks", "ulira", "--lira-shadows", "2"], "at least 4"),
    (["--preset", "sample-level", "--mia-attacks", "lira"], "too few to score"),
    (["--relearn-rounds", "-1"], "relearn-rounds=-1"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_evaluation_settings_are_refused_before_anything_starts(argv, message, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "simulations.run", *argv, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
