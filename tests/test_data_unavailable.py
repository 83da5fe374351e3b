"""Without network and without a local copy, a run stops at start-up with one
clear message, before any federation starts."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import UntouchedGrid
from inprocess import server_context
from test_data_sources import accept_fake_copy, write_cifar10, write_cifar100

from flwr_fedgkt import server_app
from flwr_fedgkt.data import DataUnavailableError, describe_dataset, hub, load_partition
from flwr_fedgkt.settings import ConfigError, RunConfig

pytestmark = pytest.mark.usefixtures("fresh_data_caches")


@pytest.fixture
def no_network(monkeypatch):
    """The Hub does not answer; building a FederatedDataset would be a bug."""
    import flwr_datasets

    def unreachable(timeout: float = 0.0) -> str:
        return "[Errno -2] Name or service not known"

    def no_federated_dataset(*args, **kwargs):
        raise AssertionError("FederatedDataset built although the Hub is unreachable")

    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(hub, "reachable", unreachable)
    monkeypatch.setattr(flwr_datasets, "FederatedDataset", no_federated_dataset)


def _assert_clear(message: str, name: str, title: str) -> None:
    assert message.startswith(f"Data set {name!r} ({title}) is not available.")
    assert "Tried:" in message and "Fix:" in message
    assert "data-dir" in message and "dataset='digits'" in message
    assert "Traceback" not in message


def test_missing_local_copy_names_the_folder_and_the_fixes(tmp_path) -> None:
    # Prepare
    missing = tmp_path / "nowhere"
    # Execute
    with pytest.raises(DataUnavailableError) as caught:
        load_partition("cifar10", 0, 2, data_dir=str(missing))
    # Assert
    message = str(caught.value)
    _assert_clear(message, "cifar10", "CIFAR-10")
    assert str(missing) in message and "no such directory" in message
    assert "cifar-10-batches-py/" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_incomplete_local_copy_names_the_missing_files(tmp_path) -> None:
    # Prepare
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rows = np.zeros((2, 3072), dtype=np.uint8)
    with open(folder / "train", "wb") as handle:
        pickle.dump({"data": rows, "fine_labels": [0, 1]}, handle)
    # Execute
    with pytest.raises(DataUnavailableError) as caught:
        describe_dataset("cifar100", str(tmp_path))
    # Assert
    _assert_clear(str(caught.value), "cifar100", "CIFAR-100")
    assert "lacks test" in str(caught.value)


def test_copy_that_fails_the_checksums_is_rejected(tmp_path) -> None:
    # Prepare: a copy in the right format whose files are not the published ones
    write_cifar10(tmp_path)
    # Execute
    with pytest.raises(DataUnavailableError) as caught:
        load_partition("cifar10", 0, 2, data_dir=str(tmp_path))
    # Assert
    message = str(caught.value)
    _assert_clear(message, "cifar10", "CIFAR-10")
    assert "the files data_batch_1, data_batch_2, data_batch_3" in message
    assert "test_batch, batches.meta in" in message
    assert "do not match the MD5 checksums of the published archive" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_one_damaged_file_is_named(tmp_path, monkeypatch) -> None:
    # Prepare: an accepted copy, then one of its files changes
    write_cifar100(tmp_path)
    accept_fake_copy(monkeypatch, tmp_path / "cifar-100-python")
    with open(tmp_path / "cifar-100-python" / "test", "ab") as handle:
        handle.write(b"\0")
    # Execute
    with pytest.raises(DataUnavailableError) as caught:
        describe_dataset("cifar100", str(tmp_path))
    # Assert
    _assert_clear(str(caught.value), "cifar100", "CIFAR-100")
    assert "the file test in " in str(caught.value)
    assert "does not match the MD5 checksums" in str(caught.value)


def test_cinic10_without_its_class_folders_is_reported(tmp_path) -> None:
    # Prepare
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "test").mkdir()
    # Execute
    with pytest.raises(DataUnavailableError) as caught:
        describe_dataset("cinic10", str(tmp_path))
    # Assert
    _assert_clear(str(caught.value), "cinic10", "CINIC-10")
    assert "airplane" in str(caught.value)


@pytest.mark.usefixtures("no_network")
def test_unreachable_hub_without_data_dir_fails_at_once() -> None:
    # Execute
    with pytest.raises(DataUnavailableError) as caught:
        describe_dataset("cifar100")
    # Assert
    message = str(caught.value)
    _assert_clear(message, "cifar100", "CIFAR-100")
    assert "no data-dir set" in message
    assert "'uoft-cs/cifar100'" in message and "unreachable" in message
    assert "Name or service not known" in message


def test_failed_download_is_reported_as_unavailable(monkeypatch) -> None:
    # Prepare: the Hub answers, but fetching the data set fails
    import flwr_datasets

    class FailingDownload:
        def __init__(self, **kwargs) -> None:
            self.kwargs = kwargs

        def load_split(self, split: str):
            raise ConnectionError("Couldn't reach 'flwrlabs/cinic10' on the Hub\nmore detail")

    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(hub, "reachable", lambda timeout=0.0: None)
    monkeypatch.setattr(flwr_datasets, "FederatedDataset", FailingDownload)
    # Execute
    with pytest.raises(DataUnavailableError) as caught:
        load_partition("cinic10", 0, 2)
    # Assert
    message = str(caught.value)
    _assert_clear(message, "cinic10", "CINIC-10")
    assert "ConnectionError: Couldn't reach 'flwrlabs/cinic10' on the Hub" in message
    assert "more detail" not in message


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("data_dir", ["", "missing"])
def test_server_app_logs_one_message_and_starts_no_round(tmp_path, monkeypatch, data_dir) -> None:
    # Prepare
    logged: list[tuple[int, str]] = []
    monkeypatch.setattr(server_app, "log", lambda level, msg, *a: logged.append((level, msg % a)))
    out = tmp_path / "out"
    run_config = {"dataset": "cifar10", "output-dir": str(out)}
    if data_dir:
        run_config["data-dir"] = str(tmp_path / data_dir)
    context = server_context(run_config)
    # Execute
    server_app.main(UntouchedGrid(), context)
    # Assert
    assert len(logged) == 1
    level, message = logged[0]
    assert level == 40  # ERROR
    _assert_clear(message, "cifar10", "CIFAR-10")
    assert message.endswith("The run stops before its first round.")
    written = json.loads((out / "results.json").read_text())  # and it says so
    assert written["status"] == "failed"
    assert written["error"] + "\nThe run stops before its first round." == message
    assert written["rounds"] == [] and written["config"]["dataset"] == "cifar10"
    assert not (out / "accuracy.png").exists()  # nothing started


def test_relative_data_dir_is_rejected() -> None:
    with pytest.raises(ConfigError, match="data-dir.*absolute"):
        RunConfig.from_mapping({"dataset": "cifar10", "data-dir": "data/cifar"})
    with pytest.raises(ConfigError, match="dataset"):
        RunConfig.from_mapping({"dataset": "mnist"})
    with pytest.raises(ConfigError, match="partitioner"):
        RunConfig.from_mapping({"partitioner": "shards"})
    assert RunConfig.from_mapping({"data-dir": str(Path.home())}).data_dir == str(Path.home())
