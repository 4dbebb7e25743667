"""The experiment configuration: one frozen dataclass, presets, config files; read once at the edge."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from .data import CLASS_ASSIGNMENTS, DATASET_NAMES, LOADER_CONTRACT, MIN_CLIENT_EXAMPLES, PARTITIONS
from .errors import ConfigError
from .iau import CALIBRATIONS, STEP_RULES
from .models import FACTORY_CONTRACT, MODEL_NAMES, registered_models
from .plugins import is_plugin_path

DATASETS = DATASET_NAMES
OPTIMIZERS = ("sgd", "adam")
FORGET_SAMPLES = ("all", "poisoned", "random")
CACHE_DTYPES = ("float64", "float32", "bfloat16", "float16")
MODELS = ("auto", *MODEL_NAMES)
UNLEARN_POLICIES = ("renormalise", "abort")
NORM_ACTIONS = ("clip", "reject")
EXECUTIONS = ("per-node", "cohort")
MIA_ATTACKS = ("loss", "shadow", "lira", "ulira")
COHORT_TRAIN = ("auto", "vmap", "loop")
TRACKING = ("off", "tensorboard", "mlflow")
# Methods that can run with --secure-aggregation: IAU's need only sums; retrain and finetune are FedAvg rounds, plain as
# training is (secure aggregation here covers the unlearning uploads, not FedAvg). Any other method is refused.
SECURE_METHODS = ("retrain", "finetune", "iau", "iau-cached")


@dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of one experiment; field names are the CLI flags with '_' for '-'."""

    # data
    dataset: str = field(
        default="digits",
        metadata={
            "help": f"dataset: {', '.join(DATASETS)} (digits ships with scikit-learn: offline), or PKG.MODULE:LOADER, your own loader (docs/data-and-models.md)"
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "folder holding torchvision datasets (MNIST, FashionMNIST, CIFAR-10); passed to a PKG.MODULE:LOADER as data_dir"},
    )
    download: bool = field(default=False, metadata={"help": "let torchvision download the dataset into --data-dir if it is missing"})
    train_limit: int | None = field(default=None, metadata={"help": "use at most this many training examples (seeded subset)"})
    num_clients: int = field(default=10, metadata={"help": "number of federated clients (Flower SuperNodes)"})
    partition: str = field(
        default="iid",
        metadata={
            "help": f"how data is split over clients, by the flwr-datasets partitioner of that name: {', '.join(PARTITIONS)} (seeded by --seed)"
        },
    )
    alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration for --partition dirichlet (smaller = more label skew)"})
    min_partition_size: int = field(
        default=MIN_CLIENT_EXAMPLES,
        metadata={
            "help": f"--partition dirichlet: redraw until every client holds at least this many examples (>= {MIN_CLIENT_EXAMPLES}; flwr-datasets gives up after 10 redraws)"
        },
    )
    self_balancing: bool = field(
        default=False,
        metadata={
            "help": "--partition dirichlet: stop giving a class to clients that already hold more than the average (flwr-datasets' self_balancing)"
        },
    )
    classes_per_client: int = field(default=2, metadata={"help": "--partition pathological: classes each client holds"})
    class_assignment: str = field(
        default="first-deterministic",
        metadata={
            "help": f"--partition pathological: how classes are dealt, {', '.join(CLASS_ASSIGNMENTS)} (first-deterministic: client i's first class is i mod classes, so every class is used once there are as many clients; random may leave classes, and their examples, unused)"
        },
    )
    shards_per_client: int = field(
        default=2, metadata={"help": "--partition shard: label-sorted shards each client receives (McMahan et al. use 2)"}
    )
    shard_size: int = field(
        default=0,
        metadata={
            "help": "--partition shard: examples per shard (0 = the train split cut into num-clients x shards-per-client equal shards; examples left over are used by no client)"
        },
    )
    input_noise: float = field(
        default=0.0,
        metadata={
            "help": "std of Gaussian noise added once to every input, train and test (seeded; 0 = none): a harder task on the same images, where membership becomes measurable"
        },
    )
    heldout_fraction: float = field(default=0.2, metadata={"help": "fraction of each client's data held out (evaluation, MIA non-members)"})
    # backdoor used to verify removal
    backdoor: bool = field(default=True, metadata={"help": "stamp a pixel trigger on part of the forgetting client's data (removal check)"})
    backdoor_fraction: float = field(
        default=0.8, metadata={"help": "fraction of the forgetting client's training examples that carry the trigger"}
    )
    backdoor_target: int = field(default=0, metadata={"help": "label the triggered examples are relabelled to"})
    trigger_size: int = field(default=4, metadata={"help": "side in pixels of the square trigger in the bottom-right corner"})
    # model and training
    model: str = field(
        default="auto",
        metadata={
            "help": f"model: {', '.join(MODELS)} (auto: cnn for digits/MNIST and for a plug-in dataset, resnet18 for CIFAR-10), or PKG.MODULE:FACTORY, your own FACTORY(input_shape, num_classes) -> torch.nn.Module (docs/data-and-models.md)"
        },
    )
    rounds: int = field(default=30, metadata={"help": "FedAvg training rounds"})
    local_epochs: int = field(default=2, metadata={"help": "local epochs per round"})
    batch_size: int = field(default=32, metadata={"help": "local mini-batch size"})
    optimizer: str = field(default="sgd", metadata={"help": f"local optimiser: {', '.join(OPTIMIZERS)}"})
    lr: float = field(default=0.1, metadata={"help": "local learning rate"})
    momentum: float = field(default=0.0, metadata={"help": "SGD momentum"})
    fraction_fit: float = field(default=1.0, metadata={"help": "fraction of clients sampled per training round"})
    gr_alpha: float = field(default=0.0, metadata={"help": "Gradient Restriction weight alpha during training (0 = off; IAU uses 0.005)"})
    # deletion
    forget_client: int = field(default=0, metadata={"help": "partition id of the client that asks to forget"})
    forget_samples: str = field(
        default="all", metadata={"help": "what it forgets: all (client-level), poisoned (its triggered examples), random"}
    )
    forget_fraction: float = field(default=0.1, metadata={"help": "fraction of its examples forgotten with --forget-samples random"})
    withdraw_round: int | None = field(
        default=None,
        metadata={
            "help": "round after which the request arrives (default: after training); training then continues without the forgotten data"
        },
    )
    stream_clients: tuple[int, ...] = field(
        default=(),
        metadata={
            "help": "a stream of withdrawals: comma-separated partition ids whose requests arrive one after another after --forget-client's (same --forget-samples: all or random); every method serves each request from its own previous model, and every metric is reported after each request"
        },
    )
    # methods
    methods: tuple[str, ...] = field(
        default=("retrain", "iau", "iau-cached"), metadata={"help": "comma-separated unlearning methods to compare"}
    )
    # Defaults: the best measured variant over six presets x three seeds (docs/reports/iau-ablation.md), one default
    # everywhere: IAUSettings() holds the same step settings.
    iau_eta: float = field(
        default=0.045,
        metadata={
            "help": "IAU step size eta of the sgd and adam-first-step rules (sgd: 0.045 on the default scenario; adam-first-step: about 1e-3)"
        },
    )
    iau_steps: int = field(default=2, metadata={"help": "IAU steps K (each a round in the fresh protocol)"})
    iau_step_rule: str = field(
        default="normalised",
        metadata={
            "help": f"IAU step rule: {', '.join(STEP_RULES)} (adam-first-step is the IAU reference code's one Adam step; normalised: each step of length --iau-radius times ||theta||)"
        },
    )
    iau_radius: float = field(
        default=0.04, metadata={"help": "IAU normalised rule: each step's length as a fraction of the parameter norm ||theta||"}
    )
    iau_correction_weight: float = field(
        default=3.0, metadata={"help": "IAU: weight lambda of the remaining-data gradient in d = lambda g_r - g_f"}
    )
    iau_per_layer: bool = field(
        default=False, metadata={"help": "IAU normalised rule: normalise each layer's slice of d on its own (same total length)"}
    )
    iau_calibrate: str = field(
        default="off",
        metadata={
            "help": f"IAU: who chooses the normalised step's length: {', '.join(CALIBRATIONS)} (heldout-loss: the withdrawing client, from its own forget set and held-out data, one extra message to it alone)"
        },
    )
    iau_repair_rounds: int = field(
        default=1,
        metadata={
            "help": "iau (fresh protocol): FedAvg rounds among the remaining clients after the correction, as PGA does after its ascent (iau-cached never runs them: it contacts client u alone)"
        },
    )
    iau_refresh_every: int = field(
        default=0,
        metadata={
            "help": "IAU cached protocol with --iau-steps > 1: refresh g_r by a fresh round every k steps (0 = never: later steps use the aggregate cache's g_r, stale)"
        },
    )
    allow_stale_cache: bool = field(
        default=False, metadata={"help": "let clients answer from a cache at another model version instead of refreshing it"}
    )
    cache_dtype: str = field(
        default="float32", metadata={"help": f"storage precision of client gradient caches: {', '.join(CACHE_DTYPES)}"}
    )
    # baselines
    finetune_rounds: int = field(
        default=3, metadata={"help": "finetune: FedAvg rounds on the remaining clients (0 returns the model unchanged)"}
    )
    federaser_interval: int = field(
        default=2, metadata={"help": "FedEraser: the server stores client updates every N rounds (rounds 1, 1+N, ...)"}
    )
    federaser_calibration_ratio: float = field(
        default=0.5, metadata={"help": "FedEraser: calibration trains ceil(ratio * local-epochs) epochs (at least 1)"}
    )
    pga_radius: float = field(
        default=0.0,
        metadata={
            "help": "PGA: L2 radius of the ball around w_ref (0 = the authors' rule: sqrt(mean squared distance of w_ref to random models / 3))"
        },
    )
    # PGA and IMU step sizes from a short sweep on the default scenario (the authors' PGA lr 0.01 left the model at chance accuracy).
    pga_lr: float = field(
        default=0.002,
        metadata={"help": "PGA: learning rate of the withdrawing client's gradient ascent (SGD, momentum 0.9; the authors use 0.01)"},
    )
    pga_stop_distance: float = field(
        default=2.2,
        metadata={
            "help": "PGA: stop the ascent once the squared L2 distance to the client's last local model passes this (IBM's code: 2.2; 0 = never stop early)"
        },
    )
    pga_epochs: int = field(default=5, metadata={"help": "PGA: epochs of gradient ascent over the forget set"})
    pga_rounds: int = field(default=2, metadata={"help": "PGA: FedAvg rounds among the remaining clients after the ascent"})
    imu_lr: float = field(
        default=0.0012, metadata={"help": "IMU-head: learning rate of the influence-weighted ascent on the final layer (SGD)"}
    )
    imu_epochs: int = field(default=5, metadata={"help": "IMU-head: epochs of ascent over the forget set"})
    # faults and validation
    dropout_prob: float = field(
        default=0.0,
        metadata={
            "help": "fault injection: probability that a client drops out of a training, caching or unlearning round (seeded per client and message; 0 = none)"
        },
    )
    crash_client: int | None = field(
        default=None, metadata={"help": "fault injection: partition id of a client whose ClientApp raises at --crash-round"}
    )
    crash_round: int | None = field(
        default=None,
        metadata={"help": "fault injection: training round at which --crash-client crashes (in every training run that reaches it)"},
    )
    slow_clients: tuple[int, ...] = field(
        default=(),
        metadata={"help": "fault injection: comma-separated partition ids of clients that sleep --slow-seconds before every reply"},
    )
    slow_seconds: float = field(
        default=0.0,
        metadata={"help": "fault injection: delay of each --slow-clients reply in seconds (past --round-timeout the reply is missing)"},
    )
    withdrawing_offline: bool = field(
        default=False,
        metadata={
            "help": "fault injection: the withdrawing client is offline at request time; the server keeps uploaded caches and uses its upload (iau-cached's caching round), else the method aborts"
        },
    )
    malicious_client: int | None = field(
        default=None,
        metadata={"help": "fault injection: partition id of a client whose unlearning gradients are rescaled to --malicious-norm"},
    )
    malicious_norm: float = field(default=1e6, metadata={"help": "fault injection: L2 norm of --malicious-client's gradient replies"})
    unlearn_retries: int = field(
        default=2,
        metadata={
            "help": "times the server asks again the clients that did not answer (or sent a rejected reply) in a caching or unlearning round"
        },
    )
    unlearn_policy: str = field(
        default="abort",
        metadata={
            "help": f"after the retries, clients still missing from the correction round: {', '.join(UNLEARN_POLICIES)} (renormalise: g_r over the clients that answered; abort: model unchanged, recorded as aborted)"
        },
    )
    gradient_norm_bound: float = field(
        default=0.0, metadata={"help": "bound on the L2 norm of each client's contribution to the IAU direction d (0 = none)"}
    )
    gradient_norm_action: str = field(
        default="clip", metadata={"help": f"a contribution over --gradient-norm-bound is: {', '.join(NORM_ACTIONS)}"}
    )
    # execution
    seed: int = field(default=0, metadata={"help": "seed of data split, initial weights, client sampling and local shuffles"})
    execution: str = field(
        default="per-node",
        metadata={
            "help": f"how clients map to Flower SuperNodes: {', '.join(EXECUTIONS)} (per-node: one SuperNode per client; cohort: each SuperNode, a Ray worker, hosts --cohort-size virtual clients and trains the selected ones as one vectorised computation, same results; caches, withdrawals and byte/round counts stay per client; --num-cpus-per-client and --num-gpus-per-client then apply per worker)"
        },
    )
    cohort_size: int = field(
        default=0,
        metadata={
            "help": "with --execution cohort: virtual clients per SuperNode (0 = auto: ceil(num-clients / W), at most 64, W = this machine's CPUs / --num-cpus-per-client, capped by its GPUs / --num-gpus-per-client when that is > 0; set it explicitly on a multi-machine Ray cluster)"
        },
    )
    cohort_partial_sums: bool = field(
        default=True,
        metadata={
            "help": "with --execution cohort: each worker checks its clients' training models and replies with one float64 partial sum of them instead of one model per client (memory; same mean to float64 rounding, same per-client checks, rejections and byte counts; off when FedEraser or PGA must record every client's model; strategies/partial_sums.py)"
        },
    )
    cohort_train: str = field(
        default="auto",
        metadata={
            "help": "with --execution cohort: how a cohort's selected clients train: vmap (one vectorised torch.func computation), loop (one after another in the worker), auto (vmap on a GPU, loop on a CPU, where vmap over convolutions measured 2x slower; BENCHMARKS.md)"
        },
    )
    num_cpus_per_client: float = field(default=1.0, metadata={"help": "Ray CPUs per client actor"})
    num_gpus_per_client: float = field(default=0.0, metadata={"help": "Ray GPUs per client actor (fractions share a GPU)"})
    device: str = field(default="auto", metadata={"help": "torch device for clients and evaluation: auto, cpu, cuda"})
    ray_address: str = field(
        default="local",
        metadata={"help": "Ray cluster to use: 'local' starts a private one; 'auto' or host:port joins an existing cluster"},
    )
    round_timeout: float = field(default=600.0, metadata={"help": "seconds to wait for client replies in one round"})
    grid_poll_interval: float = field(
        default=0.005,
        metadata={
            "help": "seconds between the server's checks for client replies in a round, and between the simulation engine's checks for new messages (Flower waits 0.1 s in both, which adds up to 0.2 s to every round)"
        },
    )
    eval_every: int = field(default=1, metadata={"help": "evaluate the global model on the test set every N rounds (progress and curves)"})
    shadow_mia: bool = field(
        default=True,
        metadata={
            "help": "also run the shadow-model membership-inference attack (shadow models trained on the test split, ART attack classifier)"
        },
    )
    shadow_models: int = field(
        default=3,
        metadata={"help": "number of shadow models for the shadow-model attack (with lira too, the attack uses all --lira-shadows)"},
    )
    mia_attacks: tuple[str, ...] = field(
        default=("loss", "shadow"),
        metadata={
            "help": f"membership-inference attacks, comma-separated: {', '.join(MIA_ATTACKS)} (members: the clean part of the forget set; non-members: the same clients' held-out data; shadows are trained federated in-process as the target was; ulira is the unlearning attack of Hayes et al., costly: one shadow training and unlearning per shadow and method)"
        },
    )
    lira_shadows: int = field(
        default=16,
        metadata={
            "help": "LiRA / U-LiRA: shadow models, each trained on a random half of the candidate pool (even, >= 2; Carlini et al. use 64-256, the fits use one global variance below 64)"
        },
    )
    ulira_methods: tuple[str, ...] = field(
        default=(), metadata={"help": "methods U-LiRA evaluates (default: every selected method but retrain)"}
    )
    retrain_seeds: int = field(
        default=0,
        metadata={
            "help": "retrain this many more times with other seeds (initial weights, shuffles, client sampling; same data, clients and rounds): the band of retrained models every method is compared with"
        },
    )
    relearn_rounds: int = field(
        default=0,
        metadata={
            "help": "durability: after each method (and retrain) continue FedAvg on the remaining clients for R rounds, same seeds for every model, and measure again (0 = off)"
        },
    )
    relearn_lr: float = field(
        default=0.0,
        metadata={
            "help": "relearning probe: SGD learning rate (0 = a tenth of --lr: at the training rate one step relearns a backdoor in every model, retrained ones too, and the probe tells nothing apart)"
        },
    )
    relearn_steps: int = field(
        default=100,
        metadata={
            "help": "relearning probe: at most this many SGD steps of fine-tuning on the forget set, counting the steps until its ASR (or forget-set accuracy) is back at 90 percent of the original model's (0 = off)"
        },
    )
    checkpoint_every: int = field(
        default=5,
        metadata={
            "help": "save the global model and run state every N training rounds under DIR/checkpoint (0 = never); --resume continues from there"
        },
    )
    verbose: bool = field(default=False, metadata={"help": "show Flower's and Ray's own logs"})
    # experiment tracking (simulations/tracking.py; the backends are optional extras)
    tracking: str = field(
        default="off",
        metadata={
            "help": f"log per-round curves, every method's metrics and costs, and the report's plots to: {', '.join(TRACKING)} (tensorboard: DIR/tensorboard; mlflow: one run per experiment; needs pip install 'fedunlearn[tensorboard]' or 'fedunlearn[mlflow]')"
        },
    )
    tracking_uri: str | None = field(
        default=None,
        metadata={
            "help": "with --tracking mlflow: the tracking URI, e.g. http://host:5000 or sqlite:///runs.db (default: a local store in DIR, sqlite:///DIR/mlflow.db with artifacts in DIR/mlartifacts)"
        },
    )
    tracking_experiment: str = field(
        default="fedunlearn", metadata={"help": "with --tracking mlflow: the MLflow experiment the run is logged under"}
    )

    # secure aggregation (docs/secure-aggregation.md): one block, its checks below
    secure_aggregation: bool = field(
        default=False,
        metadata={
            "help": "IAU's correction round(s) and iau-cached's upload of G_tot run as SecAgg+ (Bell et al. 2020): the server learns only the sum of the clients' vectors; each client clips its vector to --gradient-norm-bound (required) and quantises it into [-B, B]; methods that need an individual client's update are refused"
        },
    )
    secagg_threshold: float = field(
        default=0.0,
        metadata={
            "help": "secure aggregation: shares needed to reconstruct a client's secret, out of the k = 2 ceil(log2 n) + 1 neighbours it shares with (SecAgg+): a count >= 2 or a fraction in (0, 1) of k (0 = a strict majority, floor(k/2) + 1); every client must keep this many answering neighbours at every stage, else the round aborts"
        },
    )

    def _check_secure_aggregation(self) -> None:
        t = self.secagg_threshold
        if not (t == 0 or 0 < t < 1 or (float(t).is_integer() and 2 <= t <= self.num_clients)):
            raise ConfigError(
                f"secagg-threshold={t}: must be 0 (a strict majority), a fraction in (0, 1) or a whole count in "
                f"[2, {self.num_clients}] (num-clients={self.num_clients})"
            )
        if not self.secure_aggregation:
            if t:
                raise ConfigError(f"secagg-threshold={t} has no effect without --secure-aggregation: add it, or drop --secagg-threshold")
            return
        if self.gradient_norm_bound <= 0:
            raise ConfigError(
                "secure-aggregation needs --gradient-norm-bound > 0: the server never sees a client's vector, so each "
                "client clips its own to that L2 norm, which is also the quantisation range [-B, B]; e.g. "
                "--gradient-norm-bound 10"
            )
        if self.gradient_norm_action != "clip":
            raise ConfigError(
                f"gradient-norm-action={self.gradient_norm_action} with secure-aggregation: the server cannot reject a "
                "vector it never sees; use --gradient-norm-action clip (each client clips its own)"
            )
        if self.unlearn_policy != "abort":
            raise ConfigError(
                f"unlearn-policy={self.unlearn_policy} with secure-aggregation: renormalising rescales the others' sum "
                "apart from the withdrawing client's vector, and the server sees only their total; use --unlearn-policy abort"
            )
        refused = [m for m in self.methods if m not in SECURE_METHODS]
        if refused:
            raise ConfigError(
                f"methods={','.join(self.methods)} with secure-aggregation: {', '.join(refused)} cannot run under it, "
                "each needs an individual client's update at the server (FedEraser its stored updates, PGA and IMU client u's model, gradient "
                f"ascent client u's gradient alone); run them without --secure-aggregation, or choose from {', '.join(SECURE_METHODS)}"
            )
        if self.malicious_client is not None:
            raise ConfigError(
                "malicious-client with secure-aggregation: the fault rescales a plain gradient reply, and a secure round "
                "sends none; drop one of them (docs/secure-aggregation.md: a malicious client is not defended against)"
            )

    def __post_init__(self) -> None:
        _check_types(self)  # first: every range check below may then compare numbers with numbers
        self._check_data_and_model()
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("forget-samples", self.forget_samples, FORGET_SAMPLES)
        _check_choice("iau-step-rule", self.iau_step_rule, tuple(STEP_RULES))
        _check_choice("iau-calibrate", self.iau_calibrate, CALIBRATIONS)
        _check_open("iau-radius", self.iau_radius, 0.0, None)
        _check_range("iau-correction-weight", self.iau_correction_weight, 0.0, None)
        _check_range("iau-refresh-every", self.iau_refresh_every, 0, None, "0 = never")
        _check_range("iau-repair-rounds", self.iau_repair_rounds, 0, None, "0 = no repair rounds")
        if self.iau_calibrate != "off" and self.iau_step_rule != "normalised":
            raise ConfigError(
                f"iau-calibrate={self.iau_calibrate}: the client chooses a normalised step's length; add "
                "--iau-step-rule normalised or drop --iau-calibrate"
            )
        _check_choice("cache-dtype", self.cache_dtype, CACHE_DTYPES)
        _check_range("num-clients", self.num_clients, 2, None, "at least 2 clients (one forgets, one remains)")
        _check_range("rounds", self.rounds, 1, None)
        _check_range("local-epochs", self.local_epochs, 1, None)
        _check_range("batch-size", self.batch_size, 1, None)
        _check_range("iau-steps", self.iau_steps, 1, None)
        _check_range("trigger-size", self.trigger_size, 1, None)
        _check_range("eval-every", self.eval_every, 1, None)
        _check_range("checkpoint-every", self.checkpoint_every, 0, None)
        _check_range("shadow-models", self.shadow_models, 1, 20)
        self._check_evaluation()
        _check_range("finetune-rounds", self.finetune_rounds, 0, None)
        _check_range("federaser-interval", self.federaser_interval, 1, None)
        _check_open("federaser-calibration-ratio", self.federaser_calibration_ratio, 0.0, 1.0, upper_inclusive=True)
        _check_range("pga-radius", self.pga_radius, 0.0, None, "0 picks the authors' rule")
        _check_open("pga-lr", self.pga_lr, 0.0, None)
        _check_range("pga-epochs", self.pga_epochs, 1, None)
        _check_range("pga-stop-distance", self.pga_stop_distance, 0.0, None, "0 = never stop early")
        _check_range("pga-rounds", self.pga_rounds, 0, None)
        _check_open("imu-lr", self.imu_lr, 0.0, None)
        _check_range("imu-epochs", self.imu_epochs, 1, None)
        _check_open("lr", self.lr, 0.0, None)
        _check_open("iau-eta", self.iau_eta, 0.0, None)
        _check_open("alpha", self.alpha, 0.0, None)
        _check_range("input-noise", self.input_noise, 0.0, None, "0 = clean inputs")
        _check_open("round-timeout", self.round_timeout, 0.0, None)
        _check_range("grid-poll-interval", self.grid_poll_interval, 0.0005, 1.0, "0.005 keeps short rounds short; 0.1 is Flower's default")
        _check_range("momentum", self.momentum, 0.0, 1.0)
        _check_range("gr-alpha", self.gr_alpha, 0.0, None)
        _check_open("num-cpus-per-client", self.num_cpus_per_client, 0.0, None)  # Flower divides the CPUs by it
        _check_range("num-gpus-per-client", self.num_gpus_per_client, 0.0, None)
        _check_open("fraction-fit", self.fraction_fit, 0.0, 1.0, upper_inclusive=True)
        _check_open("heldout-fraction", self.heldout_fraction, 0.0, 1.0)
        _check_open("backdoor-fraction", self.backdoor_fraction, 0.0, 1.0, upper_inclusive=True)
        _check_open("forget-fraction", self.forget_fraction, 0.0, 1.0, upper_inclusive=True)
        if not 0 <= self.forget_client < self.num_clients:
            raise ConfigError(
                f"forget-client={self.forget_client}: must be a partition id in [0, {self.num_clients - 1}] (num-clients={self.num_clients})"
            )
        if self.withdraw_round is not None and not 1 <= self.withdraw_round < self.rounds:
            raise ConfigError(
                f"withdraw-round={self.withdraw_round}: must be in [1, {self.rounds - 1}] (rounds={self.rounds}); omit it to withdraw after training"
            )
        self._check_stream()
        if self.forget_samples == "poisoned" and not self.backdoor:
            raise ConfigError("forget-samples=poisoned needs --backdoor: without a backdoor no example is poisoned; use random or all")
        if self.train_limit is not None and self.train_limit < self.num_clients * 4:
            raise ConfigError(f"train-limit={self.train_limit}: too small for {self.num_clients} clients (need at least 4 examples each)")
        if not self.methods:
            raise ConfigError("methods is empty: name at least one, e.g. --methods retrain,iau")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods={','.join(self.methods)}: a method is listed twice")
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise ConfigError(f"device={self.device!r}: must be auto, cpu, cuda or cuda:N")
        _check_range("seed", self.seed, 0, 2**32 - 1, "numpy's and scikit-learn's seeds are unsigned 32-bit integers")
        if not self.ray_address.strip():
            raise ConfigError("ray-address='': use 'local' for a private Ray instance, 'auto' or host:port for a cluster")
        self._check_faults()
        self._check_execution()
        self._check_tracking()
        self._check_secure_aggregation()

    def _check_tracking(self) -> None:
        _check_choice("tracking", self.tracking, TRACKING)
        if self.tracking != "mlflow":
            for key, value, default in (
                ("tracking-uri", self.tracking_uri, None),
                ("tracking-experiment", self.tracking_experiment, "fedunlearn"),
            ):
                if value != default:
                    raise ConfigError(
                        f"{key}={value!r} has no effect with tracking={self.tracking!r}: it names an MLflow store; "
                        f"add --tracking mlflow, or drop --{key}"
                        + (" (TensorBoard logs go to DIR/tensorboard)" if self.tracking == "tensorboard" else "")
                    )
        if not self.tracking_experiment.strip():
            raise ConfigError("tracking-experiment='': name the MLflow experiment, e.g. --tracking-experiment fedunlearn")
        if self.tracking_uri is not None and not self.tracking_uri.strip():
            raise ConfigError(
                "tracking-uri='': give an MLflow tracking URI (e.g. http://localhost:5000) or drop it for the local store in DIR"
            )

    def _check_data_and_model(self) -> None:
        """The form of --dataset and --model and the partitioner's options; a plug-in is imported and checked on the
        actual data when the experiment is set up (fedunlearn.models.check_model_fits), before anything starts."""
        if self.dataset not in DATASETS and not is_plugin_path(self.dataset):
            raise ConfigError(
                f"dataset={self.dataset!r}: must be one of {', '.join(DATASETS)}{_close(self.dataset, DATASETS)}, or "
                f"PKG.MODULE:LOADER naming {LOADER_CONTRACT}"
            )
        models = ("auto", *registered_models())
        if self.model not in models and not is_plugin_path(self.model):
            raise ConfigError(
                f"model={self.model!r}: must be one of {', '.join(models)}{_close(self.model, models)}, or "
                f"PKG.MODULE:FACTORY naming {FACTORY_CONTRACT}"
            )
        _check_choice("partition", self.partition, PARTITIONS)
        _check_range(
            "min-partition-size", self.min_partition_size, MIN_CLIENT_EXAMPLES, None, "every client trains on one example and holds one out"
        )
        _check_range("classes-per-client", self.classes_per_client, 1, None)
        _check_choice("class-assignment", self.class_assignment, CLASS_ASSIGNMENTS)
        _check_range("shards-per-client", self.shards_per_client, 1, None)
        _check_range("shard-size", self.shard_size, 0, None, "0 = equal shards from the whole train split")

    def _check_evaluation(self) -> None:
        for attack in self.mia_attacks:
            _check_choice("mia-attacks", attack, MIA_ATTACKS)
        if len(set(self.mia_attacks)) != len(self.mia_attacks):
            raise ConfigError(f"mia-attacks={','.join(self.mia_attacks)}: an attack is listed twice")
        if not isinstance(self.lira_shadows, int) or self.lira_shadows < 2 or self.lira_shadows % 2:
            raise ConfigError(
                f"lira-shadows={self.lira_shadows}: must be an even integer >= 2 (each candidate trains in half of "
                "the shadows; 16 is a quick start, Carlini et al. use 64 or more)"
            )
        _check_range("retrain-seeds", self.retrain_seeds, 0, 50, "0 = only the reference retrain; 2 or more give a band")
        _check_range("relearn-rounds", self.relearn_rounds, 0, None, "0 = no durability check")
        _check_range("relearn-steps", self.relearn_steps, 0, None, "0 = no relearning probe")
        _check_range("relearn-lr", self.relearn_lr, 0.0, None, "0 = a tenth of --lr")
        if "ulira" in self.mia_attacks:
            if self.stream_clients:
                raise ConfigError(
                    "mia-attacks=ulira with stream-clients: U-LiRA is measured for one request; drop ulira or --stream-clients"
                )
            if self.withdraw_round is not None:
                raise ConfigError(
                    "mia-attacks=ulira with withdraw-round: U-LiRA is measured for a request after training; drop one of them"
                )
            if self.lira_shadows < 4:
                raise ConfigError(
                    f"lira-shadows={self.lira_shadows} with ulira: U-LiRA scores each shadow against the others, so every "
                    "example needs IN and OUT shadows among the rest: use at least 4 (16 recommended)"
                )
            evaluated = self.ulira_methods or tuple(m for m in self.methods if m != "retrain")
            if not evaluated:
                raise ConfigError(
                    f"mia-attacks=ulira needs a method to evaluate: methods={','.join(self.methods)} has none but retrain; "
                    "add one, e.g. --methods retrain,iau"
                )
            missing = [m for m in evaluated if m not in self.methods]
            if missing or "retrain" in self.ulira_methods:
                raise ConfigError(
                    f"ulira-methods={','.join(self.ulira_methods)}: name methods of --methods other than retrain "
                    f"(methods={','.join(self.methods)})"
                )
        elif self.ulira_methods:
            raise ConfigError(
                f"ulira-methods={','.join(self.ulira_methods)} without ulira in --mia-attacks: add it, e.g. "
                "--mia-attacks loss,ulira, or drop --ulira-methods"
            )

    def _check_execution(self) -> None:
        _check_choice("execution", self.execution, EXECUTIONS)
        _check_choice("cohort-train", self.cohort_train, COHORT_TRAIN)
        if self.cohort_size < 0:
            raise ConfigError(f"cohort-size={self.cohort_size}: must be >= 0 (0 picks one cohort per worker that fits)")
        if self.cohort_size > self.num_clients:
            raise ConfigError(
                f"cohort-size={self.cohort_size}: must be <= num-clients={self.num_clients} (one cohort holds every "
                f"client at {self.num_clients}); 0 picks the size from the workers that fit"
            )
        if self.cohort_size and self.execution != "cohort":
            raise ConfigError(
                f"cohort-size={self.cohort_size} has no effect with execution={self.execution!r}: add --execution cohort, "
                "or drop --cohort-size"
            )

    def _check_stream(self) -> None:
        if not self.stream_clients:
            return
        text = ",".join(map(str, self.stream_clients))
        bad = [c for c in self.stream_clients if not 0 <= c < self.num_clients]
        if bad:
            raise ConfigError(f"stream-clients={text}: {bad} not in [0, {self.num_clients - 1}] (num-clients={self.num_clients})")
        order = (self.forget_client, *self.stream_clients)
        if len(set(order)) != len(order):
            raise ConfigError(
                f"stream-clients={text}: each client may appear once and not repeat --forget-client={self.forget_client} "
                "(a second request from the same client is served as a no-op repeat)"
            )
        if self.forget_samples == "all" and len(order) >= self.num_clients:
            raise ConfigError(
                f"stream-clients={text}: withdrawing {len(order)} of {self.num_clients} clients leaves none to train; "
                "name fewer clients or raise --num-clients"
            )
        if self.forget_samples == "poisoned":
            raise ConfigError(
                "stream-clients with forget-samples=poisoned: only --forget-client holds poisoned examples; "
                "use --forget-samples all (client-level) or random for a stream"
            )
        if self.withdraw_round is not None:
            raise ConfigError(
                f"stream-clients with withdraw-round={self.withdraw_round}: a stream of requests arrives after training; "
                "drop --withdraw-round or --stream-clients"
            )

    def _check_faults(self) -> None:
        if not 0.0 <= self.dropout_prob < 1.0:
            raise ConfigError(f"dropout-prob={self.dropout_prob}: must be in [0, 1) (0 = no dropouts)")
        last = self.num_clients - 1
        for key, client in (("crash-client", self.crash_client), ("malicious-client", self.malicious_client)):
            if client is not None and not 0 <= client <= last:
                raise ConfigError(f"{key}={client}: must be a partition id in [0, {last}] (num-clients={self.num_clients})")
        if (self.crash_client is None) != (self.crash_round is None):
            raise ConfigError(f"crash-client={self.crash_client}, crash-round={self.crash_round}: give both or neither")
        if self.crash_round is not None and not 1 <= self.crash_round <= self.rounds:
            raise ConfigError(f"crash-round={self.crash_round}: must be in [1, {self.rounds}] (rounds={self.rounds})")
        bad = [c for c in self.slow_clients if not 0 <= c <= last]
        if bad:
            raise ConfigError(
                f"slow-clients={','.join(map(str, self.slow_clients))}: {bad} not in [0, {last}] (num-clients={self.num_clients})"
            )
        _check_range("slow-seconds", self.slow_seconds, 0.0, None)
        _check_open("malicious-norm", self.malicious_norm, 0.0, None)
        _check_range("unlearn-retries", self.unlearn_retries, 0, 100)
        _check_choice("unlearn-policy", self.unlearn_policy, UNLEARN_POLICIES)
        _check_range("gradient-norm-bound", self.gradient_norm_bound, 0.0, None, "0 = no bound")
        _check_choice("gradient-norm-action", self.gradient_norm_action, NORM_ACTIONS)

    def to_dict(self) -> dict[str, Any]:
        """Every setting under its kebab-case key (what results.json records)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name.replace("_", "-")] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(allowed)}{hint}")


def _close(value: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(value), allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_range(key: str, value: float, low: float | None, high: float | None, why: str = "") -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{key}={value}: must be {bounds}{'; ' + why if why else ''}")


def _check_open(key: str, value: float, low: float, high: float | None, upper_inclusive: bool = False) -> None:
    ok = value > low and (high is None or (value <= high if upper_inclusive else value < high))
    if not ok:
        upper = "" if high is None else (f" and <= {high}" if upper_inclusive else f" and < {high}")
        raise ConfigError(f"{key}={value}: must be > {low}{upper}")


FIELD_NAMES = tuple(f.name for f in fields(ExperimentConfig))

PRESETS: dict[str, dict[str, Any]] = {
    # The default scenario: digits, 10 IID clients, client 0 backdoored (80% of its examples) withdraws after training.
    "default": {},
    # Seconds-scale end-to-end check of the whole pipeline.
    "smoke": {"num_clients": 5, "rounds": 6, "local_epochs": 2},
    "client-level": {"forget_samples": "all"},
    # Client 0 asks to forget only its poisoned (triggered) examples.
    "sample-level": {"forget_samples": "poisoned"},
    "dirichlet": {"partition": "dirichlet", "alpha": 0.5},
    "dirichlet-0.5": {"partition": "dirichlet", "alpha": 0.5},
    "dirichlet-0.1": {"partition": "dirichlet", "alpha": 0.1},
    # The request arrives after round 20 of 30; training then continues without client 0.
    "mid-training": {"withdraw_round": 20},
    # Three withdrawals one after another after training: client 0 (backdoored), then clients 3 and 7.
    "stream": {"stream_clients": (3, 7)},
    # Where membership is measurable (ALGORITHMS.md section 7): no backdoor; client 0 forgets a random half of its
    # examples; a hard task on the same images (Gaussian input noise, std 0.6: test accuracy about 0.55) and few
    # examples per client (5 clients, half of each held out) trained for 150 local epochs by an MLP, so the original
    # model memorises (loss-attack AUC 0.71 on seed 0, 0.77 on seed 1, against about 0.5 for retraining).
    "memorization": {
        "backdoor": False,
        "forget_samples": "random",
        "forget_fraction": 0.5,
        "num_clients": 5,
        "heldout_fraction": 0.5,
        "input_noise": 0.6,
        "model": "mlp",
        "rounds": 30,
        "local_epochs": 5,
        "lr": 0.05,
        "momentum": 0.9,
        "mia_attacks": ("loss", "shadow", "lira"),
    },
}


def normalise_key(key: str) -> str:
    """'num-clients' / 'num_clients' -> 'num_clients'; unknown keys raise with the closest valid key."""
    name = key.strip().replace("-", "_")
    if name not in FIELD_NAMES:
        valid = [n.replace("_", "-") for n in FIELD_NAMES]
        close = difflib.get_close_matches(key.replace("_", "-"), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
        raise ConfigError(f"unknown configuration key {key!r}{hint}")
    return name


def _describe(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[kind]


def _plural(kind: type) -> str:
    return {bool: "booleans", int: "integers", float: "finite numbers", str: "strings"}[kind]


def _kind_error(name: str, value: Any, expected: str) -> ConfigError:
    key = name.replace("_", "-")
    return ConfigError(f"{key}={value!r}: expected {expected} (default: {_flag_text(ExperimentConfig.__dataclass_fields__[name].default)})")


def _flag_text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "empty"
    return "none" if value is None else str(value)


def _parse_scalar(name: str, kind: type, value: Any) -> Any:
    """One value of type `kind` from a command-line string or a parsed file value; anything else raises ConfigError."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.strip().lower() in ("1", "true", "yes", "on")
        raise _kind_error(name, value, "true or false")
    if kind is str:
        if isinstance(value, str):
            return value
        raise _kind_error(name, value, "a string")
    if isinstance(value, bool):  # bool is an int subclass in Python: {"num-clients": true} must not read as 1
        raise _kind_error(name, value, f"{_describe(kind)}, not a boolean")
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)  # JSON writes 3.0 for 3
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise _kind_error(name, value, "an integer")
    number: float
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _kind_error(name, value, "a number") from None
    else:
        raise _kind_error(name, value, "a number")
    if not math.isfinite(number):
        raise _kind_error(name, value, "a finite number (NaN and infinity are refused)")
    return number


