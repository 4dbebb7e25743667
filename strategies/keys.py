"""Message types, record names and config keys shared by the server strategies and the ClientApp."""

# Message types (Flower: "train", "evaluate" or "query.<name>")
TRAIN = "train"
EVALUATE = "evaluate"
QUERY_INFO = "query.info"
QUERY_GRADIENT = "query.gradient"
QUERY_PGA = "query.pga"  # PGA: client u's projected gradient ascent around w_ref
QUERY_IMU = "query.imu"  # IMU-head: client u's influence-weighted ascent on the final layer
QUERY_CALIBRATE = "query.calibrate"  # IAU: client u chooses the step length along the direction it is sent
QUERY_COHORT = "query.cohort"  # cohort mode, server -> physical node: which cohort do you host?

# Record names inside a RecordDict
ARRAYS = "arrays"  # model parameters (server -> client, client -> server in train)
GRADIENT = "gradient"  # a gradient vector by parameter name (client -> server)
CONFIG = "config"
METRICS = "metrics"
COHORT_MANIFEST = "cohort-manifest"  # cohort mode: ConfigRecord of a packed message (which records belong to which virtual client)
COHORT_RECORD = "cohort"  # cohort mode: the ConfigRecord of the reply to query.cohort
COHORT_SUM = "cohort-sum"  # cohort partial sums: sum_k n_k w_k (float64) of a cohort's accepted training models
COHORT_SUM_INFO = "cohort-sum-info"  # cohort partial sums: which clients the sum covers, their counts, norms, metrics
COHORT_SUMMED_IN = "cohort-summed-in"  # cohort partial sums: this client's model is in the sum another client's reply carries
COHORT_REJECTED = "cohort-rejected"  # cohort partial sums: the cohort worker refused this client's model (and why)
COHORT_METER = "cohort-meter"  # cohort partial sums: the bytes and compute the client's own reply would have cost
PGA_LOCAL_MODEL = "pga-local-model"  # query.pga: client u's last local model w_u (server -> client), for the early stop

# Config keys (server -> client)
SERVER_ROUND = "server-round"
SEED = "seed"
LR = "lr"
EPOCHS = "local-epochs"
BATCH_SIZE = "batch-size"
OPTIMIZER = "optimizer"
MOMENTUM = "momentum"
GR_ALPHA = "gr-alpha"
LEDGER = "deletion-ledger"  # JSON list of DeletionRequest in force (what clients must not train on)
MODEL_VERSION = "model-version"  # content digest of the parameters sent
CACHE_FILL = "cache-fill"  # evaluate: also compute and store the gradient cache
CACHE_UPLOAD = "cache-upload"  # evaluate: also send the cache up (cached protocol)
REQUEST = "request"  # query.gradient: the DeletionRequest being served (JSON)
ROLE = "role"  # query.gradient: "remaining", "withdrawing" or "forget-only"
REMAINING_COUNT = "remaining-count"  # n - |S|
FORGET_COUNT = "forget-count"  # |S|
CORRECTION = "correction"  # query.gradient: include the remaining-data term
CORRECTION_WEIGHT = "correction-weight"  # query.gradient: lambda, the weight of the remaining-data term
DIRECTION = "direction"  # query.calibrate: the IAU direction d by parameter name (server -> client u)
RADIUS = "radius"  # query.calibrate reply: the relative step length client u chose
CALIBRATION_TRAIL = "calibration-trail"  # query.calibrate reply: JSON of the radii tried and the losses seen
ALLOW_STALE = "allow-stale"
GRADIENT_DTYPE = "gradient-dtype"  # query.gradient / caching evaluate: the dtype gradients travel in (float32 or float64)
CLIP_GRAD = "clip-grad"  # query.pga: gradient-norm clip (0 = none)
PGA_RADIUS = "pga-radius"  # query.pga: L2 radius of the ball around w_ref (<= 0: the authors' rule)
PGA_RADIUS_FRACTION = "pga-radius-fraction"  # query.pga: the rule's share of the mean squared distance to random models
PGA_RANDOM_MODELS = "pga-random-models"  # query.pga: random models the rule averages over
PGA_STOP_DISTANCE = "pga-stop-distance"  # query.pga: stop once ||w - w_u||^2 exceeds it (the authors' 2.2; <= 0: never)
IMU_DAMPING = "imu-damping"  # query.imu: added to the diagonal Fisher
IMU_QUANTILE = "imu-quantile"  # query.imu: weights are clipped at this quantile

