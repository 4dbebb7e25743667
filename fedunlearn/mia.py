"""Membership inference that measures membership: who is scored, the shadow-model attack, and attack summaries.

Members and non-members come from one distribution (ALGORITHMS.md section 7). A poisoned forget set
would turn a loss attack into a second backdoor metric (its triggered, relabelled examples have a
high loss on any clean model), so only the CLEAN part of the forget set S is scored as members, with
its true labels, against the held-out data of the clients that hold S; the poisoned part is the
backdoor metric's job.

The shadow-model attack (Shokri et al. 2017) uses ART's black-box attack classifier, fitted on the
outputs of shadow models that the caller trained the way the target was trained (the simulator
trains them federated, in-process: simulations/shadows.py); LiRA's math is in `fedunlearn.lira`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .data import FederatedData
from .deletion import DeletionRequest, forget_indices
from .metrics import per_example_loss, predict_proba

__all__ = ["MIN_SCORED", "MembershipSets", "ShadowAttack", "membership_sets", "score_summary"]

# Fewer examples per side than this give an AUC whose standard error passes 0.1: refused for the costly attacks.
MIN_SCORED = 10


@dataclass(frozen=True)
class MembershipSets:
    """Global train indices scored as members (clean part of S) and non-members (held-out data of S's clients)."""

    members: torch.Tensor
    non_members: torch.Tensor
    which: str

    def scored(self) -> dict[str, object]:
        """What results.json records under `mia.<attack>.scored`."""
        return {"members": int(self.members.numel()), "non_members": int(self.non_members.numel()), "which": self.which}

    @property
    def too_small(self) -> bool:
        """Whether either side is below MIN_SCORED."""
        return min(self.members.numel(), self.non_members.numel()) < MIN_SCORED


def membership_sets(data: FederatedData, requests: tuple[DeletionRequest, ...] | list[DeletionRequest]) -> MembershipSets:
    """Members: the forget set's untriggered examples (true labels); non-members: its clients' held-out examples."""
    deleted = torch.unique(torch.cat([forget_indices(data, r) for r in requests]))
    clean = deleted[~data.poisoned[deleted]]
    clients = sorted({r.client for r in requests})
    held = torch.sort(torch.cat([data.client_heldout[c] for c in clients])).values
    poisoned = int(deleted.numel() - clean.numel())
    which = (
        f"members: the {clean.numel()} clean examples of the forget set (untriggered, true labels"
        + (f"; its {poisoned} poisoned examples are left to the backdoor metric" if poisoned else "")
        + f"); non-members: the {held.numel()} held-out examples of client(s) {', '.join(map(str, clients))}"
    )
    return MembershipSets(clean, held, which)


def score_summary(member_scores: np.ndarray, non_member_scores: np.ndarray) -> dict[str, float]:
    """AUC and TPR at 1% and 0.1% FPR of scores where higher means member."""
    from .lira import attack_summary

    summary = attack_summary(torch.as_tensor(member_scores, dtype=torch.float64), torch.as_tensor(non_member_scores, dtype=torch.float64))
    return {k: summary[k] for k in ("auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr")}


def loss_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """The loss attack's score (Yeom et al. 2018): minus the per-example loss."""
    return (-per_example_loss(model, x, y)).double().numpy()


class ShadowAttack:
    """ART's black-box membership attack classifier, fitted on shadow models' outputs on their members and non-members."""

    def __init__(
        self, template: nn.Module, input_shape: tuple[int, ...], num_classes: int, attack_model: str = "rf", seed: int = 0
    ) -> None:
        from art.attacks.inference.membership_inference import MembershipInferenceBlackBox
        from art.estimators.classification import PyTorchClassifier

        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        estimator = PyTorchClassifier(
            model=template, loss=nn.CrossEntropyLoss(), input_shape=self.input_shape, nb_classes=num_classes, device_type="cpu"
        )
        self.attack = MembershipInferenceBlackBox(estimator, attack_model_type=attack_model)
        if "random_state" in self.attack.attack_model.get_params():  # ART leaves sklearn's forest unseeded
            self.attack.attack_model.set_params(random_state=seed)
        self._features: dict[bool, list[np.ndarray]] = {True: [], False: []}
        self._labels: dict[bool, list[np.ndarray]] = {True: [], False: []}
        self.fitted = False

    def add_shadow(
        self, shadow: nn.Module, members: tuple[torch.Tensor, torch.Tensor], non_members: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        """Record one shadow model's output distributions on examples it trained on and examples it did not."""
        for member, (x, y) in ((True, members), (False, non_members)):
            self._features[member].append(predict_proba(shadow, x).numpy().astype(np.float32))
            self._labels[member].append(np.eye(self.num_classes, dtype=np.float32)[y.numpy()])

    def fit(self) -> None:
        """Fit the attack classifier on every shadow recorded so far."""
        member_pred, member_y = np.concatenate(self._features[True]), np.concatenate(self._labels[True])
        other_pred, other_y = np.concatenate(self._features[False]), np.concatenate(self._labels[False])
        # ART wants inputs beside the predictions it is given; with `pred` passed it never looks at them.
        dummy = np.zeros((len(member_pred), *self.input_shape), dtype=np.float32)
        dummy_other = np.zeros((len(other_pred), *self.input_shape), dtype=np.float32)
        self.attack.fit(dummy, member_y, dummy_other, other_y, member_pred, other_pred)
        self.train_examples = {"members": len(member_pred), "non_members": len(other_pred)}
        self.fitted = True

    def member_scores(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        """The attack's membership probability for each (x, y) against `model`."""
        pred = predict_proba(model, x).numpy().astype(np.float32)
        onehot = np.eye(self.num_classes, dtype=np.float32)[y.numpy()]
        dummy = np.zeros((len(x), *self.input_shape), dtype=np.float32)
        return np.asarray(self.attack.infer(dummy, onehot, pred=pred, probabilities=True)).reshape(len(x), -1)[:, -1].astype(np.float64)
