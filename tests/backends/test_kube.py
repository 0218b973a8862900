"""The kubernetes profile end to end, on the Kubernetes emulator (scripts/k8s-emulator).

The CLI runs as users run it, against the emulator's API over HTTP; Parsl's
KubernetesProvider creates real pod objects, and the emulator's stand-in
kubelet runs their worker pools as local processes. What is checked: results
come back from the pods (job_id/node columns), pods carry the profile's
image, resources, pull policy, node selector and labels, and no pod outlives
the run (normal end, SIGTERM, kill -9 + ``parsl-chat cleanup``). A cluster
that does not answer must be a quick exit 2 naming the kubeconfig and context.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import EXAMPLES, REPO, assert_figures_within_bounds, clean_env, run_cli

from parsl_chat.run import run_id_for

pytest.importorskip("kmock")
client = pytest.importorskip("kubernetes.client")
kconfig = pytest.importorskip("kubernetes.config")

pytestmark = [
    pytest.mark.kubernetes,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulator uses /proc and process groups"),
]
if importlib.util.find_spec("pytest_timeout"):
    pytestmark.append(pytest.mark.timeout(240))

EMULATOR = REPO / "scripts" / "k8s-emulator"
CONTEXT = "parsl-chat-emulator"
NODE = "k8s-emulator"  # the spec.nodeName the emulator's kubelet reports
RUN_LABEL = "parsl-chat/run-id"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Emulator:
    url: str
    kubeconfig: Path
    state_dir: Path

    def pods(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Every pod ever created (deleted ones too), optionally only those of one run."""
        import urllib.request

        with urllib.request.urlopen(self.url + "/_emulator/pods", timeout=5) as resp:
            pods: list[dict[str, Any]] = json.loads(resp.read())
        return [p for p in pods if run_id is None or p["labels"].get(RUN_LABEL) == run_id]

    def api(self) -> Any:
        return client.CoreV1Api(kconfig.new_client_from_config(config_file=str(self.kubeconfig), context=CONTEXT))

    def all_gone(self, run_id: str) -> bool:
        """Every pod of the run deleted and its process ended."""
        pods = self.pods(run_id)
        return bool(pods) and all(p["deleted"] and p["containers"][0]["exit_code"] is not None for p in pods)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    base = tmp_path_factory.mktemp("k8s")
    kubeconfig, state = base / "kubeconfig", base / "state"

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(EMULATOR), *args], capture_output=True, text=True, timeout=60)

    started = ctl("start", "--kubeconfig", str(kubeconfig), "--state-dir", str(state), "--grace-seconds", "2")
    assert started.returncode == 0, started.stderr
    url = started.stdout.split()[2]
    try:
        yield Emulator(url, kubeconfig, state)
    finally:
        stopped = ctl("stop", "--state-dir", str(state))
        assert stopped.returncode == 0, stopped.stderr


def write_profile(path: Path, kubeconfig: Path | str, **overrides: Any) -> Path:
    profile: dict[str, Any] = {
        "description": "kubernetes emulator (test)",
        "executor": "kubernetes",
        "kubeconfig": str(kubeconfig),
        "context": CONTEXT,
        "namespace": "default",
        "image": "registry.example.org/parsl-chat:test",  # ignored by the emulator, recorded on the pod
        "image_pull_policy": "Always",
        "node_selector": {"kubernetes.io/arch": "amd64"},
        "service_account": "parsl-chat-runner",
        "pod_cpu": "500m",
        "pod_memory": "256Mi",
        "init_blocks": 1,
        "max_blocks": 2,
        "workers": 2,
        "status_polling_s": 1,
        **overrides,
    }
    path.write_text(yaml.safe_dump(profile))
    return path


def prompts_file(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question number {i}"}) + "\n" for i in range(n)))
    return path


class SpecRecorder:
    """Reads the run's pods from the API while they exist: the emulator's summary lacks pull policy etc."""

    def __init__(self, emulator: Emulator, run_id: str) -> None:
        self.api = emulator.api()
        self.selector = f"{RUN_LABEL}={run_id}"
        self.specs: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                for pod in self.api.list_namespaced_pod("default", label_selector=self.selector).items:
                    self.specs[pod.metadata.name] = pod.to_dict()
            except Exception:  # the emulator is busy: try again
                pass
            self._stop.wait(0.2)

    def __enter__(self) -> SpecRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class Driver:
    """``parsl-chat run`` in the background, so that a test can signal or kill it mid-run."""

    def __init__(self, *args: str, log: Path) -> None:
        env = clean_env()
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "parsl_chat", "run", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def children(self) -> list[int]:
        import psutil

        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self, helpers: list[int]) -> None:
        """SIGKILL the driver and its helpers: an orphaned Parsl interchange keeps reconnecting
        to its dead driver's ports and can answer a later driver that reuses them."""
        if self.proc.poll() is None:
            helpers = helpers + self.children()
            self.proc.kill()
            self.proc.wait(30)
        kill_all(helpers)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text()


