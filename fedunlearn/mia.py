"""Shadow-model membership inference (Shokri et al. 2017) through the Adversarial Robustness Toolbox.

Shadow models of the target's architecture are trained on data disjoint from the target's training
data (the simulator uses the test split); an attack classifier learns, from the shadow models'
outputs, to tell their members from their non-members, and is then applied to the target model's
outputs on the deleted examples (members before unlearning) against held-out examples. ART does the
shadow training bookkeeping and the attack model; this module only adapts our models and data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from .metrics import predict_proba
from .training import TrainSettings, local_train


@dataclass(frozen=True)
class ShadowSettings:
    """How the shadow models are trained (defaults sized for the digits default)."""

    num_shadow_models: int = 3
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.1
    attack_model: str = "rf"  # ART attack_model_type: rf, gb or nn


class ShadowModelAttack:
    """Fit once per experiment on shadow data; `auc(model, members, non_members)` scores any target model."""

    def __init__(self, build_model: Callable[[], nn.Module], x_shadow: torch.Tensor, y_shadow: torch.Tensor,
                 num_classes: int, settings: ShadowSettings = ShadowSettings(), seed: int = 0) -> None:
        from art.attacks.inference.membership_inference import MembershipInferenceBlackBox
        from art.estimators.classification import PyTorchClassifier

        if len(x_shadow) < 4 * settings.num_shadow_models:
            raise ValueError(f"{len(x_shadow)} shadow examples are too few for {settings.num_shadow_models} shadow models")
        # Shadow training is done here (ART's ShadowModels cannot pass epochs to the fit): each shadow model
        # trains on a random half of the shadow pool; the other half are its non-members.
        train = TrainSettings(epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size)
        rng = np.random.default_rng(seed)
        features: dict[bool, list[np.ndarray]] = {True: [], False: []}
        labels: dict[bool, list[np.ndarray]] = {True: [], False: []}
        for k in range(settings.num_shadow_models):
            order = torch.from_numpy(rng.permutation(len(x_shadow)))
            inside, outside = order[: len(order) // 2], order[len(order) // 2:]
            torch.manual_seed(seed * 1000 + k)
            shadow = build_model()
            local_train(shadow, x_shadow[inside], y_shadow[inside], train, torch.Generator().manual_seed(seed * 1000 + k))
            for member, idx in ((True, inside), (False, outside)):
                features[member].append(predict_proba(shadow, x_shadow[idx]).cpu().numpy().astype(np.float32))
                labels[member].append(np.eye(num_classes, dtype=np.float32)[y_shadow[idx].numpy()])
        self.num_classes = num_classes
        template = build_model()
        estimator = PyTorchClassifier(model=template, loss=nn.CrossEntropyLoss(), input_shape=tuple(x_shadow.shape[1:]),
                                      nb_classes=num_classes, device_type="cpu")
        self.attack = MembershipInferenceBlackBox(estimator, attack_model_type=settings.attack_model)
        if "random_state" in self.attack.attack_model.get_params():  # ART leaves sklearn's forest unseeded
            self.attack.attack_model.set_params(random_state=seed)
        member_pred, member_y = np.concatenate(features[True]), np.concatenate(labels[True])
        other_pred, other_y = np.concatenate(features[False]), np.concatenate(labels[False])
        dummy = np.zeros((len(member_pred), *x_shadow.shape[1:]), dtype=np.float32)
        dummy_other = np.zeros((len(other_pred), *x_shadow.shape[1:]), dtype=np.float32)
        self.attack.fit(dummy, member_y, dummy_other, other_y, member_pred, other_pred)
        self.shadow_train_examples = len(member_pred)

    def member_scores(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        """Attack's membership probability for each (x, y) against `model`."""
        pred = predict_proba(model, x).cpu().numpy().astype(np.float32)
        onehot = np.eye(self.num_classes, dtype=np.float32)[y.numpy()]
        return np.asarray(self.attack.infer(x.numpy().astype(np.float32), onehot, pred=pred, probabilities=True)).reshape(len(x), -1)[:, -1]

    def auc(self, model: nn.Module, members: tuple[torch.Tensor, torch.Tensor], non_members: tuple[torch.Tensor, torch.Tensor]) -> float:
        """ROC AUC of the attack separating `members` (e.g. the deleted data) from `non_members` (held-out)."""
        scores = np.concatenate([self.member_scores(model, *members), self.member_scores(model, *non_members)])
        labels = np.concatenate([np.ones(len(members[0])), np.zeros(len(non_members[0]))])
        return float(roc_auc_score(labels, scores))
