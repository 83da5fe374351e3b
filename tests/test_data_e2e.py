"""`flwr run` of the paper's baseline (``baselines/fedgkt``) with its configuration
files, on a local CIFAR-10 copy and on a data set that is not there. As its README
says, Flower takes a file or key=value pairs, not both: each test writes a copy of
the setting's file with ``data-dir`` and ``output-dir`` (and, for a copy of 100
images, one round of one server epoch and no minimum partition size) appended."""

import json
import os

import pytest
from flower_processes import REPO, flower_environment, flwr_run, start_local_superlink
from test_data_sources import fake_checksums, write_cifar10

pytestmark = pytest.mark.e2e

CHECKSUMS = "FLWR_FEDGKT_TEST_CIFAR10_CHECKSUMS"  # the file's path, for the tests
CHECKSUMS_FILE = "cifar10-checksums.json"
BASELINE = REPO / "baselines" / "fedgkt"


def conf_copy(name: str, folder, **values) -> str:
    """A copy of ``conf/<name>.toml`` with ``values`` appended (each key once: the
    file's own line for a key given here is left out); its path."""
    lines = (BASELINE / "conf" / f"{name}.toml").read_text().splitlines()
    kept = [line for line in lines if line.split("=")[0].strip() not in values]
    added = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path = folder / f"{name}.toml"
    path.write_text("\n".join(kept + added) + "\n")
    return str(path)


# Imported by every Python process of these runs (through PYTHONPATH): torchvision
# checks a local CIFAR-10 copy against the published archive's MD5 checksums, which
# the fake copy written here cannot match. The check stays on; the checksums it
# expects become the fake copy's, once the test has written them. The patch waits
# for torchvision's CIFAR module to be imported (an import hook), so that the many
# processes of a run that never read CIFAR-10 do not import torchvision for it.
SITECUSTOMIZE = f'''
import importlib.abc
import importlib.util
import json
import os
import sys

# next to this file: Ray workers of a shared cluster do not get the run's environment
_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "{CHECKSUMS_FILE}")


class _FakeChecksums(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torchvision.datasets.cifar":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            with open(_path) as handle:
                sums = json.load(handle)
            cifar = module.CIFAR10
            cifar.train_list = [[name, sums[name]] for name, _ in cifar.train_list]
            cifar.test_list = [[name, sums[name]] for name, _ in cifar.test_list]
            cifar.meta = {{**cifar.meta, "md5": sums[cifar.meta["filename"]]}}

        spec.loader.exec_module = exec_module
        return spec


if _path and os.path.exists(_path):
    sys.meta_path.insert(0, _FakeChecksums())
'''


@pytest.fixture(scope="module")
def flower_env(tmp_path_factory):
    """One private SuperLink for this module's runs."""
    tmp_path = tmp_path_factory.mktemp("flower")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    with flower_environment(tmp_path) as env:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
        env[CHECKSUMS] = str(site / CHECKSUMS_FILE)
        start_local_superlink(env, tmp_path / "superlink.log")
        yield env


def test_flwr_run_trains_on_a_local_cifar10_folder(flower_env, tmp_path) -> None:
    # Prepare
    write_cifar10(tmp_path / "cifar", per_batch=20, num_test=20)
    sums = fake_checksums(tmp_path / "cifar" / "cifar-10-batches-py")
    with open(flower_env[CHECKSUMS], "w") as handle:
        json.dump(sums, handle)
    out = tmp_path / "out"
    run_config = conf_copy(
        "cifar10-dirichlet-resnet56",
        tmp_path,
        **{"data-dir": str(tmp_path / "cifar"), "output-dir": str(out)},
        **{"num-server-rounds": 1, "server-epochs": 1, "min-partition-size": 0, "seed": 1},
    )
    # Execute: from baselines/fedgkt, as its README runs it
    result = flwr_run(flower_env, BASELINE, run_config, num_supernodes=2)
    # Assert
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Data set cifar10: 10 classes, 100 training / 20 test images" in result.stdout
    assert "round 1: accuracy" in result.stdout, result.stdout[-4000:]
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert rounds[0]["train_nodes"] == 2 and rounds[0]["rejected_replies"] == []
    assert (out / "label_distribution.png").read_bytes()[:4] == b"\x89PNG"


def test_flwr_run_without_data_stops_with_one_message(flower_env, tmp_path) -> None:
    # Prepare
    out = tmp_path / "out"
    values = {"data-dir": str(tmp_path / "missing"), "output-dir": str(out)}
    run_config = conf_copy("cifar100-iid-resnet56", tmp_path, **values)
    # Execute
    result = flwr_run(flower_env, BASELINE, run_config, num_supernodes=2)
    # Assert
    assert "Data set 'cifar100' (CIFAR-100) is not available." in result.stdout, result.stdout
    assert "The run stops before its first round." in result.stdout
    assert "Traceback" not in result.stdout
    assert "[ROUND 1" not in result.stdout
    written = json.loads((out / "results.json").read_text())  # the run says it failed
    assert written["status"] == "failed" and written["rounds"] == []
    assert written["error"].startswith("Data set 'cifar100' (CIFAR-100) is not available.")
    assert not (out / "accuracy.png").exists()