def first_results(out: Path) -> bool:
    ledger = out / "ledger.jsonl"
    return ledger.exists() and ledger.stat().st_size > 0


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- runs


@pytest.mark.slow
def test_run_on_pods_end_to_end(emulator: Emulator, sim_server, tmp_path: Path) -> None:
    server = sim_server(latency_ms=50)
    profile = write_profile(tmp_path / "k8s.yaml", emulator.kubeconfig)
    out = tmp_path / "k8s-e2e"
    started = time.monotonic()
    with SpecRecorder(emulator, run_id_for(out)) as recorder:
        result = run_cli(
            "run", str(EXAMPLES / "prompts.jsonl"), "--profile", str(profile), "--endpoint", server.url, "--out", str(out),
        )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 90, f"30 prompts took {elapsed:.0f}s"

    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 30 and (df.status == "ok").all()
    pods = emulator.pods(run_id_for(out))
    names = {p["name"] for p in pods}
    assert 1 <= len(pods) <= 2  # max_blocks
    assert all(n.startswith(f"parsl-chat-{run_id_for(out)}.") for n in names)
    # every row names the pod it ran in, and the node the pod ran on
    assert df.job_id.notna().all() and set(df.job_id) <= names
    assert set(df.node) == {NODE}
    assert df.block.notna().all()
    meta = json.loads((out / "run.json").read_text())
    assert {b["job_id"] for b in meta["blocks"]} == names  # cleanup finds them by these ids
    assert_figures_within_bounds(json.loads((out / "summary.json").read_text()))
    assert all(b["ended_at"] for b in meta["blocks"])

    for pod in pods:
        assert pod["image"] == "registry.example.org/parsl-chat:test"
        assert pod["resources"] == {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}}
        assert pod["labels"]["app.kubernetes.io/managed-by"] == "parsl-chat"
        assert {"PARSL_CHAT_POD_NAME", "PARSL_CHAT_POD_NODE"} <= set(pod["containers"][0]["env_names"])
        assert "process_worker_pool.py" in pod["containers"][0]["args"][-1]
    assert set(recorder.specs) == names, "every pod should have been seen through the API while it existed"
    for spec in recorder.specs.values():
        container = spec["spec"]["containers"][0]
        assert container["image_pull_policy"] == "Always"
        assert spec["spec"]["node_selector"] == {"kubernetes.io/arch": "amd64"}
        assert spec["spec"]["service_account_name"] == "parsl-chat-runner"
        assert spec["spec"]["restart_policy"] == "Never"
        assert spec["metadata"]["annotations"][RUN_LABEL] == run_id_for(out)
        env = {e["name"]: e for e in container["env"]}
        assert env["PARSL_CHAT_POD_NAME"]["value_from"]["field_ref"]["field_path"] == "metadata.name"
        assert env["PARSL_CHAT_POD_NODE"]["value_from"]["field_ref"]["field_path"] == "spec.nodeName"

    wait_for(lambda: emulator.all_gone(run_id_for(out)), 20, "every pod of the run to be deleted")
    assert emulator.api().list_namespaced_pod("default", label_selector=f"{RUN_LABEL}={run_id_for(out)}").items == []


