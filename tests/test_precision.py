"""bfloat16 training where the hardware runs it: ``auto`` decides by the device's
capability (forced both ways here), the forward passes run in bfloat16 under
autocast while weights, losses and the uploaded features stay float32. float16
(for GPUs; it runs on this CPU too) adds a gradient scaler: a step whose scaled
gradients overflow is skipped and the scale lowered, and the scale is part of
the trainers' state."""

import pytest
import torch
from torch import nn

from flwr_fedgkt.codec import encode_features
from flwr_fedgkt.data import SampleSet
from flwr_fedgkt.edge import EdgeTrainer
from flwr_fedgkt.precision import cpuinfo_has_bfloat16, resolve_precision
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.settings import ConfigError, RunConfig
from flwr_fedgkt.store import FeatureStore
from flwr_fedgkt.validation import validate_payload

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def test_auto_is_bfloat16_only_where_the_cpu_runs_it_natively() -> None:
    assert resolve_precision("auto", CPU, cpu_check=lambda: True) == "bfloat16"
    assert resolve_precision("auto", CPU, cpu_check=lambda: False) == "float32"
    assert resolve_precision("float32", CPU, cpu_check=lambda: True) == "float32"
    assert resolve_precision("bfloat16", CPU, cpu_check=lambda: False) == "bfloat16"
    assert resolve_precision("float16", CPU, cpu_check=lambda: True) == "float16"
    with pytest.raises(ValueError, match="half"):
        resolve_precision("half", CPU)


def test_the_cpu_flags_decide() -> None:
    avx512 = "processor : 0\nflags\t\t: fpu sse avx512f avx512bw avx512_vnni\n"
    assert not cpuinfo_has_bfloat16(avx512)
    assert cpuinfo_has_bfloat16(avx512.replace("avx512_vnni", "avx512_vnni avx512_bf16"))
    assert cpuinfo_has_bfloat16("flags : fpu amx_bf16 amx_tile\n")
    assert not cpuinfo_has_bfloat16("model name : no flags here\n")


def test_the_run_config_names_a_bad_precision() -> None:
    assert RunConfig.from_mapping({}).precision == "auto"
    with pytest.raises(ConfigError, match="precision"):
        RunConfig.from_mapping({"precision": "half"})


def _conv_dtypes(model: nn.Module) -> list[torch.dtype]:
    """Records the output dtype of every convolution the model runs."""
    seen: list[torch.dtype] = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def _store() -> FeatureStore:
    gen = torch.Generator().manual_seed(0)
    features = torch.relu(torch.randn(12, 16, 8, 8, generator=gen))
    arrays = encode_features(features, "float32").arrays()
    arrays.update(
        logits=torch.randn(12, 10, generator=gen).numpy(),
        labels=(torch.arange(12) % 10).numpy(),
        ids=torch.arange(12).numpy(),
    )
    store = FeatureStore()
    store.put("a", validate_payload(arrays, "float32", (16, 8, 8), 10), 1)
    return store


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_the_server_trains_in_its_precision_with_float32_weights(precision) -> None:
    # Prepare
    trainer = ServerTrainer(10, batch_size=6, device="cpu", precision=precision)
    if precision == "float16":  # a scale that does not overflow: no step skipped
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    seen = _conv_dtypes(trainer.model)
    # Execute
    result = trainer.train(_store(), epochs=1)
    logits = trainer.predict(torch.rand(3, 16, 8, 8))
    # Assert: the convolutions ran in the precision; weights and outputs are float32
    assert set(seen) == {getattr(torch, precision)}
    assert result.samples == 12 and result.skipped_steps == 0
    assert torch.isfinite(torch.tensor(result.loss))
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_the_edge_trains_in_its_precision_and_extracts_in_float32(precision) -> None:
    # Prepare
    gen = torch.Generator().manual_seed(1)
    data = SampleSet(torch.randn(8, 3, 8, 8, generator=gen), torch.arange(8) % 10, torch.arange(8))
    trainer = EdgeTrainer(10, device="cpu", seed=0, precision=precision)
    trainer.train(data, epochs=1, batch_size=4)  # its first batch probes the layout once
    seen = _conv_dtypes(trainer.model)
    # Execute
    metrics = trainer.train(data, epochs=1, batch_size=4)
    trained = set(seen)
    seen.clear()
    extracted = trainer.extract(data)
    # Assert: training ran in the precision, extraction in float32, exactly the
    # model's float32 features
    assert trained == {getattr(torch, precision)} and set(seen) == {torch.float32}
    assert metrics["train_loss"] > 0
    with torch.no_grad():
        logits, features = trainer.model.eval()(data.images)
    assert torch.equal(extracted.features, features) and torch.equal(extracted.logits, logits)


def test_the_round_log_counts_the_precisions_nodes_trained_in() -> None:
    # Prepare: three training replies; the third names a precision there is not
    from flwr_fedgkt.local import LocalReply
    from flwr_fedgkt.rounds import RoundEngine

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    engine = RoundEngine(model, feature_shape=(4,), feature_dtype="float32")
    engine.begin_round(1)

    def reply(node: int, precision: str) -> LocalReply:
        ids = torch.arange(5) + 10 * node
        arrays = encode_features(torch.rand(5, 4), "float32").arrays()
        arrays.update(logits=torch.zeros(5, 3).numpy(), labels=(ids % 3).numpy(), ids=ids.numpy())
        meta = {"server-round": 1, "feature-dtype": "float32", "node-key": str(node)}
        return LocalReply(node, ({**meta, "precision": precision}, arrays, {"num-examples": 5}))

    # Execute
    accepted = [
        engine.accept(reply(n, p), 1, training=True)
        for n, p in ((1, "bfloat16"), (2, "bfloat16"), (3, "float64"))
    ]
    # Assert
    assert all(a is not None for a in accepted)
    assert engine.current.edge_precision == {"bfloat16": 2}


def test_float16_skips_a_step_whose_scaled_gradients_overflow_and_lowers_the_scale() -> None:
    # Prepare: a loss scale of 2^40 overflows float16 gradients (max 65504)
    trainer = ServerTrainer(10, batch_size=6, device="cpu", precision="float16")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    # Execute: one epoch of 12 samples = 2 steps, both overflowing
    result = trainer.train(_store(), epochs=1)
    # Assert: no step taken, nobody blamed (the features are fine in float32), the
    # scale halved once per skipped step (GradScaler's backoff factor 0.5)
    assert result.skipped_steps == 2 and result.excluded == {}
    assert trainer.scaler.get_scale() == 2.0**38
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_float16_scale_is_saved_with_the_trainers() -> None:
    # Prepare
    server = ServerTrainer(10, batch_size=6, device="cpu", precision="float16")
    server.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    server.train(_store(), epochs=1)  # two overflowing steps: 2^38
    edge = EdgeTrainer(10, device="cpu", seed=0, precision="float16")
    edge.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    gen = torch.Generator().manual_seed(1)
    data = SampleSet(torch.randn(8, 3, 8, 8, generator=gen), torch.arange(8) % 10, torch.arange(8))
    edge.train(data, epochs=1, batch_size=4)  # two steps
    # Execute
    server_copy = ServerTrainer(10, batch_size=6, device="cpu", precision="float16")
    server_copy.load_state_dict(server.state_dict())
    edge_copy = EdgeTrainer(10, device="cpu", seed=0, precision="float16")
    edge_copy.load_state_bytes(edge.state_bytes())
    # Assert: the scales come back (not the fresh default of 2^16)
    assert server_copy.scaler.get_scale() == 2.0**38
    assert edge_copy.scaler.get_scale() == edge.scaler.get_scale() == 2.0**38
