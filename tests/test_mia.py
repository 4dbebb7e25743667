"""Shadow-model membership inference: it separates an overfitted model's members, and not a fresh model's."""

from __future__ import annotations

import torch

from fedunlearn.data import DataSpec, DatasetStore
from fedunlearn.mia import ShadowModelAttack, ShadowSettings
from fedunlearn.models import build_model
from fedunlearn.training import TrainSettings, local_train


def test_shadow_attack_detects_members_of_an_overfitted_model():
    data = DatasetStore.get(DataSpec(num_clients=4, backdoor_client=None))
    build = lambda: build_model("mlp", data.input_shape, data.num_classes)  # noqa: E731
    attack = ShadowModelAttack(build, data.x_test, data.y_test, data.num_classes, ShadowSettings(num_shadow_models=2, epochs=100), seed=0)
    members = data.client_train[0][:100]
    non_members = data.client_heldout[1][:60]
    member_xy = (data.x_train[members], data.y_train[members])
    non_member_xy = (data.x_train[non_members], data.y_train[non_members])
    settings = TrainSettings(epochs=100, lr=0.1, batch_size=16)
    torch.manual_seed(0)
    target = build()
    local_train(target, *member_xy, settings, torch.Generator().manual_seed(0))
    # A model of the same recipe trained on other data: the "members" are not its members.
    torch.manual_seed(0)
    outsider = build()
    other = data.client_train[2][:100]
    local_train(outsider, data.x_train[other], data.y_train[other], settings, torch.Generator().manual_seed(0))
    auc_target = attack.auc(target, member_xy, non_member_xy)
    auc_outsider = attack.auc(outsider, member_xy, non_member_xy)
    assert auc_target > 0.65, auc_target
    assert abs(auc_outsider - 0.5) < 0.12, auc_outsider
    scores = attack.member_scores(target, *member_xy)
    assert scores.shape == (100,) and ((scores >= 0) & (scores <= 1)).all()