@pytest.mark.slow
def test_interrupted_run_exits_3_and_deletes_its_pods(emulator: Emulator, sim_server, tmp_path: Path) -> None:
    server = sim_server(latency_ms=500)
    profile = write_profile(tmp_path / "k8s.yaml", emulator.kubeconfig)
    out = tmp_path / "k8s-sigterm"
    prompts = prompts_file(tmp_path / "p.jsonl", 400)
    driver = Driver(
        str(prompts), "--profile", str(profile), "--endpoint", server.url, "--out", str(out), log=tmp_path / "run.log"
    )
    helpers: list[int] = []
    try:
        wait_for(lambda: first_results(out), 120, "first results")
        assert [p for p in emulator.pods(run_id_for(out)) if not p["deleted"]], "pods should be running mid-run"
        helpers = driver.children()
        started = time.monotonic()
        driver.proc.send_signal(signal.SIGTERM)
        code = driver.wait(120)
        stopping = time.monotonic() - started
    finally:
        driver.kill(helpers)
    text = driver.output()
    assert code == 3, text
    assert "run stopped (SIGTERM)" in text and f"parsl-chat run --resume {out}" in text
    assert "Traceback" not in text
    assert stopping < 60, f"stopping took {stopping:.0f}s"
    wait_for(lambda: emulator.all_gone(run_id_for(out)), 20, "every pod of the interrupted run to be deleted")
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_killed_driver_leaves_pods_that_cleanup_deletes(emulator: Emulator, sim_server, tmp_path: Path) -> None:
    server = sim_server(latency_ms=500)
    profile = write_profile(tmp_path / "k8s.yaml", emulator.kubeconfig)
    out = tmp_path / "k8s-kill9"
    prompts = prompts_file(tmp_path / "p.jsonl", 400)
    driver = Driver(
        str(prompts), "--profile", str(profile), "--endpoint", server.url, "--out", str(out), log=tmp_path / "run.log"
    )
    helpers: list[int] = []
    try:
        wait_for(lambda: first_results(out), 120, "first results")
        wait_for(
            lambda: [b for b in json.loads((out / "run.json").read_text())["blocks"] if b["job_id"]], 30, "job ids in run.json"
        )
        helpers = driver.children()
        driver.proc.send_signal(signal.SIGKILL)
        driver.wait(30)
        left = sorted(p["name"] for p in emulator.pods(run_id_for(out)) if not p["deleted"])
        assert left, "the pods should have outlived their driver"
        recorded = {b["job_id"] for b in json.loads((out / "run.json").read_text())["blocks"]}
        assert recorded <= {p["name"] for p in emulator.pods(run_id_for(out))}

        started = time.monotonic()
        result = run_cli("cleanup", str(out))
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 30
    finally:
        driver.kill(helpers)  # its interchange too, if cleanup left it: it would answer a later driver
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("deleted pod(s): ")]
    assert sorted(line.removeprefix("deleted pod(s): ").split(", ")) == left
    wait_for(lambda: emulator.all_gone(run_id_for(out)), 20, "the leftover pods to be deleted")
    again = run_cli("cleanup", str(out))
    assert again.returncode == 0 and "nothing to delete" in again.stdout


@pytest.mark.slow
def test_failing_pods_are_explained_and_deleted(emulator: Emulator, tmp_path: Path) -> None:
    """An image without parsl-chat: the pods fail at once. The rows say why (the pod's own output,
    not Parsl's "see the submit_scripts directory"), and the Failed pods, which Parsl's scale-in
    skips, are deleted anyway."""
    profile = write_profile(
        tmp_path / "k8s.yaml", emulator.kubeconfig, worker_init="echo no parsl-chat in this image >&2; exit 3"
    )
    out = tmp_path / "k8s-broken"
    started = time.monotonic()
    result = run_cli(
        "run", str(EXAMPLES / "prompts.jsonl"), "--profile", str(profile), "--endpoint", "http://127.0.0.1:9/v1",
        "--out", str(out), timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 60
    assert "Traceback" not in result.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 30 and (df.status == "error").all()
    assert df.error.str.contains("failed (exit code 3", regex=False).all()
    assert df.error.str.contains("no parsl-chat in this image", regex=False).all()
    assert {p["phase"] for p in emulator.pods(run_id_for(out))} == {"Failed"}
    wait_for(lambda: emulator.all_gone(run_id_for(out)), 20, "the Failed pods to be deleted")


# --------------------------------------------------------------------------- fail fast


def dead_kubeconfig(path: Path, context: str = "dead-cluster") -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": context,
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],  # closed port
                "users": [{"name": "u", "user": {"token": "x"}}],
                "contexts": [{"name": context, "context": {"cluster": "c", "user": "u"}}],
            }
        )
    )
    return path


