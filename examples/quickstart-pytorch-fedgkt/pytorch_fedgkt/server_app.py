"""pytorch_fedgkt: A Flower / PyTorch app, trained with FedGKT.

Flower's quickstart ServerApp averages the nodes' Nets with FedAvg. Here no
weights are averaged: ``FedGKT`` trains the server part of Net on the features
that the nodes upload, with cross-entropy plus distillation from the nodes'
logits, and sends each node the server's logits for its own images.

With ``shared-extractor = true`` (the default) every node keeps the same frozen
extractor, so the server holds a whole Net (that extractor, then the server
part): ``global_evaluate`` scores it on the server's test set, as the quickstart
scores the global Net, and it is saved as ``final_model.pt``. With ``false``,
each node trains its own extractor; the server's model is the server part alone,
there is no global evaluation, and ``final_model.pt`` is the server part.
``results.json`` (``output-dir``) holds one record per round.
"""

from functools import partial

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from flwr_fedgkt import FedGKT
from pytorch_fedgkt.pair import deployable_model, net_pair
from pytorch_fedgkt.task import RunResults, load_centralized_dataset, test

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""
    run(grid, dict(context.run_config))


def run(grid: Grid, run_config: dict, evaluate_fn=None) -> Result:
    """Run FedGKT for ``num-server-rounds`` rounds; write ``results.json`` and
    ``final_model.pt``. ``evaluate_fn`` replaces ``global_evaluate`` (e.g. to
    score a node's own extractor with the server part when the nodes train their
    own)."""

    # Read run config
    fraction_evaluate = float(run_config["fraction-evaluate"])
    num_rounds = int(run_config["num-server-rounds"])
    lr = float(run_config["learning-rate"])
    seed = int(run_config["seed"])
    shared = bool(run_config["shared-extractor"])
    dataset = str(run_config["dataset"])

    # Cut the global model in two: the nodes hold the extractor, the server the rest
    pair = net_pair(seed)

    # Initialize FedGKT strategy (the server part trains with the package's
    # defaults: Adam at 3e-3 with a cosine decay over the run, 1 epoch per round)
    strategy = FedGKT(
        pair.server,
        feature_shape=pair.feature_shape,
        # shared: the nodes' one extractor; it makes the run's model a whole Net
        extractor=pair.edge.extractor if shared else None,
        freeze_extractor=shared,  # the server keeps each node's first features
        fraction_evaluate=fraction_evaluate,
        seed=seed,
    )
    if evaluate_fn is None and shared:
        evaluate_fn = partial(global_evaluate, dataset=dataset)
    results = RunResults(run_config, extra=partial(round_record, strategy))

    # Start strategy, run FedGKT for `num_rounds`
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(),  # nothing to send: each node keeps its own edge model
        train_config=ConfigRecord({"client-lr": lr}),
        num_rounds=num_rounds,
        evaluate_fn=results.track(evaluate_fn),
    )

    # Save final model to disk: the whole Net (shared), else the server part
    print("\nSaving final model to disk...")
    results.save_model(result.arrays.to_torch_state_dict())
    print(f"Results and final model: {results.output_dir}")
    return result


def round_record(strategy: FedGKT, server_round: int) -> dict:
    """FedGKT's own record of the round (accuracy of the server part on the nodes'
    test features, the edge models' accuracy, bytes up and down, ...)."""
    return next((r for r in strategy.history if r["round"] == server_round), {})


def global_evaluate(
    server_round: int, arrays: ArrayRecord, dataset: str = "digits"
) -> MetricRecord:
    """Evaluate the whole Net (shared extractor, then server part) on central data."""

    # Load the model and initialize it with the received weights
    model = deployable_model(net_pair(0))
    model.load_state_dict(arrays.to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model.to(device)

    # Load entire test set
    test_dataloader = load_centralized_dataset(dataset)

    # Evaluate the global model on the test set
    test_loss, test_acc = test(model, test_dataloader, device)

    # Return the evaluation metrics
    return MetricRecord({"accuracy": test_acc, "loss": test_loss})
