"""Every option of FedGKT, written once: its name, its one default and its one
line of documentation.

:class:`Settings` is the run config (``[tool.flwr.app.config]`` in
``pyproject.toml`` plus ``--run-config`` overrides, kebab-case keys) as a typed,
frozen, validated object, and the source of the defaults of every layer: the
strategies (:class:`~flwr_fedgkt.strategy.FedGKT`, the legacy
:class:`~flwr_fedgkt.legacy.LegacyFedGKT`), :class:`~flwr_fedgkt.client.FedGKTClient`,
:class:`~flwr_fedgkt.server.ServerTrainer` and the built-in apps take their
defaults from :data:`DEFAULTS`, and the documentation's option table is
:func:`option_table` (a test checks all of them against this class).
:meth:`Settings.from_mapping` is the one place a run config maps onto it.

This module imports no Flower code.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .codec import FEATURE_DTYPES
from .compression import COMPRESSIONS
from .data import DATASET_NAMES, PARTITIONERS
from .models import COMPACT, EDGE_MODEL, MAX_EDGE_STAGES, SERVER_MODELS, staged_names
from .precision import PRECISIONS
from .privacy import Defences
from .validation.payload import MAX_FEATURE_ABS, MAX_LOGIT_ABS

__all__ = ["DEFAULTS", "ConfigError", "RunConfig", "Settings", "boolean", "option_table"]


SCHEDULES = ("sync", "pipeline", "async")
"""The values of ``mode``."""


class ConfigError(ValueError):
    """A run-config value is missing or invalid."""


def boolean(raw: Any) -> bool:
    """A TOML boolean, or its spelling as text (``true``/``false``, ``1``/``0``,
    ``yes``/``no``); ValueError for anything else (``bool("false")`` is True)."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(raw)


