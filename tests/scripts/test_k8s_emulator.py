"""Tests for scripts/k8s-emulator: kmock API + stand-in kubelet, driven by the real
`kubernetes` client and by Parsl's KubernetesProvider (loopback only, bounded)."""

from __future__ import annotations

import importlib.util
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

pytest.importorskip("kmock")
pytest.importorskip("parsl")
client = pytest.importorskip("kubernetes.client")
config = pytest.importorskip("kubernetes.config")
kube_config = pytest.importorskip("kubernetes.config.kube_config")
ApiException = client.ApiException
if TYPE_CHECKING:
    from kubernetes.client import V1Pod

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "k8s-emulator"

pytestmark = [
    pytest.mark.kubernetes,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and process groups"),
]
if importlib.util.find_spec("pytest_timeout"):
    pytestmark.append(pytest.mark.timeout(180))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def processes_with_marker(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.append(int(entry))
            except OSError:
                pass
    return found


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Emulator:
    proc: subprocess.Popen[str]
    url: str
    kubeconfig: Path
    state_dir: Path

    def pods(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.url + "/_emulator/pods", timeout=5) as resp:
            return json.loads(resp.read())

    def api(self) -> Any:  # CoreV1Api; Any because its models' Optional fields would need a guard per access
        # A private ApiClient: no global kubernetes-client state shared between tests.
        return client.CoreV1Api(config.new_client_from_config(config_file=str(self.kubeconfig)))

    def instance(self) -> str:
        return json.loads((self.state_dir / "state.json").read_text())["instance"]


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    kubeconfig, state_dir = tmp_path / "kubeconfig", tmp_path / "state"
    with open(tmp_path / "emulator.err", "w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(SCRIPT),
                "serve",
                "--kubeconfig",
                str(kubeconfig),
                "--port",
                str(free_port()),
                "--state-dir",
                str(state_dir),
                "--grace-seconds",
                "2",
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, f"emulator not ready in 20s: {(tmp_path / 'emulator.err').read_text()}"
        line = proc.stdout.readline().strip()
        assert line.startswith("k8s emulator: http://127.0.0.1:"), line
        url, kc = line.removeprefix("k8s emulator: ").split(" kubeconfig=")
        assert Path(kc) == kubeconfig.resolve()
        emu = Emulator(proc, url, kubeconfig, state_dir)
        instance = emu.instance()
        yield emu
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert code == 0, (tmp_path / "emulator.err").read_text()
    assert processes_with_marker(f"K8S_EMULATOR_INSTANCE={instance}") == [], "pod processes outlived the emulator"


def use_kubeconfig(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """KubernetesProvider() calls config.load_kube_config() with no file, which uses
    KUBE_CONFIG_DEFAULT_LOCATION: read from $KUBECONFIG when kubernetes.config is first
    IMPORTED. Setting the environment variable later in the same process is not enough."""
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))


def pod_spec(name: str, script: str, **env: str) -> V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"app": "emulator-test", "case": name}),
        spec=client.V1PodSpec(
            restart_policy="Never",
            containers=[
                client.V1Container(
                    name="main",
                    image="busybox:1.36",
                    command=["/bin/sh", "-c"],
                    args=[script],
                    env=[client.V1EnvVar(name=k, value=v) for k, v in env.items()],
                    resources=client.V1ResourceRequirements(
                        requests={"cpu": "250m", "memory": "64Mi"}, limits={"cpu": "500m", "memory": "128Mi"}
                    ),
                )
            ],
        ),
    )


def test_kubeconfig_and_health(emulator: Emulator) -> None:
    import yaml

    kc = yaml.safe_load(emulator.kubeconfig.read_text())
    assert kc["current-context"] == "parsl-chat-emulator"
    assert kc["clusters"][0]["cluster"]["server"] == emulator.url
    assert kc["users"][0]["user"]["token"]
    with urllib.request.urlopen(emulator.url + "/readyz", timeout=5) as resp:
        assert resp.read() == b"ok"
    assert client.VersionApi(config.new_client_from_config(config_file=str(emulator.kubeconfig))).get_code().major


