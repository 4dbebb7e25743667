"""Driver-side evaluation of global models: removal quality, membership attacks, distances to the retrained model.

Every model (original, retrain, each method, the retrain band, the durability continuations) is scored
by one Evaluator per request on the same data the clients hold. Membership is scored on the sets of
`fedunlearn.mia.membership_sets` (the clean part of the forget set against its clients' held-out data),
with every attack named in --mia-attacks, each recording what it scored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedunlearn.config import ExperimentConfig
from fedunlearn.data import FederatedData
from fedunlearn.deletion import DeletionRequest, forget_indices, kept_indices
from fedunlearn.lira import model_logit_confidence
from fedunlearn.metrics import accuracy, attack_success_rate, evaluate_model
from fedunlearn.mia import MembershipSets, loss_scores, membership_sets, score_summary
from fedunlearn.models import build_model
from strategies import app_config

from .shadows import ShadowBank

# Keys of the flat per-model entries the report and the seed summary read (the nested `mia` block holds the rest).
FLAT_AUC = {"loss": "mia_auc", "shadow": "mia_shadow_auc", "lira": "mia_lira_auc", "ulira": "mia_ulira_auc"}


def attacks_of(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The attacks a run scores (`--no-shadow-mia` drops the shadow attack, as it did before --mia-attacks)."""
    return tuple(a for a in cfg.mia_attacks if a != "shadow" or cfg.shadow_mia)


class Evaluator:
    """Scores global models on the experiment's data for the requests served so far (deleted data: their union)."""

    def __init__(
        self, cfg: ExperimentConfig, data: FederatedData, requests: tuple[DeletionRequest, ...], bank: ShadowBank | None = None
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.device = torch.device(app_config.device_for(cfg))
        self.model_name = app_config.model_name_for(cfg)
        withdrawn = {r.client for r in requests if r.client_level}
        remained = torch.cat([kept_indices(data, p, list(requests)) for p in range(data.num_clients) if p not in withdrawn])
        deleted = torch.unique(torch.cat([forget_indices(data, r) for r in requests]))
        self.sets: MembershipSets = membership_sets(data, requests)
        self.test = (data.x_test, data.y_test)
        self.remained = (data.x_train[remained], data.y_train[remained])
        self.deleted = (data.x_train[deleted], data.y_train[deleted])
        self.members = (data.x_train[self.sets.members], data.y_train[self.sets.members])
        self.non_members = (data.x_train[self.sets.non_members], data.y_train[self.sets.non_members])
        self.triggered = data.triggered_test()[0] if cfg.backdoor else None
        self.attacks = attacks_of(cfg)
        self.bank = bank
        self.relearn_threshold: float | None = None  # the relearning probe's target, from the original model

    def model(self, arrays: ArrayRecord) -> torch.nn.Module:
        """A fresh model holding `arrays`."""
        model = build_model(self.model_name, self.data.input_shape, self.data.num_classes)
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        return model.to(self.device).eval()

    def quick(self, arrays: ArrayRecord) -> dict[str, float]:
        """Test accuracy and backdoor ASR (the per-round curves)."""
        model = self.model(arrays)
        out = {"acc_test": accuracy(model, *self.test)}
        if self.triggered is not None:
            out["backdoor_asr"] = attack_success_rate(model, self.triggered, self.cfg.backdoor_target)
        return out

    def full(self, arrays: ArrayRecord, reference: ArrayRecord | None, method: str | None = None) -> dict[str, Any]:
        """Every removal-quality metric and membership attack, distances against the retrained model when it exists."""
        model = self.model(arrays)
        metrics: dict[str, Any] = dict(
            evaluate_model(
                model,
                test=self.test,
                remained=self.remained,
                deleted=self.deleted,
                triggered=self.triggered,
                target=self.cfg.backdoor_target,
                heldout=self.non_members,
                members=self.members,
                reference=self.model(reference) if reference is not None else None,
            )
        )
        for key in ("dist_para", "dist_output"):
            metrics.setdefault(key, None)
        metrics["mia"] = self.membership(model, method)
        for attack, entry in metrics["mia"].items():
            metrics[FLAT_AUC[attack]] = entry.get("auc")
        if metrics["mia"].get("loss", {}).get("auc") is None:
            metrics["mia_auc"] = None
        return metrics

    def membership(self, model: torch.nn.Module, method: str | None) -> dict[str, dict[str, Any]]:
        """Each attack's AUC and TPR at low FPR on the scored sets, with what was scored."""
        scored = self.sets.scored()
        out: dict[str, dict[str, Any]] = {}
        for attack in self.attacks:
            if attack == "ulira":
                if self.bank is not None and method in self.bank.unlearned_phi:
                    out[attack] = self._ulira(method)
                continue
            if self.sets.too_small:
                out[attack] = {
                    "auc": None,
                    "tpr_at_1pct_fpr": None,
                    "tpr_at_0_1pct_fpr": None,
                    "scored": scored,
                    "skipped": "too few members or non-members to score (see scored)",
                }
                continue
            if attack == "loss":
                members, others = loss_scores(model, *self.members), loss_scores(model, *self.non_members)
            elif attack == "shadow" and self.bank is not None and self.bank.shadow_attack is not None:
                members = self.bank.shadow_attack.member_scores(model, *self.members)
                others = self.bank.shadow_attack.member_scores(model, *self.non_members)
            elif attack == "lira" and self.bank is not None:
                scores = self.bank.lira_scores(
                    model_logit_confidence(model, self.data.x_train[self.bank.pool], self.data.y_train[self.bank.pool])
                )
                members = scores[self.bank.positions(self.sets.members)].numpy()
                others = scores[self.bank.positions(self.sets.non_members)].numpy()
            else:
                continue
            out[attack] = {**score_summary(np.asarray(members), np.asarray(others)), "scored": scored}
        return out

    def _ulira(self, method: str) -> dict[str, Any]:
        """U-LiRA for `method`: every unlearned shadow against the others; members are (shadow, its unlearned example) pairs."""
        assert self.bank is not None
        scores = self.bank.ulira_scores(method)
        mask = self.bank.in_mask
        valid = torch.isfinite(scores)
        summary = score_summary(scores[mask & valid].numpy(), scores[~mask & valid].numpy())
        shadows = int(mask.shape[0])
        return {
            **summary,
            "scored": {
                "members": int((mask & valid).sum()),
                "non_members": int((~mask & valid).sum()),
                "which": f"(shadow, example) pairs over {shadows} shadows x {mask.shape[1]} pool examples: members were "
                f"trained on, then unlearned with {method}; non-members were never trained on",
            },
            "cost": self.bank.cost.get("unlearn", {}).get(method),
        }