COHORT_MANIFEST_KEY = "manifest"  # cohort mode: the manifest's JSON inside COHORT_MANIFEST
COHORT_INDEX = "cohort-index"  # cohort mode, query.cohort reply: the cohort this node hosts
COHORT_PARTITIONS = "partition-ids"  # cohort mode, query.cohort reply: the partitions it hosts
PARTIAL_SUMS = "partial-sums"  # cohort manifest of a packed train message: the worker may answer with one partial sum
SUM_PARTITIONS = "partitions"  # COHORT_SUM_INFO: the clients the sum covers, in the worker's order
SUM_COUNTS = "counts"  # COHORT_SUM_INFO: their example counts (the sum's weights)
SUM_NORMS = "update-norms"  # COHORT_SUM_INFO: their ||w_k - w_global||_2 (float64)
SUM_METRICS = "client-metrics"  # COHORT_SUM_INFO: JSON list of their metric records
SUM_CARRIER = "carrier"  # COHORT_SUMMED_IN: the partition whose reply carries the sum
REJECTED_REASON = "reason"  # COHORT_REJECTED: why the worker refused the model
WIRE_BYTES = "wire-bytes"  # COHORT_METER: bytes of the reply the client would have sent on its own

# Metric keys (client -> server)
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
NUM_TRAIN = "num-train"
NUM_HELDOUT = "num-heldout"
TRAIN_LOSS = "train-loss"
TRAIN_ACC = "train-acc"  # caching evaluate: accuracy on the kept training examples (from the cache's forward pass)
EVAL_LOSS = "eval-loss"
EVAL_ACC = "eval-acc"
COMPUTE_S = "compute-s"
CACHE_HIT = "cache-hit"
CACHE_STALE = "cache-stale"
FORGET_SIZE = "forget-size"
GRADIENT_COUNT = "gradient-count"
CACHE_BYTES = "cache-bytes"  # evaluate: bytes the client's stored gradient cache occupies
PGA_DISTANCE = "pga-distance"  # query.pga: ||w - w_ref|| at the end
PGA_MAX_DISTANCE = "pga-max-distance"
PGA_PROJECTIONS = "pga-projections"
PGA_STOPPED_EARLY = "pga-stopped-early"  # query.pga: 1 if the early stop ended the ascent, else 0
PGA_LOCAL_DISTANCE = "pga-local-distance-sq"  # query.pga: ||w - w_u||^2 at the end (nan without w_u)
STEPS = "steps"
IMU_KEPT = "imu-kept"  # query.imu: forget examples with negative influence (weight > 0)
LOSS_BEFORE = "loss-before"
LOSS_AFTER = "loss-after"

ROLE_REMAINING = "remaining"
ROLE_WITHDRAWING = "withdrawing"
ROLE_FORGET_ONLY = "forget-only"

# Secure aggregation (strategies/secagg.py): the four SecAgg+ stages as query types, and the names they use
QUERY_SECAGG_SETUP = "query.secagg_setup"  # stage 1: advertise keys (the client answers two public keys)
QUERY_SECAGG_SHARE_KEYS = "query.secagg_share_keys"  # stage 2: Shamir shares of the client's secrets, encrypted per peer
QUERY_SECAGG_COLLECT = "query.secagg_collect"  # stage 3: the inner query, answered with a masked vector
QUERY_SECAGG_UNMASK = "query.secagg_unmask"  # stage 4: shares of the survivors' seeds and the dropped clients' keys
SECAGG = "secagg"  # the record (server <-> client) holding a stage's protocol values
SECAGG_STATE = "secagg-state"  # the client's secrets between stages, in its node's context.state (never sent)
SECAGG_MASKED = "secagg-masked"  # stage 3 reply: the masked vector (uint32, one array of P + 1 field elements)
