"""The README's "strategy in your own ServerApp" code runs as written: its
ServerApp's main, fed replies of 1-D features by two scripted nodes."""

import re

import numpy as np
import torch
from conftest import make_message
from flower_processes import REPO
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from flwr_fedgkt import encode_features
from flwr_fedgkt.records import FEATURES_KEY, META_KEY, METRICS_KEY, arrays_record

WIDTH, CLASSES = 64, 10
NODES = {1: np.arange(0, 30), 2: np.arange(100, 124)}


class ScriptedGrid:
    """Two nodes that answer every instruction with features of their own samples."""

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            config = msg.content.config_records["config"]
            training = msg.metadata.message_type == MessageType.TRAIN
            ids = NODES[node] + (0 if training else 1000)
            gen = torch.Generator().manual_seed(node)
            labels = ids % CLASSES
            features = (
                torch.randn(len(ids), WIDTH, generator=gen) + torch.from_numpy(labels)[:, None]
            )
            arrays = encode_features(features, config["feature-dtype"]).arrays()
            arrays.update(labels=labels.astype(np.int64), ids=ids.astype(np.int64))
            if training:
                arrays["logits"] = torch.randn(len(ids), CLASSES, generator=gen).numpy()
            content = RecordDict(
                {
                    FEATURES_KEY: arrays_record(arrays),
                    METRICS_KEY: MetricRecord({"num-examples": len(ids)}),
                    META_KEY: ConfigRecord(
                        {
                            "server-round": config["server-round"],
                            "feature-dtype": config["feature-dtype"],
                            "node-key": f"node-{node}",
                        }
                    ),
                }
            )
            reply = make_message(content, node, 0, msg.metadata.message_type)
            replies.append(reply)
        return replies


def test_the_readme_server_app_trains_and_saves_the_final_model(
    task_identity, tmp_path, monkeypatch
) -> None:
    # Prepare: the README's code block, as written
    readme = (REPO / "README.md").read_text()
    section = readme.split("## The strategy in your own ServerApp", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    monkeypatch.chdir(tmp_path)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    # Execute
    namespace["main"](ScriptedGrid(), context)
    # Assert: five rounds trained a model that loads back into the README's model
    saved = torch.load(tmp_path / "final_model.pt", weights_only=True)
    assert set(saved) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert saved["2.weight"].shape == (CLASSES, 128)