def option(default: Any, doc: str) -> Any:
    """A settings field: its default and its one line of documentation."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class Settings:
    """All options, with their defaults (the attribute names are the run-config
    keys with ``-`` replaced by ``_``); ``Settings.doc(key)`` documents each."""

    num_server_rounds: int = option(8, "FedGKT rounds")
    fraction_train: float = option(1.0, "fraction of nodes sampled for training each round")
    fraction_evaluate: float = option(1.0, "fraction of nodes sampled for evaluation")
    min_train_nodes: int = option(2, "minimum nodes sampled for training")
    min_evaluate_nodes: int = option(2, "minimum nodes sampled for evaluation")
    min_available_nodes: int = option(2, "nodes that must be connected before a round starts")
    dataset: str = option(
        "digits",
        "`digits` (offline, ships with scikit-learn), `cifar10`, `cifar100`, `cinic10`, or "
        "`synthetic` (tests)",
    )
    partitioner: str = option(
        "iid", "`iid`, `dirichlet` or `pathological` (flwr-datasets partitioners)"
    )
    dirichlet_alpha: float = option(
        0.5, "concentration of the Dirichlet partitioner (smaller: more skewed)"
    )
    classes_per_partition: int = option(2, "classes per node of the pathological partitioner")
    min_partition_size: int = option(
        10, "smallest node partition the Dirichlet partitioner accepts (it redraws otherwise)"
    )
    data_dir: str = option(
        "",
        "absolute path of a local copy of `cifar10` / `cifar100` / `cinic10`; read with no "
        "network access. Empty: the Hugging Face Hub",
    )
    synthetic_samples_per_node: int = option(
        0,
        "size of the `synthetic` data set: this many samples per partition (`num-supernodes` "
        "times as many in all), so that any number of nodes gets real partitions; 0: 600 in "
        "all. Other data sets have their own size",
    )
    batch_size: int = option(32, "edge training batch size")
    server_batch_size: int = option(64, "server training batch size")
    client_epochs: int = option(1, "edge epochs per round")
    server_epochs: int = option(1, "server epochs per round over all stored features")
    client_lr: float = option(
        0.001,
        "edge Adam learning rate (weight decay 5e-4); the reference implementation's Adam rate",
    )
    server_lr: float = option(
        0.003,
        "server Adam learning rate, cosine decay to 5 % over `num-server-rounds` x `server-epochs`",
    )
    server_average: float = option(
        -1.0,
        "in (0, 1): the server logits, the scores and the final model come from a moving "
        "average of the server model's weights, of which this fraction remains after one "
        "server epoch (updated every step); 0: from the model as trained; -1: the schedule's "
        "default, 0.5 in `async` and 0 in rounds",
    )
    temperature: float = option(3.0, "KD temperature T")
    alpha: float = option(1.0, "KD weight: loss = CE + alpha * T^2 * KL")
    feature_dtype: str = option(
        "int8",
        "features on the wire and at rest: `float32`, `float16`, `bfloat16`, `int8` (8-bit "
        "affine per channel: 4x fewer bytes than float32, see Performance)",
    )
    server_model: str = option("resnet55", "`resnet55` or `resnet109`")
    seed: int = option(
        42,
        "seeds the image data sets' order before partitioning, the `dirichlet` and "
        "`pathological` partitions, the 80/20 splits, model initialisation, shuffling and node "
        "sampling (the same node ids are sampled alike in every run); `digits`' IID shards "
        "are in file order, the same for every seed",
    )
    output_dir: str = option("", "absolute path where the server writes `results.json`")
    device: str = option(
        "auto", "`auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:1`, ..."
    )
    precision: str = option(
        "auto",
        "training precision of the server (training, server logits, scores) and of each "
        "node's edge training: `float32`, `bfloat16` (autocast, float32 weights; losses, KD "
        "softmaxes and the uploaded features in float32), `float16` (the same with a gradient"
        " scaler, for GPUs without bfloat16) or `auto` (bfloat16 where the process's own "
        "hardware runs it natively: a CPU with AVX512-BF16 or AMX, a CUDA GPU with bfloat16; "
        "float32 elsewhere; never float16). See [Performance](#performance)",
    )
    torch_threads: int = option(
        0,
        "torch's CPU threads in each process: 0 takes them from the process's resources (its "
        "CPU affinity and quota, a simulated ClientApp's `num-cpus`) and leaves the CPUs that "
        "other processes keep busy (results then repeat bit for bit only on a CPU not shared; "
        "`server_threads` in results.json says what the server used); a count fixes them. See "
        "[Performance](#performance)",
    )
    round_timeout: float = option(3600.0, "seconds the server waits for replies in a round")
    max_reply_bytes: int = option(0, "replies larger than this are rejected (0: no limit)")
    max_staleness: int = option(
        -1,
        "train on features of nodes seen within this many rounds (`async`: server epochs; -1:"
        " no limit)",
    )
    max_idle_rounds: int = option(
        3,
        "after this many rounds in a row in which no node replied usefully (every sampled "
        'node failed or was rejected), the run stops with `"status": "no-progress"` and the '
        "reasons with their counts in `results.json` (`no_progress_reasons`); 0: never stop",
    )
    feature_store: str = option(
        "memory", "`memory`, or `disk` (memory-mapped files under `output-dir`)"
    )
    freeze_extractor: bool = option(
        False,
        "keep the edge stem fixed from the start (the same as `freeze-after = 0`); each node "
        "uploads its (unchanging) features once, later rounds carry only ids and logits (the "
        "legacy-API client freezes the stem but uploads every round)",
    )
    freeze_after: int = option(
        -1,
        "train the edge stem in rounds 1 to K, keep it fixed from round K+1 on (-1: never); a"
        " node's features stop changing, so it stops sending them (see "
        "[Performance](#performance)). Not with `freeze-extractor`",
    )
    compact_features: bool = option(
        False,
        "the compact model pair: the edge stem ends in a 1x1 bottleneck to 3 channels (3 x 32"
        " x 32 features, 3 KiB per sample in int8, the raw image's size), the server model "
        "takes 3 channels",
    )
    pipeline: bool = option(
        False,
        "pipelined rounds: the server trains round t in the background while the nodes "
        "evaluate and train round t+1, which distils from server logits one round older; see "
        "[Pipelined rounds, GPUs, more than one "
        "machine](#pipelined-rounds-gpus-more-than-one-machine). Message API only",
    )
    mode: str = option(
        "sync",
        "the schedule: `sync` (rounds), `pipeline` (the same as `pipeline = true`, which turns "
        "the default `sync` into `pipeline` and is an error beside `async`) or `async` "
        "(no rounds: every connected node gets its next instruction as soon as its reply is "
        "in, and the server trains on what it holds without pause; see [Asynchronous "
        "training](#asynchronous-training)). Message API only",
    )
    max_logit_age: int = option(
        4,
        "`async`: a reply computed against server logits more than this many server epochs "
        "old is still stored but flagged (counted in `staleness.flagged`, logged); -1: never",
    )
    time_budget: float = option(
        0.0,
        "`async`: seconds after which the run ends even before `num-server-rounds` x "
        "`server-epochs` server epochs (checked between epochs); 0: no limit",
    )
    eval_every: int = option(
        1, "`async`: score the server model and write a record every this many server epochs"
    )
    checkpoint_every: int = option(
        1,
        "`async`: write a checkpoint every this many server epochs (rounds write one every round)",
    )
    compression: str = option(
        "zstd",
        "lossless compression of the uploaded feature bytes: `zstd` (about 2x on int8 edge "
        "features) or `none`. The round's config names the codec; a reply may use it or "
        "`none` (ClientApps that do not compress, such as the legacy-API client, still work);"
        " the server bounds a frame's size before inflating it",
    )
    shared_extractor_init: bool = option(
        False,
        "every node's edge model starts from `seed` (not `seed + partition-id`); with "
        "`freeze-extractor` all nodes share one extractor and the run also saves "
        "`deployable_model.pt` (extractor + server model)",
    )
    max_feature_abs: float = option(
        MAX_FEATURE_ABS,
        "absolute bound: replies whose decoded features exceed this magnitude are rejected; "
        "features far above the other nodes' are rejected whatever this bound (see [What "
        "one node can and cannot do](#what-one-node-can-and-cannot-do))",
    )
    max_logit_abs: float = option(
        MAX_LOGIT_ABS,
        "replies whose edge logits exceed this magnitude are rejected (honest edges stay "
        "below 100)",
    )
    query_timeout: float = option(
        300.0,
        "seconds the server waits for new nodes to say their key (a `query` Message), before "
        "the first round in which they are sampled; at most `round-timeout` is waited",
    )
    resume_from: str = option(
        "",
        "a previous `output-dir`: continue after its newest readable checkpoint (Message-API "
        "ServerApp; the legacy-API one refuses it)",
    )
    client_state_dir: str = option(
        "", "where each node also keeps its edge state on disk (needed to resume)"
    )
    slow_partitions: str = option(
        "",
        "simulated stragglers: comma-separated partition ids whose nodes train `slowdown` "
        "times as long (built-in ClientApp and FedAvg baseline)",
    )
    slowdown: float = option(
        1.0,
        "how many times as long a slow node's training takes: after training it waits "
        "(slowdown - 1) x its training time, using no CPU; a node's `--node-config "
        "slowdown=...` overrides it for that node",
    )
    edge_stages: int = option(
        0,
        "how many stages of the server model's network stay on the edge: 0 (the stem, as in "
        "the paper), 1 or 2 (features further from the pixels, at more edge FLOPs; built-in "
        "models only, not with `compact-features`)",
    )
    feature_noise: float = option(
        0.0,
        "Gaussian noise on every uploaded feature map, its standard deviation a multiple of "
        "`feature-clip` (the noise multiplier; needs `feature-clip`); see [Security: what "
        "leaves a client](#security-what-leaves-a-client)",
    )
    feature_clip: float = option(
        0.0, "each uploaded sample's feature map scaled down to this L2 norm (0: not clipped)"
    )
    label_epsilon: float = option(
        0.0,
        "labels sent through randomized response with this epsilon (0: sent as they are; "
        "the server's loss and accuracy account for the flips)",
    )
    nopeek_weight: float = option(
        0.0,
        "weight of the distance correlation between images and features in the edge's "
        "loss (NoPeek; 0: off)",
    )

    privacy: str = option(
        "none",
        "a named set of defences: `none` or `recommended` (`feature-clip` 50, "
        "`feature-noise` 0.005, `label-epsilon` 4; the clip fits the built-in stem's "
        "features); the four keys above can raise it, never lower it",
    )

    @property
    def defences(self) -> Defences:
        """The privacy defences these settings ask for (:mod:`flwr_fedgkt.privacy`):
        the four defence keys, raised to the ``privacy`` preset where it asks for more."""
        return Defences.over_preset(
            self.privacy,
            self.feature_noise,
            self.feature_clip,
            self.label_epsilon,
            self.nopeek_weight,
        )

    @property
    def schedule(self) -> str:
        """The schedule the run asks for: ``sync``, ``pipeline`` or ``async``
        (``pipeline = true`` is ``pipeline``)."""
        return "pipeline" if self.pipeline else self.mode

    @property
    def slow_partition_ids(self) -> frozenset[int]:
        """The partition ids of ``slow-partitions``."""
        return frozenset(int(part) for part in self.slow_partitions.split(",") if part.strip())

    @property
    def edge_model_name(self) -> str:
        """The built-in edge model: ``resnet8``, or ``resnet8-compact`` with
        ``compact-features``."""
        if self.edge_stages:
            return staged_names(self.server_model, self.edge_stages)[0]
        return EDGE_MODEL + (COMPACT if self.compact_features else "")

    @property
    def server_model_name(self) -> str:
        """The built-in server model: ``server-model``, with ``-compact`` for
        ``compact-features``."""
        if self.edge_stages:
            return staged_names(self.server_model, self.edge_stages)[1]
        return self.server_model + (COMPACT if self.compact_features else "")

    @classmethod
    def doc(cls, key: str) -> str:
        """The one line of documentation of option ``key`` (kebab- or snake-case)."""
        name = key.replace("-", "_")
        for f in fields(cls):
            if f.name == name:
                return str(f.metadata["doc"])
        raise KeyError(key)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], strict: bool = False) -> Settings:
        """Build from run-config keys; unknown keys are ignored unless ``strict``."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        if strict:
            unknown = sorted(set(mapping) - set(known))
            if unknown:
                raise ConfigError(f"unknown run-config keys: {', '.join(unknown)}")
        values: dict[str, Any] = {}
        defaults = cls()
        for key, f in known.items():
            if key not in mapping:
                continue
            raw = mapping[key]
            default = getattr(defaults, f.name)
            try:
                if isinstance(default, bool):
                    value: Any = boolean(raw)
                elif isinstance(default, int):
                    if isinstance(raw, float) and not raw.is_integer():
                        raise ValueError
                    value = int(raw)
                elif isinstance(default, float):
                    value = float(raw)
                else:
                    value = str(raw)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"run-config {key!r} = {raw!r} is not a valid {type(default).__name__}"
                ) from None
            values[f.name] = value
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case keys, as in ``pyproject.toml``."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> None:
        def fail(key: str, why: str) -> None:
            raise ConfigError(
                f"run-config {key!r} = {getattr(self, key.replace('-', '_'))!r}: {why}"
            )

        if self.num_server_rounds < 1:
            fail("num-server-rounds", "must be at least 1")
        for key in ("fraction-train", "fraction-evaluate"):
            if not 0.0 <= getattr(self, key.replace("-", "_")) <= 1.0:
                fail(key, "must lie in [0, 1]")
        for key in ("batch-size", "server-batch-size"):
            if getattr(self, key.replace("-", "_")) < 2:
                fail(key, "must be at least 2")
        for key in (
            "client-epochs",
            "server-epochs",
            "min-train-nodes",
            "min-evaluate-nodes",
            "min-available-nodes",
        ):
            if getattr(self, key.replace("-", "_")) < 0:
                fail(key, "must not be negative")
        for key in ("client-lr", "server-lr", "temperature", "dirichlet-alpha", "round-timeout"):
            if getattr(self, key.replace("-", "_")) <= 0:
                fail(key, "must be positive")
        if self.alpha < 0:
            fail("alpha", "must not be negative")
        if self.feature_dtype not in FEATURE_DTYPES:
            fail("feature-dtype", f"expected one of {', '.join(FEATURE_DTYPES)}")
        if self.server_model not in SERVER_MODELS:
            fail("server-model", f"expected one of {', '.join(SERVER_MODELS)}")
        parts = [part.strip() for part in self.slow_partitions.split(",") if part.strip()]
        if not all(part.isdecimal() for part in parts):
            fail("slow-partitions", "expected comma-separated partition ids, e.g. '0,1'")
        if not self.slowdown >= 1.0 or self.slowdown > 1e4:
            fail("slowdown", "must be at least 1 (1: not slowed) and at most 10000")
        if self.torch_threads < 0:
            fail("torch-threads", "must be 0 (from the process's resources) or a thread count")
        if self.max_reply_bytes < 0:
            fail("max-reply-bytes", "must not be negative (0: no limit)")
        if not self.max_feature_abs > 0:
            fail("max-feature-abs", "must be positive")
        if not self.max_logit_abs > 0:
            fail("max-logit-abs", "must be positive")
        if not self.query_timeout > 0:
            fail("query-timeout", "must be positive")
        if self.max_idle_rounds < 0:
            fail("max-idle-rounds", "must not be negative (0: never stop)")
        if self.max_staleness < -1:
            fail("max-staleness", "must be -1 (no limit) or a number of rounds")
        if self.mode not in SCHEDULES:
            fail("mode", f"expected one of {', '.join(SCHEDULES)}")
        if self.pipeline and self.mode not in ("sync", "pipeline"):
            fail("mode", "but 'pipeline' = true asks for mode 'pipeline': set one of them")
        if not (0 <= self.server_average < 1 or self.server_average == -1):
            fail("server-average", "must be in [0, 1) (0: no average) or -1 (the schedule's)")
        if self.max_logit_age < -1:
            fail("max-logit-age", "must be -1 (never flag) or a number of server epochs")
        if not 0 <= self.time_budget < 1e9:
            fail("time-budget", "must be 0 (no limit) or a number of seconds")
        for key in ("eval-every", "checkpoint-every"):
            if getattr(self, key.replace("-", "_")) < 1:
                fail(key, "must be at least 1")
        if self.precision not in PRECISIONS:
            fail("precision", f"expected one of {', '.join(PRECISIONS)}")
        if self.compression not in COMPRESSIONS:
            fail("compression", f"expected one of {', '.join(COMPRESSIONS)}")
        if self.freeze_after < -1:
            fail("freeze-after", "must be -1 (never) or a number of rounds")
        if self.freeze_extractor and self.freeze_after >= 0:
            fail(
                "freeze-after",
                "set freeze-after or freeze-extractor (frozen from the start, i.e. "
                "freeze-after = 0), not both",
            )
        if self.feature_store not in ("memory", "disk"):
            fail("feature-store", "expected memory or disk")
        if self.dataset not in DATASET_NAMES:
            fail("dataset", f"expected one of {', '.join(DATASET_NAMES)}")
        if self.partitioner not in PARTITIONERS:
            fail("partitioner", f"expected one of {', '.join(PARTITIONERS)}")
        if self.classes_per_partition < 1:
            fail("classes-per-partition", "must be at least 1")
        if self.synthetic_samples_per_node < 0 or self.synthetic_samples_per_node == 1:
            fail(
                "synthetic-samples-per-node",
                "must be 0 (600 samples in all) or at least 2 (one to train, one to test)",
            )
        if self.min_partition_size < 0:
            fail("min-partition-size", "must not be negative")
        if not 0 <= self.edge_stages <= MAX_EDGE_STAGES:
            fail("edge-stages", f"must lie in [0, {MAX_EDGE_STAGES}]")
        if self.edge_stages and self.compact_features:
            fail("edge-stages", "the compact models keep the stem only: not with compact-features")
        try:
            self.defences  # noqa: B018  (its checks name a bad value)
        except ValueError as err:
            raise ConfigError(f"run-config {err}") from None
        if self.data_dir and not os.path.isabs(os.path.expanduser(self.data_dir)):
            fail("data-dir", "must be an absolute path (apps may run in other directories)")


RunConfig = Settings
"""The run config: the same type as :class:`Settings`."""

DEFAULTS = Settings()
"""Every option at its default: what every layer's defaults are taken from."""


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return repr(value)


def option_table() -> str:
    """The documentation's option table (markdown): key, default, meaning."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for f in fields(Settings):
        key = f.name.replace("_", "-")
        lines.append(f"| `{key}` | {_cell(f.default)} | {f.metadata['doc']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(option_table())