def coerce(name: str, value: Any) -> Any:
    """Cast a raw value (a command-line string or a value parsed from a file) to the type of field `name`.

    Strict on purpose: a boolean is not an integer, a list item must be of the element type, a float is finite;
    what cannot be cast raises ConfigError naming the key, the value and what is expected.
    """
    kind, optional, many = FIELD_KINDS[name]
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "")):
        if optional:
            return None
        raise _kind_error(name, value, _describe(kind) if not many else f"a list of {_plural(kind)}")
    if many:
        if isinstance(value, str):
            items: list[Any] = [item.strip() for item in value.split(",") if item.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        elif kind is int and isinstance(value, int) and not isinstance(value, bool):
            items = [value]
        else:
            raise _kind_error(name, value, f"a comma-separated list or an array of {_plural(kind)}")
        parsed = []
        for item in items:
            try:
                parsed.append(_parse_scalar(name, kind, item))
            except ConfigError:
                raise _kind_error(name, value, f"a list of {_plural(kind)}; {item!r} is not one") from None
        return tuple(p.strip() for p in parsed) if kind is str else tuple(parsed)
    return _parse_scalar(name, kind, value)


def _check_types(cfg: ExperimentConfig) -> None:
    """Every field holds a value of its declared type (finite for floats): the dataclass may be built from Python too."""
    for name, (kind, optional, many) in FIELD_KINDS.items():
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        values = value if many and isinstance(value, tuple) else (value,)
        if many and not isinstance(value, tuple):
            raise _kind_error(name, value, f"a tuple of {_plural(kind)}")
        for item in values:
            ok = (
                isinstance(item, bool)
                if kind is bool
                else isinstance(item, str)
                if kind is str
                else isinstance(item, int) and not isinstance(item, bool)
                if kind is int
                else isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item)
            )
            if not ok:
                raise _kind_error(name, value, _describe(kind) if not many else f"a tuple of {_plural(kind)}")


