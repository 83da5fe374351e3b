"""pytorch_fedavg: A Flower / PyTorch app.

Flower's quickstart-pytorch ServerApp (FedAvg on Net, ``global_evaluate`` on the
server's test set) with three additions that its FedGKT twin has too: the global
Net is built from the run config's ``seed``, each round's global evaluation goes
to ``results.json`` and the final Net to ``final_model.pt``, both in ``output-dir``.
"""

from functools import partial

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from pytorch_fedavg.task import Net, RunResults, load_centralized_dataset, seeded, test

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""

    # Read run config
    fraction_evaluate: float = context.run_config["fraction-evaluate"]
    num_rounds: int = context.run_config["num-server-rounds"]
    lr: float = context.run_config["learning-rate"]
    dataset = str(context.run_config["dataset"])

    # Load global model
    global_model = seeded(Net, int(context.run_config["seed"]))
    arrays = ArrayRecord(global_model.state_dict())

    # Initialize FedAvg strategy
    strategy = FedAvg(fraction_evaluate=fraction_evaluate)
    results = RunResults(dict(context.run_config))

    # Start strategy, run FedAvg for `num_rounds`
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
        evaluate_fn=results.track(partial(global_evaluate, dataset=dataset)),
    )

    # Save final model to disk
    print("\nSaving final model to disk...")
    results.save_model(result.arrays.to_torch_state_dict())
    print(f"Results and final model: {results.output_dir}")


def global_evaluate(
    server_round: int, arrays: ArrayRecord, dataset: str = "digits"
) -> MetricRecord:
    """Evaluate model on central data."""

    # Load the model and initialize it with the received weights
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model.to(device)

    # Load entire test set
    test_dataloader = load_centralized_dataset(dataset)

    # Evaluate the global model on the test set
    test_loss, test_acc = test(model, test_dataloader, device)

    # Return the evaluation metrics
    return MetricRecord({"accuracy": test_acc, "loss": test_loss})
