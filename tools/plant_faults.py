"""Plant faults the tests must catch, one at a time, each in a fresh copy of the
repository, and run the tests that guard against it: every line must say CAUGHT.

    python tools/plant_faults.py          # all
    python tools/plant_faults.py 0 3      # the first and the fourth

Not part of the package; the copies go to the system's temporary folder.
"""
# ruff: noqa: E501  (the anchors are lines of the package, as they stand)

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1]
PLANTS = [
    (
        "server logits paired with the wrong rows",
        "flwr_fedgkt/server.py",
        "        return payload.ids, logits.numpy()",
        "        return payload.ids, logits.numpy()[::-1].copy()",
        ["tests/test_kd_alignment.py"],
    ),
    (
        "server logits in train mode",
        "flwr_fedgkt/server.py",
        "        self._start_threads()\n        self.model.eval()\n        out = []",
        "        self._start_threads()\n        self.model.train()\n        out = []",
        ["tests/test_kd_alignment.py"],
    ),
    (
        "the server's KD term dropped",
        "flwr_fedgkt/server.py",
        "            logits, labels, batch.edge_logits.to(self.device), self.temperature, self.alpha",
        "            logits, labels, batch.edge_logits.to(self.device), self.temperature, 0.0",
        ["tests/test_kd_alignment.py"],
    ),
    (
        "the int8 decoder without its offset",
        "flwr_fedgkt/codec.py",
        "    return data.float() * scale.view(shape) + offset.view(shape)",
        "    return data.float() * scale.view(shape)",
        ["tests/test_int8_codec.py", "tests/test_features.py"],
    ),
    (
        "two nodes sharing one edge state",
        "flwr_fedgkt/edge_state.py",
        '    return Path(directory) / f"edge-{file_label(node_key)}-round-{server_round}.pt"',
        '    return Path(directory) / f"edge-shared-round-{server_round}.pt"',
        ["tests/test_edge_state.py", "tests/test_client_app.py"],
    ),
    (
        "accuracy averaged per node instead of per sample",
        "flwr_fedgkt/server_step.py",
        '        log.accuracy = weighted_mean([(s["accuracy"], w) for _, s, w in scored])',
        '        log.accuracy = weighted_mean([(s["accuracy"], 1.0) for _, s, w in scored])',
        ["tests/test_round_metrics.py", "tests/test_strategy.py"],
    ),
    (
        "asynchronous: a round barrier (no node instructed while another is out)",
        "flwr_fedgkt/asynchronous.py",
        "            ready = [self.receive(msg) for msg in arrived]\n",
        "            ready = [self.receive(msg) for msg in arrived]\n            ready = ready if not self.out else []\n",
        ["tests/test_async.py::test_a_slow_node_never_delays_another_nodes_next_instruction"],
    ),
    (
        "asynchronous: stale replies never flagged",
        "flwr_fedgkt/continuous.py",
        "age > self.max_logit_age:",
        "age > self.max_logit_age + 100:",
        ["tests/test_async.py::test_a_reply_older_than_max_logit_age_is_stored_and_flagged"],
    ),
    (
        "asynchronous: the training upload validated in place of the test upload",
        "flwr_fedgkt/continuous.py",
        "                tested = self.engine.accept(test, instruction.task, False, log)",
        "                tested = self.engine.accept(train, instruction.task, False, log)",
        ["tests/test_async.py::test_a_hostile_reply_is_rejected_as_in_rounds"],
    ),
    (
        "asynchronous: a checkpoint without its server version",
        "flwr_fedgkt/continuous.py",
        '            "server_version": self.version,',
        "",
        ["tests/test_async.py::test_a_killed_async_run_resumes_from_its_checkpoint"],
    ),
    (
        "asynchronous: nodes listed once, at the start",
        "flwr_fedgkt/asynchronous.py",
        "                next_poll = now + NODE_POLL_SECONDS",
        "                next_poll = float('inf')",
        ["tests/test_async.py::test_nodes_join_and_leave_mid_run"],
    ),
    (
        "privacy: features not clipped",
        "flwr_fedgkt/privacy/mechanisms.py",
        "    scale = torch.clamp(clip / norms.clamp_min(1e-12), max=1.0)",
        "    scale = torch.ones_like(norms)",
        ["tests/test_privacy.py::test_clipped_features_on_the_wire_are_within_the_clip"],
    ),
    (
        "privacy: noise of sd `noise` instead of `noise * clip`",
        "flwr_fedgkt/privacy/mechanisms.py",
        "    return clipped + draw * (noise * clip)",
        "    return clipped + draw * noise",
        ["tests/test_privacy.py::test_the_noise_on_the_wire_has_the_configured_standard_deviation"],
    ),
    (
        "privacy: randomized response keeps too few labels",
        "flwr_fedgkt/privacy/mechanisms.py",
        "    flip = torch.rand(labels.shape, generator=generator) >= keep",
        "    flip = torch.rand(labels.shape, generator=generator) >= keep * 0.9",
        ["tests/test_privacy.py::test_randomized_response_flips_at_the_configured_rate"],
    ),
    (
        "privacy: the accountant counts one release whatever the count",
        "flwr_fedgkt/privacy/accountant.py",
        "    multiplier = sum(k / z**2 for z, k in releases) ** -0.5",
        "    multiplier = sum(1 / z**2 for z, k in releases) ** -0.5",
        [
            "tests/test_privacy.py::test_the_accountant_matches_the_analytic_gaussian_mechanism_over_a_real_runs_releases"
        ],
    ),
    (
        "privacy: fresh noise every round with a frozen extractor",
        "flwr_fedgkt/node.py",
        "        release_key = 0 if frozen or trainer.stem is not None else server_round",
        "        release_key = server_round",
        ["tests/test_privacy.py::test_a_frozen_extractor_sends_the_same_noisy_features_once"],
    ),
    (
        "privacy: noise drawn from the run's seed",
        "flwr_fedgkt/node.py",
        "            secret=trainer.privacy_secret,",
        "            secret=self.seed,",
        ["tests/test_privacy.py::test_the_noise_comes_from_the_nodes_own_secret_not_the_run_seed"],
    ),
    (
        "privacy: declared noise not taken into account by the range screen",
        "flwr_fedgkt/validation/federation.py",
        '            explained = noise_bound(getattr(reply, "defences", None))',
        "            explained = None",
        ["tests/test_privacy.py::test_declared_noise_is_not_taken_for_an_out_of_range_node"],
    ),
    (
        "privacy: the server's loss ignores the label flips",
        "flwr_fedgkt/server.py",
        "        if self.label_keep:\n",
        "        if False:\n",
        [
            "tests/test_privacy.py::test_the_server_trains_and_scores_noisy_labels_with_their_flip_probability"
        ],
    ),
    (
        "privacy: the server scores noisy test labels as if they were true",
        "flwr_fedgkt/server_step.py",
        "                    self.label_keep(reply),\n",
        "                    1.0,\n",
        [
            "tests/test_privacy.py::test_a_rounds_accuracy_under_label_dp_is_the_debiased_estimate",
        ],
    ),
    (
        "privacy: a round asks for less and the node complies",
        "flwr_fedgkt/client.py",
        "            defences=self.defences.at_least(asked),",
        "            defences=asked,",
        ["tests/test_privacy.py::test_the_server_can_ask_for_more_protection_never_less"],
    ),
    (
        "privacy: NoPeek's term dropped",
        "flwr_fedgkt/edge.py",
        "                loss = loss + nopeek_weight * distance_correlation(images, features.float())",
        "                loss = loss + 0 * distance_correlation(images, features.float())",
        ["tests/test_privacy.py::test_nopeek_makes_features_say_less_about_the_inputs"],
    ),
    (
        "privacy: noisy labels drawn afresh every release",
        "flwr_fedgkt/privacy/__init__.py",
        '        generator = secret_generator(secret, "labels", split)',
        '        generator = secret_generator(secret, "labels", split, release_key)',
        ["tests/test_privacy.py::test_a_nodes_noisy_labels_are_drawn_once"],
    ),
    (
        "edge-stages: the server takes the stem's channels after a deeper cut",
        "flwr_fedgkt/models.py",
        "        return ServerResNet((blocks,) * (3 - stages), n, _stage_width(stages), first=stages)",
        "        return ServerResNet((blocks,) * (3 - stages), n, first=stages)",
        ["tests/test_privacy.py::test_edge_stages_move_whole_stages_of_the_network_to_the_edge"],
    ),
    (
        "query-timeout not capped at round-timeout",
        "flwr_fedgkt/faces.py",
        "            query_timeout=min(config.query_timeout, config.round_timeout),",
        "            query_timeout=config.query_timeout,",
        ["tests/test_settings.py::test_a_round_timeout_below_the_query_timeout_caps_the_key_query"],
    ),
]
only = sys.argv[1:]
for i, (name, path, old, new, tests) in enumerate(PLANTS):
    if only and str(i) not in only:
        continue
    dst = Path(tempfile.gettempdir()) / f"plant-fault-{i}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(SRC, dst, ignore=shutil.ignore_patterns(".git", "__pycache__", "outputs"))
    f = dst / path
    text = f.read_text()
    assert old in text, (name, "anchor not found")
    f.write_text(text.replace(old, new, 1))
    env = {**os.environ, "PYTHONPATH": str(dst), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests],
        cwd=dst,
        env=env,
        capture_output=True,
        text=True,
    )
    last = [line for line in r.stdout.splitlines() if "passed" in line or "failed" in line]
    print(
        f"{name}: {'CAUGHT' if r.returncode != 0 else 'MISSED'} ({last[-1] if last else r.stdout[-300:]})",
        flush=True,
    )
    shutil.rmtree(dst, ignore_errors=True)