def _field_kinds() -> dict[str, tuple[type, bool, bool]]:
    """Per field: (element type, whether None is allowed, whether it is a tuple), read from the type hints."""
    kinds: dict[str, tuple[type, bool, bool]] = {}
    for name, hint in get_type_hints(ExperimentConfig).items():
        optional, many = False, False
        if get_origin(hint) in (Union, types.UnionType):
            args = [a for a in get_args(hint) if a is not type(None)]
            optional, hint = len(args) < len(get_args(hint)), args[0]
        if get_origin(hint) is tuple:
            many, hint = True, get_args(hint)[0]
        if hint not in (bool, int, float, str):
            raise TypeError(f"ExperimentConfig.{name}: type {hint!r} has no parser")  # a new field type needs one
        kinds[name] = (hint, optional, many)
    return kinds


FIELD_KINDS = _field_kinds()
FLOAT_FIELDS = tuple(name for name, (kind, _, _) in FIELD_KINDS.items() if kind is float)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML or JSON file whose keys are the CLI flags (without '--'); any other content raises ConfigError."""
    path = Path(path)
    where = f"config file {str(path)!r}"
    if not path.exists():
        raise ConfigError(f"{where} does not exist: check --config")
    if not path.is_file():
        raise ConfigError(f"{where} is not a file (a folder?): --config takes a TOML or JSON file")
    fmt = "JSON" if path.suffix == ".json" else "TOML"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where} is not a text file (byte {err.start} is not UTF-8): --config takes a TOML or JSON file") from None
    except OSError as err:
        raise ConfigError(f"{where} cannot be read: {err.strerror}") from None
    try:
        raw = json.loads(text, parse_constant=_refuse_constant) if fmt == "JSON" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, ValueError) as err:
        raise ConfigError(f"{where} is not valid {fmt}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where} holds a {type(raw).__name__}, not a table of settings: write "
            + ('{"num-clients": 10, ...}' if fmt == "JSON" else "num-clients = 10 lines")
        )
    if "tool" in raw:  # a pyproject-style file: [tool.flwr.app.config]
        section = raw.get("tool", {}).get("flwr", {}).get("app", {}).get("config") if isinstance(raw.get("tool"), dict) else None
        if section is None:
            raise ConfigError(f"{where} has a [tool] table but no [tool.flwr.app.config]: put the settings there or at the top level")
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: [tool.flwr.app.config] is a {type(section).__name__}, not a table of settings")
        raw = section
    settings = {}
    for key, value in raw.items():
        try:
            name = normalise_key(key)
            settings[name] = coerce(name, value)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    return settings


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows (NaN and infinity are refused)")


def build_config(
    preset: str = "default", file_settings: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> ExperimentConfig:
    """Preset, then config file, then explicit overrides (the command line): later wins."""
    if preset not in PRESETS:
        close = difflib.get_close_matches(preset, PRESETS, n=1)
        raise ConfigError(f"preset={preset!r}: must be one of {', '.join(PRESETS)}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    settings: dict[str, Any] = dict(PRESETS[preset])
    for source in (file_settings or {}, overrides or {}):
        for key, value in source.items():
            name = normalise_key(key)
            settings[name] = coerce(name, value)
    return ExperimentConfig(**settings)