def test_discovery_namespaces_and_delete_collection(emulator: Emulator) -> None:
    v1 = emulator.api()
    api_client = v1.api_client
    # Cheap reachability probes a CLI can use before starting Parsl.
    assert client.CoreApi(api_client).get_api_versions().versions == ["v1"]
    assert {"pods", "pods/status", "pods/log"} <= {r.name for r in v1.get_api_resources().resources}
    assert v1.read_namespace("default").status.phase == "Active"
    with pytest.raises(ApiException) as missing:
        v1.read_namespace("absent")
    assert missing.value.status == 404
    v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="extra")))
    assert {n.metadata.name for n in v1.list_namespace().items} == {"default", "extra"}

    def sleeper(job: str) -> V1Pod:
        return client.V1Pod(
            metadata=client.V1ObjectMeta(generate_name="block-", labels={"parsl-job-id": job}),
            spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="none", command=["sleep", "60"])]),
        )

    first = v1.create_namespaced_pod("extra", sleeper("a"))
    second = v1.create_namespaced_pod("extra", sleeper("b"))
    assert first.metadata.name.startswith("block-") and first.metadata.name != second.metadata.name
    v1.delete_collection_namespaced_pod("extra", label_selector="parsl-job-id=a")
    assert [p.metadata.name for p in v1.list_namespaced_pod("extra").items] == [second.metadata.name]
    v1.delete_namespace("extra")  # takes its pods with it
    assert v1.list_pod_for_all_namespaces().items == []
    wait_for(
        lambda: all(p["deleted"] and p["containers"][0]["exit_code"] is not None for p in emulator.pods()),
        10,
        "pod processes to be stopped",
    )


def test_client_pod_lifecycle_runs_command(emulator: Emulator, tmp_path: Path) -> None:
    v1 = emulator.api()
    out = tmp_path / "written-by-pod.txt"
    created = v1.create_namespaced_pod(
        "default",
        pod_spec(
            "writer", 'sleep 0.5; echo "$GREETING from $HOSTNAME in $(pwd)" > "$OUT"; echo done', GREETING="hello", OUT=str(out)
        ),
    )
    assert created.status.phase == "Pending"  # what a real API server returns on create
    assert created.metadata.uid and created.metadata.namespace == "default"

    phases = [created.status.phase]

    def finished() -> bool:
        phase = v1.read_namespaced_pod("writer", "default").status.phase
        if phase != phases[-1]:
            phases.append(phase)
        return phase in ("Succeeded", "Failed")

    wait_for(finished, 15, "pod to finish", interval=0.05)
    assert phases == ["Pending", "Running", "Succeeded"]
    text = out.read_text()
    assert text.startswith("hello from writer in ")
    assert Path(text.split(" in ")[1].strip()).is_dir()  # a per-pod working dir
    pod = v1.read_namespaced_pod("writer", "default")
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0
    assert v1.read_namespaced_pod_log("writer", "default") == "done\n"

    names = [p.metadata.name for p in v1.list_namespaced_pod("default").items]
    assert names == ["writer"]
    assert [p.metadata.name for p in v1.list_namespaced_pod("default", label_selector="case=writer").items] == names
    assert v1.list_namespaced_pod("default", label_selector="case=other").items == []
    with pytest.raises(ApiException) as bad:
        v1.list_namespaced_pod("default", label_selector="case in (a,b)")  # set-based: refused, not ignored
    assert bad.value.status == 400

    v1.delete_namespaced_pod("writer", "default", body=client.V1DeleteOptions())
    with pytest.raises(ApiException) as gone:
        v1.read_namespaced_pod("writer", "default")
    assert gone.value.status == 404
    assert v1.list_namespaced_pod("default").items == []

    (record,) = emulator.pods()
    assert record["name"] == "writer" and record["deleted"] is True and record["phase"] == "Succeeded"
    assert record["image"] == "busybox:1.36"
    assert record["resources"] == {"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}}


def test_failure_and_deletion_kill_process_group(emulator: Emulator, tmp_path: Path) -> None:
    v1 = emulator.api()
    v1.create_namespaced_pod("default", pod_spec("fails", "exit 3"))
    pidfile = tmp_path / "child.pid"
    # The background child is in the pod's process group; deletion must kill it too.
    v1.create_namespaced_pod("default", pod_spec("sleeper", f'sleep 300 & echo $! > "{pidfile}"; wait'))

    wait_for(lambda: v1.read_namespaced_pod("fails", "default").status.phase == "Failed", 15, "Failed phase")
    assert v1.read_namespaced_pod("fails", "default").status.container_statuses[0].state.terminated.exit_code == 3
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 15, "sleeper to start")
    child = int(pidfile.read_text())
    assert v1.read_namespaced_pod("sleeper", "default").status.phase == "Running"
    running = v1.list_namespaced_pod("default", field_selector="status.phase=Running").items
    assert [p.metadata.name for p in running] == ["sleeper"]

    with pytest.raises(ApiException) as bad_ns:
        v1.create_namespaced_pod("no-such-namespace", pod_spec("x", "true"))
    assert bad_ns.value.status == 404

    v1.delete_namespaced_pod("sleeper", "default")
    wait_for(lambda: not pid_alive(child), 10, "pod process to be killed")

    def sleeper_reaped() -> dict[str, dict[str, Any]] | None:
        by_name = {p["name"]: p for p in emulator.pods()}
        return by_name if by_name["sleeper"]["containers"][0]["exit_code"] is not None else None

    by_name = wait_for(sleeper_reaped, 10, "exit code of the deleted pod")
    assert by_name["sleeper"]["deleted"] is True
    assert by_name["sleeper"]["containers"][0]["exit_code"] == 128 + signal.SIGTERM
    assert by_name["fails"]["deleted"] is False and by_name["fails"]["phase"] == "Failed"


