"""FedGKT rounds in one process, without Flower.

The same core calls the Flower apps make (edge training and extraction per
partition, the wire codec and its validation, server training, server logits),
with no transport in between. Used to check that the Flower layer adds nothing
but transport, and as the baseline of the overhead benchmark.

This module imports no Flower code.
"""

from __future__ import annotations

import time
from typing import Any

from .config import RunConfig
from .data import load_partition
from .edge import EdgeTrainer, LogitTable, edge_generator
from .features import FeatureStore, decode_features, encode_features, validate_payload
from .models import FEATURE_CHANNELS
from .server import ServerTrainer

__all__ = ["run_local"]


def run_local(
    config: RunConfig, num_partitions: int, verbose: bool = False
) -> list[dict[str, Any]]:
    """Run ``config.num_server_rounds`` FedGKT rounds over ``num_partitions`` nodes
    with full participation; return one record per round."""
    partitions = [
        load_partition(
            config.dataset,
            i,
            num_partitions,
            config.partitioner,
            config.dirichlet_alpha,
            config.seed,
            classes_per_partition=config.classes_per_partition,
            min_partition_size=config.min_partition_size,
            data_dir=config.data_dir,
        )
        for i in range(num_partitions)
    ]
    num_classes = partitions[0].num_classes
    edges = [
        EdgeTrainer(
            num_classes,
            lr=config.client_lr,
            device=config.device,
            seed=config.seed + i,
            freeze_extractor=config.freeze_extractor,
        )
        for i in range(num_partitions)
    ]
    server = ServerTrainer.from_run_config(config, num_classes)
    store = FeatureStore()
    teachers: dict[int, LogitTable] = {}
    shape = (FEATURE_CHANNELS, 32, 32)
    history = []
    for server_round in range(1, config.num_server_rounds + 1):
        start = time.perf_counter()
        for i, (edge, part) in enumerate(zip(edges, partitions, strict=True)):
            edge.train(
                part.train,
                epochs=config.client_epochs,
                batch_size=config.batch_size,
                teacher=teachers.get(i),
                temperature=config.temperature,
                alpha=config.alpha,
                generator=edge_generator(config.seed, i, server_round),
            )
            ex = edge.extract(part.train)
            arrays = encode_features(ex.features, config.feature_dtype).arrays()
            arrays.update(logits=ex.logits.numpy(), labels=ex.labels.numpy(), ids=ex.ids.numpy())
            payload = validate_payload(arrays, config.feature_dtype, shape, num_classes)
            store.put(str(i), payload, server_round)
        result = server.train(store, config.server_epochs)
        for i in range(num_partitions):
            teachers[i] = LogitTable(*server.logits_for(store, str(i)))
        correct = edge_correct = total = 0.0
        for edge, part in zip(edges, partitions, strict=True):
            ex = edge.extract(part.test)
            feats = decode_features(encode_features(ex.features, config.feature_dtype))
            scores = server.evaluate(feats, ex.labels)
            n = len(part.test)
            correct += scores["accuracy"] * n
            edge_correct += EdgeTrainer.score(ex.logits, ex.labels)["accuracy"] * n
            total += n
        record = {
            "round": server_round,
            "accuracy": correct / total,
            "edge_accuracy": edge_correct / total,
            "server_train_seconds": result.seconds,
            "seconds": time.perf_counter() - start,
        }
        if verbose:
            print(record, flush=True)
        history.append(record)
    return history