def test_unreachable_cluster_fails_fast(tmp_path: Path) -> None:
    kc = dead_kubeconfig(tmp_path / "dead-kubeconfig")
    profile = write_profile(tmp_path / "k8s.yaml", kc, context="dead-cluster")
    out = tmp_path / "run"
    started = time.monotonic()
    result = run_cli(
        "run", str(EXAMPLES / "prompts.jsonl"), "--profile", str(profile), "--endpoint", "http://127.0.0.1:9/v1",
        "--out", str(out), timeout=60,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert "Traceback" not in result.stderr
    assert str(kc) in result.stderr and "context dead-cluster" in result.stderr
    assert "connection refused" in result.stderr and "hint:" in result.stderr
    assert not (out / "ledger.jsonl").exists() or not (out / "ledger.jsonl").read_text()


def test_cluster_problems_are_named(emulator: Emulator, tmp_path: Path) -> None:
    def run(profile: Path, **env: str) -> subprocess.CompletedProcess[str]:
        return run_cli(
            "run", str(EXAMPLES / "prompts.jsonl"), "--profile", str(profile), "--endpoint", "http://127.0.0.1:9/v1",
            "--out", str(tmp_path / f"run-{time.monotonic_ns()}"), env=env, timeout=60,
        )  # fmt: skip

    no_ns = run(write_profile(tmp_path / "ns.yaml", emulator.kubeconfig, namespace="no-such-ns"))
    assert no_ns.returncode == 2 and "namespace 'no-such-ns' does not exist" in no_ns.stderr, no_ns.stderr
    assert "kubectl create namespace no-such-ns" in no_ns.stderr

    bad_ctx = run(write_profile(tmp_path / "ctx.yaml", emulator.kubeconfig, context="elsewhere"))
    assert bad_ctx.returncode == 2, bad_ctx.stderr
    assert f"context 'elsewhere' is not in kubeconfig {emulator.kubeconfig.resolve()}; its contexts: {CONTEXT}" in bad_ctx.stderr

    missing = run(write_profile(tmp_path / "missing.yaml", tmp_path / "nope" / "kubeconfig"))
    assert missing.returncode == 2 and f"kubeconfig {tmp_path / 'nope' / 'kubeconfig'}" in missing.stderr

    # no kubeconfig anywhere and not in a pod: says where it looked
    profile = tmp_path / "none.yaml"
    profile.write_text(yaml.safe_dump({"executor": "kubernetes", "image": "x"}))
    nothing = run(profile, HOME=str(tmp_path / "home"), KUBECONFIG="", KUBERNETES_SERVICE_HOST="")
    assert nothing.returncode == 2 and "no Kubernetes cluster configured" in nothing.stderr, nothing.stderr
    assert str(tmp_path / "home" / ".kube" / "config") in nothing.stderr

    # $KUBECONFIG is honoured when the profile names no file (read now, not at import)
    via_env = run(profile, KUBECONFIG=str(dead_kubeconfig(tmp_path / "env-kubeconfig", "from-env")), KUBERNETES_SERVICE_HOST="")
    assert via_env.returncode == 2 and "context from-env" in via_env.stderr and "$KUBECONFIG" in via_env.stderr

    bad_cpu = run(write_profile(tmp_path / "cpu.yaml", emulator.kubeconfig, pod_cpu="lots"))
    assert bad_cpu.returncode == 2 and "pod_cpu 'lots' is not a CPU quantity" in bad_cpu.stderr
    for result in (no_ns, bad_ctx, missing, nothing, via_env, bad_cpu):
        assert "Traceback" not in result.stderr
    assert emulator.pods("no-such-ns") == []


# --------------------------------------------------------------------------- library pieces


def test_delete_run_pods_uses_the_recorded_cluster(emulator: Emulator, tmp_path: Path) -> None:
    from parsl_chat.backends.kube import cluster_record, delete_run_pods, pod_prefix, run_label
    from parsl_chat.config import ProfileConfig

    run_id = "20260101T000000Z-abc123"
    label = run_label(run_id)
    v1 = emulator.api()

    def pod(name: str, labels: dict[str, str]) -> Any:
        return client.V1Pod(
            metadata=client.V1ObjectMeta(name=name, labels=labels),
            spec=client.V1PodSpec(
                restart_policy="Never", containers=[client.V1Container(name="c", image="none", command=["sleep", "60"])]
            ),
        )

    prefix = pod_prefix(run_id)
    v1.create_namespaced_pod("default", pod(f"{prefix}.aaaa0001", {RUN_LABEL: label}))
    v1.create_namespaced_pod("default", pod(f"{prefix}.aaaa0002", {}))  # label lost: found by its block's job id
    v1.create_namespaced_pod("default", pod("someone-elses-pod", {RUN_LABEL: "another-run"}))
    profile = ProfileConfig(executor="kubernetes", kubeconfig=str(emulator.kubeconfig), context=CONTEXT)
    record = cluster_record(profile, run_id)
    assert record["kubeconfig"] == str(emulator.kubeconfig.resolve()) and record["context"] == CONTEXT
    meta: dict[str, Any] = {
        "run_id": run_id,
        "executor": "kubernetes",
        "kubernetes": record,
        "blocks": [{"block": "0", "job_id": f"{prefix}.aaaa0002"}, {"block": "1", "job_id": f"{prefix}.gone0003"}],
        "options": {"profile": str(tmp_path / "does-not-exist.yaml")},  # not needed: the record wins
    }
    assert sorted(delete_run_pods(meta)) == [f"{prefix}.aaaa0001", f"{prefix}.aaaa0002"]
    assert delete_run_pods(meta) == []
    assert [p.metadata.name for p in v1.list_namespaced_pod("default").items if p.metadata.name == "someone-elses-pod"]
    v1.delete_namespaced_pod("someone-elses-pod", "default")


def test_names_labels_and_stuck_pods() -> None:
    from parsl_chat.backends.kube import _stuck_reason, _termination, _unschedulable, pod_prefix, run_label

    assert run_label("20260101T000000Z-abc123") == "20260101T000000Z-abc123"
    odd = run_label("my run/with spaces" + "x" * 80)
    assert len(odd) <= 63 and odd[0].isalnum() and odd[-1].isalnum() and " " not in odd and "/" not in odd
    assert run_label("a b") != run_label("a_b")  # sanitising must not merge two runs
    assert pod_prefix("Run_1") == "parsl-chat-run-1"
    assert len(pod_prefix("x" * 300)) <= 54

    def pod(reason: str | None) -> Any:
        waiting = client.V1ContainerStateWaiting(reason=reason, message="back-off pulling image") if reason else None
        status = client.V1ContainerStatus(
            name="c", image="nope:1", image_id="", ready=False, restart_count=0, state=client.V1ContainerState(waiting=waiting)
        )
        return client.V1Pod(status=client.V1PodStatus(phase="Pending", container_statuses=[status]))

    assert _stuck_reason(pod("ImagePullBackOff")) == "ImagePullBackOff: back-off pulling image (image nope:1)"
    assert _stuck_reason(pod("ContainerCreating")) is None
    assert _stuck_reason(pod(None)) is None
    assert _stuck_reason(client.V1Pod(status=None)) is None

    unscheduled = client.V1Pod(status=client.V1PodStatus(phase="Pending", conditions=[client.V1PodCondition(
        type="PodScheduled", status="False", reason="Unschedulable", message="0/3 nodes match the node selector")]))  # fmt: skip
    assert _unschedulable(unscheduled) == "0/3 nodes match the node selector"
    assert _unschedulable(pod(None)) is None
    done = client.V1ContainerStatus(
        name="c", image="i", image_id="", ready=False, restart_count=0,
        state=client.V1ContainerState(terminated=client.V1ContainerStateTerminated(exit_code=137, reason="OOMKilled")),
    )  # fmt: skip
    assert _termination(client.V1Pod(status=client.V1PodStatus(phase="Failed", container_statuses=[done]))) == (
        137,
        "exit code 137, OOMKilled",
    )


def test_provider_options_match_parsls_constructor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider skips Parsl's constructor (its load_kube_config()) but stores what it stores."""
    from parsl.providers import KubernetesProvider

    from parsl_chat.backends.kube import _store_provider_options

    options: dict[str, Any] = {"image": "img:1", "namespace": "ns", "max_cpu": 0.5, "init_cpu": 0.5, "max_mem": "1Gi",
                               "pod_name": "parsl-chat-x", "annotations": {"a": "b"}, "persistent_volumes": []}  # fmt: skip
    monkeypatch.setattr(kconfig, "load_kube_config", lambda *a, **k: None)
    parsl_made = KubernetesProvider(**options)
    ours = object.__new__(KubernetesProvider)
    _store_provider_options(ours, KubernetesProvider, **options)
    assert {k: v for k, v in vars(ours).items()} == {k: v for k, v in vars(parsl_made).items() if k != "kube_client"}
    with pytest.raises(TypeError):
        _store_provider_options(ours, KubernetesProvider, image="i", no_such_option=1)