@pytest.mark.slow
def test_parsl_kubernetes_provider_end_to_end(emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import parsl
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import KubernetesProvider

    use_kubeconfig(monkeypatch, emulator.kubeconfig)

    @parsl.python_app
    def where(i: int) -> tuple[int, int, str | None]:
        import os

        return i * i, os.getpid(), os.environ.get("K8S_EMULATOR_POD")

    provider = KubernetesProvider(
        namespace="default",
        image="python:3.11",
        init_blocks=1,
        min_blocks=0,
        max_blocks=1,
        max_cpu=1.5,
        max_mem="300Mi",
        init_cpu=0.5,
        init_mem="100Mi",
        # The image is ignored: the pod runs `bash -c "<worker_init>\n<process_worker_pool.py ...>"`
        # on this host, so worker_init puts this interpreter's bin dir on PATH (process_worker_pool.py)
        # and makes this test module importable (dill pickles the app by reference to it).
        worker_init=(
            f'export PATH="{Path(sys.executable).parent}:$PATH"; '
            f'export PYTHONPATH="{Path(__file__).parent}${{PYTHONPATH:+:$PYTHONPATH}}"'
        ),
        pod_name="parsl-chat-test",
        persistent_volumes=[],
    )
    cfg = Config(
        executors=[HighThroughputExecutor(label="k8s", address="127.0.0.1", max_workers_per_node=2, provider=provider)],
        strategy_period=1,
        run_dir=str(tmp_path / "runinfo"),
    )
    parsl.load(cfg)
    try:
        results = [f.result(timeout=60) for f in [where(i) for i in range(6)]]
    finally:
        parsl.dfk().cleanup()

    assert [r[0] for r in results] == [i * i for i in range(6)]
    assert all(pid != os.getpid() for _, pid, _ in results)
    pods = emulator.pods()
    assert len(pods) == 1
    pod = pods[0]
    assert {pod_name for _, _, pod_name in results} == {pod["name"]}
    assert pod["name"].startswith("parsl-chat-test.")
    assert pod["image"] == "python:3.11"
    assert pod["resources"] == {"limits": {"cpu": "1.5", "memory": "300Mi"}, "requests": {"cpu": "0.5", "memory": "100Mi"}}
    assert pod["containers"][0]["command"] == ["/bin/bash"]
    assert "process_worker_pool.py" in pod["containers"][0]["args"][-1]
    # cleanup() scaled the block in: the pod is deleted and its worker pool is gone.

    def all_gone() -> bool:
        return all(p["deleted"] and p["containers"][0]["exit_code"] is not None for p in emulator.pods())

    wait_for(all_gone, 15, "pods deleted and their processes ended")
    assert emulator.api().list_namespaced_pod("default").items == []


def test_unreachable_api_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What parsl-chat sees when KUBECONFIG points at a port where nothing listens."""
    import parsl
    import urllib3
    import yaml
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.executors.errors import BadStateException
    from parsl.providers import KubernetesProvider

    port = free_port()  # closed again: connection refused
    kc = tmp_path / "dead-kubeconfig"
    kc.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "dead",
                "clusters": [{"name": "dead", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "dead", "user": {"token": "x"}}],
                "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "dead"}}],
            }
        )
    )

    v1 = client.CoreV1Api(config.new_client_from_config(config_file=str(kc)))
    started = time.monotonic()
    with pytest.raises(urllib3.exceptions.MaxRetryError, match="Connection refused"):
        v1.list_namespaced_pod("default", _request_timeout=5)
    assert time.monotonic() - started < 5

    use_kubeconfig(monkeypatch, kc)
    provider = KubernetesProvider(
        namespace="default",
        image="python:3.11",
        init_blocks=1,
        max_blocks=1,
        worker_init="true",
        pod_name="parsl-chat-test",
        persistent_volumes=[],
    )
    # The constructor only reads the kubeconfig: the first HTTP call is the pod creation in scale-out.
    parsl.load(
        Config(
            executors=[HighThroughputExecutor(label="k8s", address="127.0.0.1", provider=provider)],
            strategy_period=1,
            run_dir=str(tmp_path / "runinfo"),
        )
    )
    try:
        started = time.monotonic()

        @parsl.python_app
        def one() -> int:
            return 1

        with pytest.raises(BadStateException, match=r"Failed to start block .*Connection refused"):
            one().result(timeout=60)
        assert time.monotonic() - started < 30
    finally:
        parsl.dfk().cleanup()


@pytest.mark.slow
def test_daemon_start_status_pods_stop(tmp_path: Path) -> None:
    state, kc = tmp_path / "daemon", tmp_path / "kubeconfig"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)

    assert run("status", "--state-dir", str(state)).returncode == 1
    started = run("start", "--kubeconfig", str(kc), "--state-dir", str(state), "--timeout", "20")
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith("k8s emulator: http://127.0.0.1:")
    try:
        assert run("start", "--kubeconfig", str(kc), "--state-dir", str(state)).returncode == 1  # no double start
        status = run("status", "--state-dir", str(state), "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["running"] is True
        instance = json.loads((state / "state.json").read_text())["instance"]

        v1 = client.CoreV1Api(config.new_client_from_config(config_file=str(kc)))
        v1.create_namespaced_pod("default", pod_spec("long", "sleep 300"))
        wait_for(lambda: v1.read_namespaced_pod("long", "default").status.phase == "Running", 15, "Running")
        assert processes_with_marker(f"K8S_EMULATOR_INSTANCE={instance}")
        pods = json.loads(run("pods", "--state-dir", str(state)).stdout)
        assert [(p["name"], p["phase"], p["deleted"]) for p in pods] == [("long", "Running", False)]
        assert json.loads(run("pods", "--kubeconfig", str(kc)).stdout) == pods
    finally:
        stopped = run("stop", "--state-dir", str(state))
    assert stopped.returncode == 0, stopped.stderr
    assert run("status", "--state-dir", str(state)).returncode == 1
    assert processes_with_marker(f"K8S_EMULATOR_INSTANCE={instance}") == []
    # After stop, `pods` falls back to the last snapshot: the pod was terminated.
    (pod,) = json.loads(run("pods", "--state-dir", str(state)).stdout)
    assert pod["deleted"] is True and pod["containers"][0]["exit_code"] == 128 + signal.SIGTERM
    assert (state / "emulator.log").read_text()


def test_stop_after_daemon_was_killed_reaps_pod_processes(tmp_path: Path) -> None:
    state, kc = tmp_path / "daemon", tmp_path / "kubeconfig"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)

    assert run("start", "--kubeconfig", str(kc), "--state-dir", str(state)).returncode == 0
    recorded = json.loads((state / "state.json").read_text())
    try:
        v1 = client.CoreV1Api(config.new_client_from_config(config_file=str(kc)))
        v1.create_namespaced_pod("default", pod_spec("orphan", "sleep 300"))
        wait_for(lambda: v1.read_namespaced_pod("orphan", "default").status.phase == "Running", 15, "Running")
    finally:
        os.kill(recorded["pid"], signal.SIGKILL)  # the daemon dies without cleaning up
    wait_for(lambda: not pid_alive(recorded["pid"]), 10, "daemon to die")
    marker = f"K8S_EMULATOR_INSTANCE={recorded['instance']}"
    assert processes_with_marker(marker), "the pod process should have outlived the killed daemon"
    assert run("status", "--state-dir", str(state)).returncode == 1
    stopped = run("stop", "--state-dir", str(state))
    assert stopped.returncode == 0 and "leftover pod processes killed" in stopped.stdout, stopped.stdout
    wait_for(lambda: not processes_with_marker(marker), 5, "leftover pod processes to die")
